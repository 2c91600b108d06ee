"""The public API of ``bridgeprobe.probes``: a few names, each the object of the one module that defines it, loaded
lazily (PEP 562), so that importing the package (or ``probes.io`` through it) imports no torch and no name's first
import runs into an import cycle."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import bridgeprobe.probes as probes

ROOT = Path(__file__).resolve().parent.parent


def test_the_public_api_is_small_and_listed_once() -> None:
    assert 8 <= len(probes.__all__) <= 14
    assert len(set(probes.__all__)) == len(probes.__all__)
    assert set(probes.__all__) == set(probes._DEFINED_IN)


@pytest.mark.parametrize("name", probes.__all__)
def test_every_public_name_is_the_object_of_its_defining_module(name: str) -> None:
    module = probes._DEFINED_IN[name]
    obj = getattr(probes, name)
    assert obj is getattr(importlib.import_module(module), name)
    assert obj.__module__ == module  # defined there, not re-exported from elsewhere
    assert getattr(probes, name) is obj  # cached after the first lookup, still the same object


def test_the_type_checking_imports_match_the_lazy_table() -> None:
    """The ``if TYPE_CHECKING:`` imports (for editors and type checkers) name the same modules as ``_DEFINED_IN``."""
    tree = ast.parse((ROOT / "probes" / "__init__.py").read_text(encoding="utf-8"))
    block = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") ==
                 "TYPE_CHECKING")
    imported = {alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert imported == probes._DEFINED_IN


def test_dir_lists_the_public_names() -> None:
    assert set(probes.__all__) <= set(dir(probes))


def test_an_unknown_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        probes.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        exec("from bridgeprobe.probes import no_such_name", {})  # noqa: S102
    assert not hasattr(probes, "_no_such_private")


def _fresh(code: str) -> str:
    """stdout of ``code`` run by a fresh interpreter (nothing imported yet)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout


def test_importing_the_package_imports_no_torch() -> None:
    assert _fresh("import bridgeprobe.probes, sys; print('torch' in sys.modules)").strip() == "False"


def test_the_io_room_imports_no_torch_through_the_package() -> None:
    code = "import bridgeprobe.probes.io.results, sys; print('torch' in sys.modules, 'transformers' in sys.modules)"
    assert _fresh(code).split() == ["False", "False"]


@pytest.mark.slow  # a fresh interpreter per name, each importing torch: about 4 s apiece
@pytest.mark.parametrize("name", probes.__all__)
def test_each_name_imports_first_in_a_fresh_interpreter(name: str) -> None:
    """No import cycle, whichever public name a notebook imports first."""
    assert _fresh(f"from bridgeprobe.probes import {name}; print({name}.__module__)").strip() == \
        probes._DEFINED_IN[name]


def test_the_cli_imports_through_the_package_without_a_cycle() -> None:
    assert _fresh("import bridgeprobe.probes.cli as cli; print(callable(cli.main))").strip() == "True"
