"""The layering written in ARCHITECTURE.md holds for every import in gcupipe/ (function-level
imports included), and no module imports another in a cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "gcupipe"


def layers() -> dict[str, int]:
    """Package -> its line in the ```layers block (0 = bottom)."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "ARCHITECTURE.md has no ```layers block"
    rank = {}
    for index, line in enumerate(block.group(1).strip().splitlines()):
        for name in line.split(","):
            rank[name.strip()] = index
    return rank


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module -> the gcupipe modules it imports, wherever in the file the import stands."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}
        found[name] = {t for t in targets if t in modules and t != name}
    return found


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "gcupipe"


def test_every_package_is_in_the_layering() -> None:
    rank = layers()
    packages = {package_of(m) for m in imports()}
    assert packages <= set(rank), sorted(packages - set(rank))


def test_no_import_reaches_up_or_across() -> None:
    rank = layers()
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in imports().items()
        for target in targets
        if package_of(module) != package_of(target)
        and rank[package_of(target)] >= rank[package_of(module)]
    )
    assert wrong == []


def test_no_module_imports_in_a_cycle() -> None:
    graph = imports()
    visiting: list[str] = []
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        if module in done:
            return
        if module in visiting:
            cycles.append(visiting[visiting.index(module) :] + [module])
            return
        visiting.append(module)
        for target in sorted(graph[module]):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert cycles == []
