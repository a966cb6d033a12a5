"""The package's layers hold, read from the imports themselves (ADR 0014, docs/layers.md).

Two rules, checked on every module of ``src/insitu`` (lazy imports inside functions
included):

* a package imports only packages of a *lower* layer (never a sibling, never up);
* no package imports another package's private module (``insitu.X._y`` from outside X):
  what a package shares, it exports from its ``__init__``.

Both rules are also shown to fail on planted violations, so a green run means something.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "insitu"

#: Bottom to top. A module of a layer may import modules of lower layers only. Root-level
#: private modules are leaves every package may use; ``errors`` is the exception tree.
LAYERS: list[set[str]] = [
    {"errors", "_atomic", "_canonical", "_clock", "_home", "_pii", "_privacy_env", "_signer"},
    {"_ort", "_sealed", "datasets"},
    {"audit"},
    {"workspace"},
    {"privacy", "attestation"},
    {"data"},
    {"training", "bundle"},
    {"update"},
    {"runtime", "report", "drift", "optimize", "attacks"},
    {"federated", "finetune", "dashboard"},
    {"serve"},
    {"quickstart"},
    {"_flower_app", "cli"},
]
LAYER_OF = {name: index for index, names in enumerate(LAYERS) for name in names}


def _imports(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "insitu":
                yield from ((node.lineno, f"insitu.{a.name}") for a in node.names)
            elif node.module.startswith("insitu."):
                yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.startswith("insitu."))


def violations(sources: dict[str, str]) -> list[str]:
    """Broken rules in ``sources`` (path under ``insitu/`` -> text), one line each."""
    found: list[str] = []
    for path, text in sorted(sources.items()):
        parts = Path(path).with_suffix("").parts  # ("federated", "_simulate") or ("errors",)
        if parts[-1] == "__init__" and len(parts) == 1:
            continue
        package = parts[0]
        if package not in LAYER_OF:
            found.append(f"{path}: package {package!r} has no layer: add it to LAYERS")
            continue
        for line, module in _imports(ast.parse(text)):
            target = module.split(".")
            if len(target) < 2 or target[1] == package:
                continue
            other = target[1]
            if other not in LAYER_OF:
                found.append(f"{path}:{line}: imports {module}, which has no layer")
            elif LAYER_OF[other] >= LAYER_OF[package]:
                found.append(
                    f"{path}:{line}: {package} (layer {LAYER_OF[package]}) imports {module} "
                    f"(layer {LAYER_OF[other]}): imports run down the layers only"
                )
            if len(target) >= 3 and target[2].startswith("_"):
                found.append(
                    f"{path}:{line}: imports {module}, a private module of {other}: "
                    f"import what {other} exports instead"
                )
    return found


def _tree() -> dict[str, str]:
    return {
        str(path.relative_to(SRC)): path.read_text(encoding="utf-8") for path in SRC.rglob("*.py")
    }


def test_imports_run_down_the_layers_and_never_into_a_private_module():
    assert violations(_tree()) == []


def test_a_planted_import_against_the_layers_is_found():
    tree = _tree()
    tree["privacy/_planted.py"] = "from insitu.federated import simulate\n"
    (line,) = violations(tree)
    assert "privacy (layer 4) imports insitu.federated (layer 9)" in line


def test_a_planted_import_of_a_sibling_is_found():
    tree = _tree()
    tree["training/_planted.py"] = "def f():\n    from insitu.bundle import Bundle\n"
    (line,) = violations(tree)
    assert "imports run down the layers only" in line


def test_a_planted_cross_package_private_import_is_found():
    tree = _tree()
    tree["federated/_planted.py"] = "from insitu.data._consent import ConsentRegistry\n"
    (line,) = violations(tree)
    assert "a private module of data" in line


@pytest.mark.parametrize("package", sorted(p.name for p in SRC.iterdir() if p.is_dir()))
def test_every_package_has_a_layer_and_says_what_it_owns(package):
    if package == "__pycache__" or not (SRC / package / "__init__.py").exists():
        pytest.skip("not a package")
    assert package in LAYER_OF
    doc = ast.get_docstring(ast.parse((SRC / package / "__init__.py").read_text()))
    assert doc, f"insitu.{package} says nothing of what it owns"
