"""The import graph of the project's packages, read from the source with ``ast`` (every import
statement, also those inside functions, relative ones resolved, and ``importlib.import_module``
or ``__import__`` calls with a literal name): the layers stack as
``regcl`` ← ``infra`` ← ``workers`` ← ``service`` ← ``cli``, and a module may import its own
layer and those below it, never one above. The library (``regcl/``) thus imports none of
``infra``, ``workers``, ``service`` or ``cli``."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("regcl", "infra", "workers", "service", "cli")


def _package_of(path: Path, root: Path) -> list[str]:
    """The package a file's relative imports start from, as parts (``regcl/a/b.py`` and
    ``regcl/a/__init__.py`` → ``["regcl", "a"]``)."""
    return list(path.relative_to(root).parts[:-1])


def imported_modules(source: str, package: list[str]) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``; a relative import that
    climbs above the top package gives ``<beyond-top>``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.lineno, node.module or ""
            elif node.level > len(package):
                yield node.lineno, "<beyond-top>"
            else:
                base = package[:len(package) - node.level + 1]
                yield node.lineno, ".".join([*base, *filter(None, [node.module])])
        elif isinstance(node, ast.Call) and node.args \
                and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value


def violations(layer: str, root: Path = REPO) -> list[str]:
    """``file:line imports module`` for each import of ``layer``'s files that reaches a layer
    above it (or climbs out of its package)."""
    allowed = set(LAYERS[:LAYERS.index(layer) + 1])
    found = []
    for path in sorted((root / layer).rglob("*.py")):
        for line, module in imported_modules(path.read_text(), _package_of(path, root)):
            top = module.split(".")[0]
            if top == "<beyond-top>" or (top in LAYERS and top not in allowed):
                found.append(f"{path.relative_to(root)}:{line} imports {module}")
    return found


def test_the_library_imports_nothing_of_the_layers_above_it():
    assert (REPO / "regcl" / "client").is_dir()  # the client is part of the library
    assert violations("regcl") == []


@pytest.mark.parametrize("layer", LAYERS[1:])
def test_each_layer_imports_only_itself_and_the_layers_below(layer):
    assert (REPO / layer / "__init__.py").is_file()
    assert violations(layer) == []


def test_the_check_sees_local_relative_and_dynamic_imports():
    source = '''
import numpy
from regcl.errors import RegclError

def later():
    from service.app import create_app
    import workers.tasks

def dynamic():
    import importlib
    importlib.import_module("infra.settings")
    __import__("cli.main")

from . import models
from ..adapters import lora
from ... import beyond
'''
    modules = [m for _, m in sorted(imported_modules(source, ["regcl", "client"]))]
    assert modules == ["numpy", "regcl.errors", "service.app", "workers.tasks", "importlib",
                       "infra.settings", "cli.main", "regcl.client", "regcl.adapters",
                       "<beyond-top>"]


def test_an_upward_import_inside_a_function_is_reported(tmp_path):
    library = tmp_path / "regcl" / "models"
    library.mkdir(parents=True)
    (library / "build.py").write_text("import torch\n\n\ndef run():\n"
                                      "    from cli.up import run_up\n    return run_up\n")
    (library / "fine.py").write_text("from regcl.errors import RegclError\n")
    assert violations("regcl", tmp_path) == ["regcl/models/build.py:5 imports cli.up"]


# The rooms of service/: the engine at the bottom, the Label Studio integration on it, the HTTP
# layer on both, and app.py (create_app and its lifespan) on top.
SERVICE_ROOMS = ("service.engine", "service.labelstudio", "service.api", "service.app")


def room_violations(root: Path = REPO) -> list[str]:
    """``file:line imports module`` for each import of a service room that reaches a room
    above it; a module of service/ outside every room (other than ``__init__``) is reported
    too."""
    found = []
    for path in sorted((root / "service").rglob("*.py")):
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        if name == "service":
            continue
        room = next((r for r in SERVICE_ROOMS if name == r or name.startswith(r + ".")), None)
        if room is None:
            found.append(f"{path.relative_to(root)} is in no room of {SERVICE_ROOMS}")
            continue
        above = SERVICE_ROOMS[SERVICE_ROOMS.index(room) + 1:]
        for line, module in imported_modules(path.read_text(), _package_of(path, root)):
            if module == "service" or any(module == r or module.startswith(r + ".")
                                          for r in above):
                found.append(f"{path.relative_to(root)}:{line} imports {module}")
    return found


def test_service_rooms_import_only_themselves_and_the_rooms_below():
    assert room_violations() == []


def test_the_room_check_reports_an_upward_import(tmp_path):
    engine = tmp_path / "service" / "engine"
    engine.mkdir(parents=True)
    (engine / "decode.py").write_text("from service.api.problems import ProblemError\n")
    (tmp_path / "service" / "stray.py").write_text("x = 1\n")
    assert room_violations(tmp_path) == [
        "service/engine/decode.py:1 imports service.api.problems",
        "service/stray.py is in no room of ('service.engine', 'service.labelstudio', "
        "'service.api', 'service.app')"]
