"""Recipes shared beyond one repository (issue 21): fragments from an installed Python package
(`pkg:`), from a git repository at a pinned commit (`git+`), the lock's record of every
composed file, `plan` naming the fragment that changed, `gcupipe show` and `gcupipe recipes`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gcupipe.cli import app
from gcupipe.engine import run_recipe
from gcupipe.engine.lock import changed_files
from gcupipe.errors import RecipeError
from gcupipe.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def recipe_including(path: Path, reference: str) -> Path:
    return write(
        path,
        f"""\
        version: 1
        name: shared
        include:
          - {{file: "{reference}", at: stages.first.with}}
        stages:
          first:
            uses: command
            with: {{}}
          second:
            uses: command
            needs: []
            with: {{run: echo second}}
        """,
    )


# -- pkg: a fragment package built as a wheel and installed ------------------------------------
@pytest.fixture(scope="module")
def policy_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`acme-policy` 1.2.0 built into a wheel by pip and installed with pip into a directory,
    the way a platform team publishes its policy package and a product team installs it."""
    root = tmp_path_factory.mktemp("policy")
    source = root / "src"
    write(
        source / "pyproject.toml",
        """\
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "acme-policy"
        version = "1.2.0"

        [project.entry-points."gcupipe.recipes"]
        acme = "acme_policy"

        [tool.setuptools.package-data]
        acme_policy = ["**/*.yaml"]
        """,
    )
    write(source / "acme_policy" / "__init__.py", "")
    write(
        source / "acme_policy" / "steps" / "hello.yaml",
        """\
        # Say hello: the command every product stage starts from
        run: echo hello from the policy package
        timeout_s: 30
        """,
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist")]
    subprocess.run([*build, str(source)], check=True, capture_output=True)
    (wheel,) = (root / "dist").glob("acme_policy-1.2.0-*.whl")
    site = root / "site"
    install = [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, capture_output=True)
    return site


def gcupipe_with(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh interpreter that has the installed policy package on its path."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    return subprocess.run(
        [sys.executable, "-m", "gcupipe", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_recipe_takes_a_fragment_from_an_installed_package(policy_site: Path, tmp_path: Path):
    recipe_including(tmp_path / "product.yaml", "pkg:acme-policy/acme_policy/steps/hello.yaml")
    shown = gcupipe_with(policy_site, "show", "product.yaml", "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert (
        record["document"]["stages"]["first"]["with"]["run"] == "echo hello from the policy package"
    )
    origin = record["origins"]["stages.first.with.run"]
    assert origin == "pkg:acme-policy/acme_policy/steps/hello.yaml:2:6"

    listed = gcupipe_with(policy_site, "recipes", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert (
        "pkg:acme-policy/acme_policy/steps/hello.yaml  "
        "Say hello: the command every product stage starts from"
    ) in listed.stdout

    ran = gcupipe_with(policy_site, "run", "product.yaml", "-w", "run", cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    lock = json.loads((tmp_path / "run" / "gcupipe.lock.json").read_text())
    files = {entry["file"]: entry for entry in lock["recipe"]["files"]}
    assert files["pkg:acme-policy/acme_policy/steps/hello.yaml"]["version"] == "1.2.0"
    assert files["product.yaml"]["version"] is None
    assert all(len(entry["sha256"]) == 64 for entry in files.values())


@pytest.mark.parametrize(
    ("reference", "says"),
    [
        ("pkg:no-such-policy/steps/hello.yaml", "Python package no-such-policy is not installed"),
        ("pkg:acme-policy/acme_policy/steps/missing.yaml", "acme-policy does not ship"),
        ("pkg:acme-policy", "write pkg:DISTRIBUTION/PATH"),
    ],
)
def test_a_package_reference_that_cannot_resolve_is_one_line_at_its_entry(
    policy_site: Path, tmp_path: Path, reference: str, says: str
):
    recipe_including(tmp_path / "product.yaml", reference)
    linted = gcupipe_with(policy_site, "lint", "product.yaml", cwd=tmp_path)
    assert linted.returncode == 2
    first = linted.stderr.strip().splitlines()[0]
    assert first.startswith("product.yaml:4:12: include[0].file: "), first
    assert says in first


# -- git+: a fragment at a pinned commit ---------------------------------------------------------
def git(repo: Path, *args: str) -> str:
    environment = {
        **os.environ,
        "GIT_AUTHOR_NAME": "policy",
        "GIT_AUTHOR_EMAIL": "policy@example.com",
        "GIT_COMMITTER_NAME": "policy",
        "GIT_COMMITTER_EMAIL": "policy@example.com",
    }
    done = subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=environment
    )
    return done.stdout.strip()


@pytest.fixture
def policy_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GCUPIPE_CACHE_HOME", str(tmp_path / "cache"))
    repo = tmp_path / "policy"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    write(repo / "steps" / "hello.yaml", "run: echo hello v1\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "policy v1")
    git(repo, "tag", "v1")
    return repo


def test_a_git_fragment_is_pinned_reused_offline_and_checked_by_hash(
    policy_repo: Path, tmp_path: Path
):
    first_commit = git(policy_repo, "rev-parse", "HEAD")
    reference = f"git+file://{policy_repo}@v1#steps/hello.yaml"
    path = recipe_including(tmp_path / "product.yaml", reference)

    recipe = load_recipe(path, environ={})
    assert recipe.stages["first"].config["run"] == "echo hello v1"
    (fragment,) = [f for f in recipe.sources if f.name == reference]
    assert fragment.version == first_commit

    # the tag was resolved once: a moved branch or a missing origin changes nothing
    moved = tmp_path / "policy-moved"
    policy_repo.rename(moved)
    again = load_recipe(path, environ={})
    assert again.stages["first"].config["run"] == "echo hello v1"
    moved.rename(policy_repo)

    # history rewritten: v1 force-moved to a commit with other content, the old one gone, and
    # the cached repository lost (a fresh CI runner keeping only the pins)
    write(policy_repo / "steps" / "hello.yaml", "run: echo hello rewritten\n")
    git(policy_repo, "commit", "-q", "-a", "--amend", "-m", "policy v1")
    git(policy_repo, "tag", "-f", "v1")
    git(policy_repo, "reflog", "expire", "--expire=now", "--all")
    git(policy_repo, "gc", "-q", "--prune=now")
    new_commit = git(policy_repo, "rev-parse", "HEAD")
    shutil.rmtree(tmp_path / "cache" / "recipes" / "git" / "repos")
    shutil.rmtree(tmp_path / "cache" / "recipes" / "git" / "trees")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, environ={})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("product.yaml:4:12: include[0].file: "), message
    assert f"{reference} changed since it was pinned" in message
    assert f"pin it as @{new_commit}" in message

    # pinning the reviewed commit is accepted
    pinned = recipe_including(
        tmp_path / "pinned.yaml", f"git+file://{policy_repo}@{new_commit}#steps/hello.yaml"
    )
    assert load_recipe(pinned, environ={}).stages["first"].config["run"] == "echo hello rewritten"


def test_a_tampered_cache_is_caught_by_the_hash(policy_repo: Path, tmp_path: Path):
    path = recipe_including(
        tmp_path / "product.yaml", f"git+file://{policy_repo}@v1#steps/hello.yaml"
    )
    load_recipe(path, environ={})
    commit = git(policy_repo, "rev-parse", "HEAD")
    cached = tmp_path / "cache" / "recipes" / "git" / "trees" / commit / "steps" / "hello.yaml"
    cached.write_text("run: echo something else\n")
    with pytest.raises(RecipeError, match="changed since it was pinned"):
        load_recipe(path, environ={})


@pytest.mark.parametrize(
    ("reference", "says"),
    [
        ("git+file://{repo}@v9#steps/hello.yaml", "has no revision v9"),
        ("git+file://{repo}@v1#steps/missing.yaml", "has no file steps/missing.yaml at v1"),
        ("git+file://{repo}-gone@v1#steps/hello.yaml", "does not appear to be a git repository"),
        ("git+file://{repo}#steps/hello.yaml", "write git+URL@REVISION#PATH"),
    ],
)
def test_a_git_reference_that_cannot_resolve_is_one_line_at_its_entry(
    policy_repo: Path, tmp_path: Path, reference: str, says: str
):
    path = recipe_including(tmp_path / "product.yaml", reference.format(repo=policy_repo))
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, environ={})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("product.yaml:4:12: include[0].file: "), message
    assert says in message


# -- the lock, plan and show ---------------------------------------------------------------------
def test_plan_names_the_fragment_that_changed_and_only_its_stage_reruns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    fragment = write(tmp_path / "steps" / "hello.yaml", "run: echo hello\n")
    path = recipe_including(tmp_path / "product.yaml", "steps/hello.yaml")
    run_dir = tmp_path / "run"
    assert run_recipe(load_recipe(path, environ={}), run_dir).outcome == "ok"
    assert changed_files(run_dir, load_recipe(path, environ={})) == []

    write(fragment, "run: echo hello again\n")
    recipe = load_recipe(path, environ={})
    (line,) = changed_files(run_dir, recipe)
    assert line.startswith("steps/hello.yaml changed (sha256 ")
    assert line.endswith("since the last run; it sets config of: first")
    result = CliRunner().invoke(app, ["plan", str(path), "-w", str(run_dir)])
    assert result.exit_code == 0, result.output
    rows = [row.split() for row in result.output.splitlines()]
    outcomes = {row[1]: row[0] for row in rows if row and row[0] in ("run", "cached")}
    assert outcomes == {"first": "run", "second": "cached"}
    assert line in result.output


def test_show_names_the_fragment_each_value_came_from(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(
        app, ["show", "recipes/deepseek-w8a8.yaml", "--set", "stages.serve.with.max_model_len=512"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(
        line.strip().startswith("method: w8a8_dynamic  # configs/quant/w8a8-dynamic.yaml:")
        for line in lines
    ), result.output
    assert "      max_model_len: 512  # --set" in lines
    assert "  model_id: deepseek-ai/DeepSeek-V2-Lite  # recipes/deepseek-w8a8.yaml:14:13" in lines

    as_json = CliRunner().invoke(app, ["show", "recipes/deepseek-w8a8.yaml", "--json"])
    record = json.loads(as_json.output)
    origin = record["origins"]["stages.quantize.with.method"]
    assert origin.startswith("configs/quant/w8a8-dynamic.yaml:")
    assert (
        record["document"]["stages"]["download"]["with"]["model_id"]
        == "deepseek-ai/DeepSeek-V2-Lite"
    )


def test_a_git_fragment_extends_its_neighbours_at_the_same_commit(
    policy_repo: Path, tmp_path: Path
):
    write(policy_repo / "steps" / "base.yaml", "run: echo base\ntimeout_s: 30\n")
    write(policy_repo / "steps" / "hello.yaml", "extends: base.yaml\nrun: echo hello v2\n")
    git(policy_repo, "add", ".")
    git(policy_repo, "commit", "-q", "-m", "policy v2")
    git(policy_repo, "tag", "v2")
    commit = git(policy_repo, "rev-parse", "HEAD")
    reference = f"git+file://{policy_repo}@v2#steps/hello.yaml"
    recipe = load_recipe(recipe_including(tmp_path / "product.yaml", reference), environ={})
    assert recipe.stages["first"].config == {"run": "echo hello v2", "timeout_s": 30}
    base = f"git+file://{policy_repo}@v2#steps/base.yaml"
    assert [(f.name, f.version) for f in recipe.sources[1:]] == [
        (reference, commit),
        (base, commit),
    ]
    assert str(recipe.positions.value_mark(("stages", "first", "with", "timeout_s"))) == (
        f"{base}:2:12"
    )


def test_show_fills_in_what_it_can_and_keeps_secrets_and_run_time_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_print_me")
    monkeypatch.setenv("GREETING", "hi")
    monkeypatch.delenv("UNSET_THING", raising=False)
    write(
        tmp_path / "r.yaml",
        """\
        version: 1
        name: shown
        vars: {who: world}
        stages:
          first:
            uses: command
            with:
              run: echo ${env:GREETING} ${vars.who} ${env:UNSET_THING,later}
              env: {TOKEN: "${env:HF_TOKEN}", MISSING: "${env:UNSET_THING}"}
          second:
            uses: command
            with: {run: "cat ${stages.first.outputs.stdout_file}"}
        """,
    )
    result = CliRunner().invoke(app, ["show", "r.yaml", "--json"], env={"UNSET_THING": None})
    assert result.exit_code == 2  # ${env:UNSET_THING} with no default: the recipe cannot load
    assert "environment variable UNSET_THING is not set" in result.output
    monkeypatch.setenv("UNSET_THING", "now set")
    result = CliRunner().invoke(app, ["show", "r.yaml", "--json"])
    assert result.exit_code == 0, result.output
    stages = json.loads(result.output)["document"]["stages"]
    assert stages["first"]["with"]["run"] == "echo hi world now set"
    assert stages["first"]["with"]["env"]["TOKEN"] == "${env:HF_TOKEN}"
    assert stages["second"]["with"]["run"] == "cat ${stages.first.outputs.stdout_file}"
    assert "hf_do_not_print_me" not in result.output


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_show_yaml_reads_back_as_the_document_it_shows(name: str, monkeypatch: pytest.MonkeyPatch):
    from gcupipe.recipe.show import annotated_yaml, shown_document

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("CALIBRATION_TEXT", "calibration.txt")
    recipe = load_recipe(REPO / "recipes" / name, environ=os.environ)
    # lists holding mappings and lists, empty ones among them (no shipped recipe has all)
    recipe.document["extra"] = {"nested": [[{"a": 1}, [2, {"b": []}]], {}, {"c": 3, "d": [4]}]}
    shown = annotated_yaml(recipe, os.environ)
    assert yaml.safe_load(shown) == shown_document(recipe, os.environ)
