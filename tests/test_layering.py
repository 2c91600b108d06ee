"""The package's layout stays true: each room (subpackage) imports only the rooms below it, and no module imports
itself back through others. Read from the source with ast, lazy (function-level) imports included, since those are
how a cycle hides. The rooms and what each may import are docs/architecture.md's table."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"probes": "bridgeprobe.probes", "prompts": "bridgeprobe.prompts", "analyses": "bridgeprobe.analyses"}

# room -> the rooms it may import (its own modules always); lowest first
BELOW_READOUTS = {"probes.io", "probes.model", "prompts"}
ALLOWED: dict[str, set[str]] = {
    "probes.io": set(),
    "probes.model": set(),
    "prompts": {"probes.io", "probes.model"},
    "probes.readouts": BELOW_READOUTS,
    "probes.runs": BELOW_READOUTS | {"probes.readouts"},
    "probes.memory": BELOW_READOUTS | {"probes.readouts", "probes.runs"},
    "probes.identity": BELOW_READOUTS | {"probes.readouts", "probes.runs", "probes.memory"},
    "analyses": {"probes.io", "probes.model", "prompts"},  # report writers read tables; no experiment code
    "probes.jobs": BELOW_READOUTS | {"probes.readouts", "probes.runs", "probes.memory", "probes.identity", "analyses"},
}
ALLOWED["probes"] = set(ALLOWED) - {"probes.jobs"}  # the public API (probes/__init__.py) names library functions
ALLOWED["probes.cli"] = set(ALLOWED) | {"probes"}


def modules() -> dict[str, Path]:
    """Every module of the three folders by its dotted name (``bridgeprobe.probes.model.hooks``)."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (``from x import y`` counts as ``x.y``
    where ``x.y`` is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("bridgeprobe.")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base.startswith("bridgeprobe."):
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in found if m in known} - {name}


def room(module: str) -> str:
    """``bridgeprobe.probes.model.hooks`` -> ``probes.model``; ``bridgeprobe.prompts.schema`` -> ``prompts``."""
    parts = module.split(".")[1:]
    return ".".join(parts[:2]) if parts[0] == "probes" and len(parts) > 1 else parts[0]


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a room that its row of :data:`ALLOWED` does not list, as 'module -> module'."""
    bad = []
    for module, targets in sorted(graph.items()):
        mine = room(module)
        if mine not in ALLOWED:
            bad.append(f"{module}: room {mine} is in no row of ALLOWED (add it, with what it may import)")
            continue
        bad += [f"{module} -> {target}" for target in sorted(targets)
                if room(target) != mine and room(target) not in ALLOWED[mine]]
    return bad


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle among the modules, or []."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        return list(error.args[1])
    return []


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, set(known)) for name, path in known.items()}


def test_every_room_imports_only_the_rooms_below_it(graph: dict[str, set[str]]) -> None:
    assert violations(graph) == []


def test_no_module_imports_itself_back(graph: dict[str, set[str]]) -> None:
    assert cycle(graph) == []


def test_the_checks_catch_an_upward_import_and_a_cycle(graph: dict[str, set[str]]) -> None:
    """The two checks above on the real graph with one planted bad edge each: they are not blind."""
    assert "bridgeprobe.probes.readouts.lens" in graph and "bridgeprobe.analyses.page" in graph  # the graph is read
    upward = {**graph, "bridgeprobe.probes.model.hooks": graph["bridgeprobe.probes.model.hooks"]
              | {"bridgeprobe.probes.readouts.lens"}}
    assert violations(upward) == ["bridgeprobe.probes.model.hooks -> bridgeprobe.probes.readouts.lens"]
    library_to_report = {**graph, "bridgeprobe.probes.identity.scratch": graph["bridgeprobe.probes.identity.scratch"]
                         | {"bridgeprobe.analyses.page"}}
    assert violations(library_to_report) == ["bridgeprobe.probes.identity.scratch -> bridgeprobe.analyses.page"]
    looped = {**graph, "bridgeprobe.probes.model.architecture": {"bridgeprobe.probes.model.hooks"}}
    assert set(cycle(looped)) == {"bridgeprobe.probes.model.architecture", "bridgeprobe.probes.model.hooks"}


def test_every_room_is_installed() -> None:
    """Each folder with an ``__init__.py`` is in pyproject.toml's package list (a wheel leaves out the others)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join([FOLDERS[init.relative_to(ROOT).parts[0]], *init.relative_to(ROOT).parts[1:-1]])
               for folder in FOLDERS for init in (ROOT / folder).rglob("__init__.py")}
    assert folders - listed == set()
