"""The modules of exporter/ depend on each other one way: every import, read from the source (ast, so
imports inside functions and under TYPE_CHECKING count too), goes to a lower layer of the list in
docs/design-notes.md ("Layers"), which this test reads, so the list is written once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "exporter"
PACKAGE_INIT = "__init__"  # `from . import __version__`: the package itself


def modules() -> set[str]:
    return {path.stem for path in PACKAGE.glob("*.py")}


def layers() -> dict[str, int]:
    """Module -> its layer number, from the numbered list under "## Layers" in docs/design-notes.md."""
    text = (ROOT / "docs" / "design-notes.md").read_text()
    assert "\n## Layers" in text, "docs/design-notes.md has no Layers section"
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    placed: dict[str, int] = {}
    for number, line in re.findall(r"^(\d+)\. (.*)$", section, flags=re.M):
        for module in re.findall(r"`([A-Za-z_]+)`", line.split(":", 1)[-1]):
            assert module not in placed, f"{module} is in two layers"
            placed[module] = int(number)
    return placed


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The exporter modules a source file imports, wherever in the file."""
    found: set[str] = set()

    def package_names(names: list[ast.alias]) -> None:  # from . import a, b
        found.update(alias.name if alias.name in known else PACKAGE_INIT for alias in names)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            assert node.level <= 1, f"{path.name}: a relative import beyond the package"
            module = node.module or ""
            if node.level == 0:
                if module != "exporter" and not module.startswith("exporter."):
                    continue
                module = module.removeprefix("exporter").lstrip(".")
            if module:
                found.add(module.split(".")[0])
            else:
                package_names(node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "exporter":
                    found.add(PACKAGE_INIT)
                elif alias.name.startswith("exporter."):
                    found.add(alias.name.split(".")[1])
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {path.stem: imports_of(path, known) - {path.stem} for path in PACKAGE.glob("*.py")}


def test_every_module_has_a_layer_and_the_list_names_no_other() -> None:
    placed, known = layers(), modules()
    unplaced, unknown = sorted(known - set(placed)), sorted(set(placed) - known)
    assert not unplaced, f"place these modules in docs/design-notes.md, Layers: {unplaced}"
    assert not unknown, f"the Layers list names modules that do not exist: {unknown}"


def test_every_import_points_to_a_lower_layer() -> None:
    placed = layers()
    upward = sorted(f"{module} (layer {placed[module]}) imports {target} (layer {placed[target]})"
                    for module, targets in graph().items() for target in targets
                    if placed[target] >= placed[module])
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    edges = graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for target in sorted(edges.get(module, ())):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])


def reached_from(module: str) -> set[str]:
    edges, seen, todo = graph(), set(), [module]
    while todo:
        for target in edges.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_persistence_is_storage_it_imports_neither_the_poller_nor_the_config() -> None:
    direct = graph()["persistence"]
    assert "config" not in direct and "poller" not in direct, direct
    assert not {"poller", "app", "statefile", "server", "__main__"} & reached_from("persistence")


def test_backfill_replays_without_the_app_or_a_poller() -> None:
    """Backfill drives the account memory and the collector itself (the poller module is only reached
    through the state file's wiring, whose error translation it shares)."""
    assert not {"app", "server"} & reached_from("backfill")
    assert "poller" not in graph()["backfill"]
