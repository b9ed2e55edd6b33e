"""The `gcupipe` command line: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from gcupipe import __version__
from gcupipe.errors import GcupipeError, UsageError

app = typer.Typer(
    name="gcupipe",
    help=(
        "Declarative pipelines that download, quantize, validate and serve LLMs on vLLM.\n\n"
        "A recipe (YAML) names stages; `gcupipe run recipe.yaml` runs them, reusing every stage "
        "whose inputs did not change. Start with `gcupipe plan recipe.yaml` to see what would "
        "run and why, and `gcupipe stages` for the stage types and their options."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
# soft wrap: a line longer than the terminal (a path, a command) is never broken by rich, in a
# terminal or a CI log
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)
_state = {"debug": False}

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a value: KEY.PATH=VALUE (YAML-typed); repeatable.",
        metavar="KEY=VALUE",
    ),
]
WorkdirOpt = Annotated[
    Path | None,
    typer.Option("--workdir", "-w", help="Run directory. Default: ./runs/<recipe name>."),
]
OnlyOpt = Annotated[
    list[str] | None,
    typer.Option("--only", help="Run only these stages (their upstream must be cached)."),
]
FromOpt = Annotated[str | None, typer.Option("--from", help="Run this stage and what follows it.")]
ToOpt = Annotated[str | None, typer.Option("--to", help="Run this stage and what it needs.")]
ForceOpt = Annotated[
    list[str] | None, typer.Option("--force", help="Rerun this stage even if cached; repeatable.")
]


def _fail(error: BaseException) -> NoReturn:
    if _state["debug"]:
        raise error
    from rich.markup import escape

    from gcupipe.errors import is_disk_full
    from gcupipe.estimate import disk_full_message
    from gcupipe.secrets import redact

    if isinstance(error, GcupipeError):
        text = escape(redact(str(error)))  # `work[n=1]`, `gcupipe[s3]` are not markup
        errors.print(
            f"[red]error:[/] {text}" if "\n" not in text else f"[red]error:[/]\n{text}",
            highlight=False,
            markup=True,
            soft_wrap=True,
        )
        raise typer.Exit(error.exit_code)
    if isinstance(error, OSError) and is_disk_full(error):
        text = escape(disk_full_message(error, Path.cwd()))
        errors.print(f"[red]error:[/] {text}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(1)
    errors.print(
        f"[red]internal error:[/] {type(error).__name__}: {escape(redact(str(error)))}\n"
        "run again with --debug for the traceback",
        highlight=False,
    )
    raise typer.Exit(1)


def _selection(only: list[str] | None, from_: str | None, to: str | None, force: list[str] | None):  # type: ignore[no-untyped-def]
    from gcupipe.engine import Selection

    names = [name for item in (only or []) for name in item.split(",") if name]
    return Selection(only=names, from_stage=from_, to_stage=to, force=list(force or []))


def _load(recipe: Path, overrides: list[str] | None):  # type: ignore[no-untyped-def]
    from gcupipe.recipe import load_recipe

    return load_recipe(recipe, overrides or [])


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug
    if version:
        console.print(f"gcupipe {__version__}")
        raise typer.Exit(0)


@app.command()
def run(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    workdir: WorkdirOpt = None,
    only: OnlyOpt = None,
    from_: FromOpt = None,
    to: ToOpt = None,
    force: ForceOpt = None,
    json_lines: Annotated[
        bool, typer.Option("--json", help="Stream events as JSON lines on stdout (no live view).")
    ] = False,
    junit: Annotated[
        Path | None, typer.Option("--junit", help="Write a JUnit XML file, one testcase per stage.")
    ] = None,
    executor: Annotated[
        str | None,
        typer.Option(
            "--executor",
            help="local (this machine) or ray (each stage a Ray task; the run directory must be "
            "on storage every node sees). Default: the recipe's `executor.kind`, else local.",
        ),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            help="local: run up to N independent stages at once, each in a worker process.",
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="ray: the cluster to join (auto, ray://host:port); default: start Ray here.",
        ),
    ] = None,
    wait: Annotated[
        float,
        typer.Option(
            "--wait",
            min=0,
            help="Another run holds the run directory: wait up to this many seconds for it "
            "(default 0: refuse at once, exit code 2).",
        ),
    ] = 0.0,
) -> None:
    """Run a recipe. Exit codes: 0 ok, 1 stage failed, 2 recipe/usage error, 3 validation gate
    failed, 130 interrupted.

    Stages run one after another in this process; `--jobs 4` runs independent ones (the
    combinations of a matrix) four at a time on this machine, `--executor ray` on a Ray
    cluster, each stage placed on a node with the `resources:` it asks for."""
    from gcupipe.engine import Events, JsonLinesSink, JUnitSink, default_run_dir, run_recipe
    from gcupipe.engine.events import Sink
    from gcupipe.engine.executors import make_executor
    from gcupipe.engine.view import RichView

    try:
        loaded = _load(recipe, overrides)
        settings = loaded.executor
        chosen = make_executor(
            executor or settings.kind,
            jobs or settings.jobs,
            ray_address or settings.ray_address,
        )
        sinks: list[Sink] = [JsonLinesSink() if json_lines else RichView(console)]
        if junit:
            sinks.append(JUnitSink(junit, loaded.name))
        events = Events(sinks)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            result = run_recipe(
                loaded,
                workdir or default_run_dir(loaded),
                _selection(only, from_, to, force),
                events,
                chosen,
                wait,
            )
        finally:
            events.close()
    except KeyboardInterrupt:
        errors.print("[red]interrupted[/]")
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - every error leaves through _fail
        _fail(exc)
    if result.error is not None:
        _fail(result.error)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command()
def plan(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    workdir: WorkdirOpt = None,
    only: OnlyOpt = None,
    from_: FromOpt = None,
    to: ToOpt = None,
    force: ForceOpt = None,
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate",
            help="Also estimate, per stage that will run, the disk it writes, its peak RAM "
            "(from safetensors headers, no tensor read) and a rough time (from a one-second "
            "probe of this machine); exit code 4 when the run directory's filesystem lacks "
            "the space.",
        ),
    ] = False,
) -> None:
    """Show the stages, their order, what would run and why. Changes nothing."""
    from gcupipe.engine import Runner, default_run_dir
    from gcupipe.engine.lock import changed_files
    from gcupipe.engine.view import plan_lines
    from gcupipe.secrets import redact

    try:
        loaded = _load(recipe, overrides)
        runner = Runner(loaded, workdir or default_run_dir(loaded))
        selection = _selection(only, from_, to, force)
        results = runner.plan(selection)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    needs = {stage_id: list(stage.needs) for stage_id, stage in loaded.stages.items()}
    for line in plan_lines(loaded.name, str(runner.store.run_dir), results, needs):
        console.print(redact(line), highlight=False)
    for line in changed_files(runner.store.run_dir, loaded):
        console.print(redact(line), highlight=False, markup=False)
    if estimate:
        from gcupipe.engine.preflight import preflight
        from gcupipe.errors import NoSpace
        from gcupipe.estimate import Machine

        try:
            machine = Machine.probe(runner.store.run_dir)
            checked = preflight(runner, results, machine)
        except Exception as exc:  # noqa: BLE001
            _fail(exc)
        console.print("estimate:", highlight=False)
        for line in checked.lines():
            console.print(redact(line), highlight=False, markup=False)
        problem = checked.problem()
        if problem is not None:
            _fail(NoSpace(problem))


@app.command()
def lint(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files.", show_default=False)],
    overrides: SetOpt = None,
) -> None:
    """Check recipes without running anything: YAML, keys, types, references, graph, and what
    each target's loaders accept (a combination the target cannot load is refused here, naming
    its loader). For each quantize stage it states the target and the exact serve flags."""
    from gcupipe.errors import RecipeError
    from gcupipe.recipe.resolve import lint_notes

    failed = 0
    for recipe in recipes:
        try:
            loaded = _load(recipe, overrides)
        except RecipeError as exc:
            failed += 1
            errors.print(str(exc), highlight=False, markup=False, soft_wrap=True)
            continue
        except Exception as exc:  # noqa: BLE001
            _fail(exc)
        console.print(f"[green]ok[/] {recipe} ({len(loaded.stages)} stages)", highlight=False)
        for stage_id, line in lint_notes(loaded):
            console.print(f"  {stage_id}: {line}", highlight=False, markup=False)
    if failed:
        raise typer.Exit(2)


@app.command()
def show(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object: the document and each value's origin.")
    ] = False,
) -> None:
    """Print the recipe as it will run: everything it extends and includes merged in, the
    environment's and --set overrides applied, ${vars.*} and ${env:*} filled in, and after each
    value the file:line:col it was written at (later wins: extends < include < the recipe <
    environment < --set). Run-time values (${stages.*}, ${matrix.*}) stay as written."""
    import os

    from gcupipe.recipe.show import annotated_yaml, origins, shown_document
    from gcupipe.secrets import redact

    try:
        loaded = _load(recipe, overrides)
        if as_json:
            document = shown_document(loaded, os.environ)
            record = {"document": document, "origins": origins(loaded, document)}
            text = json.dumps(redact(record), indent=2) + "\n"
        else:
            text = redact(annotated_yaml(loaded, os.environ))
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    sys.stdout.write(text)


@app.command()
def recipes() -> None:
    """List the recipes and fragments that installed Python packages provide (entry-point group
    gcupipe.recipes), each with the reference extends:/include: take and its description."""
    from gcupipe.recipe.catalog import GROUP, provided_recipes

    found = provided_recipes()
    if not found:
        console.print(f"no installed package provides recipes (entry-point group {GROUP})")
    for provided in found:
        console.print(
            f"{provided.reference}  {provided.description}", highlight=False, markup=False
        )


@app.command()
def targets() -> None:
    """What loads where: for every target, method and format, the serve flags or the reason its
    loaders refuse it (from the target profiles; the README's table is this output)."""
    from gcupipe.targets.support import support_markdown

    console.print(support_markdown(), highlight=False, markup=False)


@app.command()
def schema(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")
    ] = None,
) -> None:
    """Print the recipe JSON Schema (every registered stage's options) for editors."""
    from gcupipe.recipe.schema import recipe_schema

    text = json.dumps(recipe_schema(lambda m: errors.print(f"warning: {m}")), indent=2) + "\n"
    if output:
        output.write_text(text)
    else:
        sys.stdout.write(text)


@app.command()
def stages(
    name: Annotated[str | None, typer.Argument(help="Show one stage in detail.")] = None,
) -> None:
    """List the registered stage types with their options and outputs."""
    from gcupipe.stages.docs import describe_stage, stage_summaries

    try:
        if name:
            console.print(describe_stage(name))
        else:
            console.print(stage_summaries())
    except Exception as exc:  # noqa: BLE001
        _fail(exc)


@app.command()
def inspect(
    directory: Annotated[Path, typer.Argument(help="A model directory.", show_default=False)],
) -> None:
    """Recognise a model directory's format and say how vLLM must load it."""
    try:
        from gcupipe.formats.inspect import inspect_model_dir, render_inspection

        console.print(render_inspection(inspect_model_dir(directory)))
    except Exception as exc:  # noqa: BLE001
        _fail(exc)


@app.command()
def validate(
    directory: Annotated[
        Path, typer.Argument(help="A quantized model directory.", show_default=False)
    ],
    reference: Annotated[
        Path | None,
        typer.Option(help="The float source model; without it only the structural rules run."),
    ] = None,
    quantization: Annotated[
        str | None,
        typer.Option(help="The --quantization value it will be served with (checked)."),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="Judge the files by this target's loaders: gcu, ascend, cuda, cpu. Default: "
            "the one the format is made for.",
            show_default=False,
        ),
    ] = None,
    eval_text: Annotated[
        Path | None, typer.Option(help="Text file for the perplexity gate (default: built-in).")
    ] = None,
    eval_tokens: Annotated[int, typer.Option(help="Tokens of it to score.")] = 2048,
    max_ppl_increase: Annotated[
        float, typer.Option(help="Largest relative perplexity increase over float.")
    ] = 0.05,
    min_token_agreement: Annotated[
        float,
        typer.Option(
            help="Least top-1 agreement with float at the positions where float is confident."
        ),
    ] = 0.9,
    agreement_margin: Annotated[
        float,
        typer.Option(help="Logit lead of float's top-1 that makes a position confident."),
    ] = 1.0,
    layered: Annotated[
        bool | None,
        typer.Option(
            "--layered/--whole",
            help="One decoder layer in memory at a time (models larger than RAM) or whole "
            "models. Default: layered when the float model would not fit comfortably.",
            show_default=False,
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            help="Write the reports (JSON, Markdown, JUnit, SQNR plot) into this directory. "
            "Default: print the summary only, write nothing.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Check a quantized model directory outside a recipe: the same rules and gates as
    `uses: validate`. Exit code 3 when a rule or gate fails.

    gcupipe validate runs/quickstart/stages/quantize/out --reference float/ --quantization gcu
    """
    try:
        from gcupipe.targets.registry import TARGETS
        from gcupipe.validation.api import ValidationSettings, enforce, validate_model_dir

        if not directory.is_dir():
            raise UsageError(f"{directory} is not a directory")
        if target is not None and target not in TARGETS:
            raise UsageError(f"--target: {TARGETS.unknown_message(target)}")
        settings = ValidationSettings(
            max_ppl_increase=max_ppl_increase,
            min_token_agreement=min_token_agreement,
            agreement_margin=agreement_margin,
            eval_text_file=eval_text,
            eval_tokens=eval_tokens,
            quantization=quantization,
            check_quantization=quantization is not None,
            target=target,
            layered=layered,
        )
        outcome = validate_model_dir(
            directory,
            reference,
            settings,
            report,
            log=lambda line: errors.print(line, highlight=False),
        )
        if report is not None:
            console.print(f"report: {outcome.paths.get('markdown')}", highlight=False)
        enforce(outcome)
        console.print(
            f"[green]passed[/]: {len(outcome.report.rules)} rules, "
            f"{len(outcome.report.gates)} gates"
        )
    except Exception as exc:  # noqa: BLE001
        _fail(exc)


@app.command()
def clean(
    recipe: RecipeArg,
    workdir: WorkdirOpt = None,
    stage: Annotated[
        list[str] | None,
        typer.Option(
            "--stage", help="Remove only this stage's result (and work an interrupted run kept)."
        ),
    ] = None,
) -> None:
    """Remove a recipe's run directory (or the results of some stages)."""
    from gcupipe.engine import default_run_dir
    from gcupipe.engine.store import RunStore

    try:
        loaded = _load(recipe, None)
        run_dir = workdir or default_run_dir(loaded)
        if not stage:
            shutil.rmtree(run_dir, ignore_errors=True)
            console.print(f"removed {run_dir}")
            return
        store = RunStore(run_dir)
        for name in stage:
            matches = [s for s in loaded.stages.values() if name in (s.id, s.base_id)]
            if not matches:
                raise UsageError(f"no stage '{name}' in recipe '{loaded.name}'")
            for match in matches:
                for folder in (store.stage_dir(match.id), store.stage_scratch(match.id)):
                    if folder.exists():
                        shutil.rmtree(folder, ignore_errors=True)
                        console.print(f"removed {folder}")
    except Exception as exc:  # noqa: BLE001
        _fail(exc)


def main() -> None:
    app()
