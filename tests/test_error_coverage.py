"""Every error class insitu raises is provoked by a test that names it (issue 17).

Read from the code itself, as ``tests/test_layers.py`` reads the imports:

* *raised*: a class of :mod:`insitu.errors` that ``src/insitu`` raises (``raise X(...)``,
  ``raise X``) or builds anywhere else (``return X(...)`` in a function whose result is
  raised, as ``update/_refusals.py:translate`` does): an error is built only to be raised;
* *provoked*: a class a test names where it checks what was raised:
  ``pytest.raises(X)`` or ``pytest.raises((X, Y))``, ``isinstance(exc, X)``, ``except X``,
  ``type(exc) is X``, a class given to ``pytest.raises`` through ``parametrize``, or the
  class's name as a string in an assertion (the ``"error"`` field of the CLI's JSON).

A class only imported or mentioned in a comment is not provoked. The check is also shown
to fail on a planted raise that no test provokes, so a green run means something.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import insitu.errors

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "insitu"
TESTS = ROOT / "tests"
ERRORS = frozenset(insitu.errors.__all__)


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)) is not None:
        return f"{base}.{node.attr}"
    return None


@dataclass(frozen=True)
class _Imports:
    """How one module refers to :mod:`insitu.errors`: the names and modules it imported.

    A class of the same name from elsewhere (``tuf.api.exceptions.RollbackError``) is
    not insitu's and is not counted.
    """

    classes: dict[str, str]  # local name -> error class
    modules: frozenset[str]  # names bound to insitu.errors ("errors", "insitu.errors")

    @classmethod
    def of(cls, tree: ast.AST) -> _Imports:
        classes: dict[str, str] = {}
        modules: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in {"insitu", "insitu.errors"}:
                for alias in node.names:
                    if alias.name in ERRORS:
                        classes[alias.asname or alias.name] = alias.name
                    elif node.module == "insitu" and alias.name == "errors":
                        modules.add(alias.asname or "errors")
            elif isinstance(node, ast.Import):
                modules |= {a.asname or a.name for a in node.names if a.name == "insitu.errors"}
        return cls(classes, frozenset(modules))

    def name(self, node: ast.expr) -> str | None:
        """The error class ``node`` names (``X``, ``errors.X``), or ``None``."""
        if isinstance(node, ast.Name):
            return self.classes.get(node.id)
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ERRORS
            and _dotted(node.value) in self.modules
        ):
            return node.attr
        return None

    def names(self, node: ast.expr | None) -> Iterator[str]:
        """The error classes in ``X``, ``(X, Y)`` or ``X | Y``."""
        if node is None:
            return
        if isinstance(node, ast.Tuple):
            for element in node.elts:
                yield from self.names(element)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            yield from self.names(node.left)
            yield from self.names(node.right)
        elif (name := self.name(node)) is not None:
            yield name


def raised(sources: dict[str, str]) -> dict[str, list[str]]:
    """Each error class raised (or built to be raised) in ``sources`` -> its sites."""
    sites: dict[str, list[str]] = {}
    for path, text in sorted(sources.items()):
        tree = ast.parse(text)
        imports = _Imports.of(tree)
        for node in ast.walk(tree):
            target: ast.expr | None = None
            if isinstance(node, ast.Raise):
                target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            elif isinstance(node, ast.Call):
                target = node.func
            if target is not None and (name := imports.name(target)) is not None:
                site = f"{path}:{node.lineno}"
                if site not in sites.setdefault(name, []):
                    sites[name].append(site)
    return {name: sorted(found, key=_by_line) for name, found in sites.items()}


def _by_line(site: str) -> tuple[str, int]:
    path, line = site.rsplit(":", 1)
    return path, int(line)


def _is_pytest_raises(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "raises"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "pytest"
    )


def _parametrized(
    function: ast.FunctionDef | ast.AsyncFunctionDef, imports: _Imports
) -> Iterator[str]:
    """Error classes a parametrized test hands to its own ``pytest.raises(param)``."""
    params = {arg.arg for arg in function.args.args}
    handed = any(
        _is_pytest_raises(node)
        and node.args
        and isinstance(node.args[0], ast.Name)
        and node.args[0].id in params
        for node in ast.walk(function)
    )
    if handed:
        for decorator in function.decorator_list:
            for node in ast.walk(decorator):
                if isinstance(node, ast.Name | ast.Attribute):
                    yield from imports.names(node)


def _named_in(tree: ast.AST) -> Iterator[str]:
    imports = _Imports.of(tree)
    for node in ast.walk(tree):
        if _is_pytest_raises(node):
            assert isinstance(node, ast.Call)
            yield from imports.names(node.args[0] if node.args else None)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "isinstance"
            and len(node.args) == 2
        ):
            yield from imports.names(node.args[1])
        elif isinstance(node, ast.ExceptHandler):
            yield from imports.names(node.type)
        elif isinstance(node, ast.Compare) and all(
            isinstance(op, ast.Is | ast.Eq) for op in node.ops
        ):
            for operand in [node.left, *node.comparators]:
                yield from imports.names(operand)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _parametrized(node, imports)
        elif isinstance(node, ast.Assert):
            # The CLI's JSON names the class: {"error": "EntryHashMismatchError", ...}.
            for inner in ast.walk(node.test):
                if isinstance(inner, ast.Constant) and inner.value in ERRORS:
                    yield inner.value


def provoked(tests: dict[str, str]) -> set[str]:
    """The error classes the tests in ``tests`` (path -> text) check they provoke."""
    return {name for text in tests.values() for name in _named_in(ast.parse(text))}


def unprovoked(sources: dict[str, str], tests: dict[str, str]) -> list[str]:
    """One line per error class raised in ``sources`` that no test in ``tests`` provokes."""
    named = provoked(tests)
    return [
        f"{name} is raised at {', '.join(sites)} but no test provokes it: add one that "
        f"asserts it with pytest.raises({name}, match=...)"
        for name, sites in sorted(raised(sources).items())
        if name not in named
    ]


def _read(root: Path, *, skip: Path | None = None) -> dict[str, str]:
    return {
        str(path.relative_to(root)): path.read_text(encoding="utf-8")
        for path in sorted(root.rglob("*.py"))
        if path != skip
    }


def _src() -> dict[str, str]:
    return _read(SRC)


def _tests() -> dict[str, str]:
    # This module names classes only in the snippets it plants: it provokes none.
    return _read(TESTS, skip=Path(__file__).resolve())


def test_every_raised_error_class_is_provoked_by_a_test():
    assert unprovoked(_src(), _tests()) == []


def test_the_check_sees_raises_in_src():
    # A sanity floor: a parser that found nothing would pass the check above vacuously.
    found = raised(_src())
    assert {"DataFormatError", "SchemaError", "MixAndMatchError", "SiteRefusedError"} <= set(found)


IMPORTS = "from insitu import errors\nfrom insitu.errors import KAnonymityError, SchemaError\n"


def test_a_planted_raise_that_no_test_provokes_is_found():
    sources = {
        "data/_planted.py": IMPORTS
        + "def check(k):\n"
        + "    if k < 2:\n"
        + "        raise KAnonymityError(f'k={k}')\n"
        + "    raise SchemaError('bad')\n"
    }
    tests = {
        "data/test_planted.py": IMPORTS
        + "def test_it():\n"
        + "    with pytest.raises(SchemaError):\n"
        + "        check(3)\n"
    }
    (line,) = unprovoked(sources, tests)
    assert line.startswith("KAnonymityError is raised at data/_planted.py:5 but no test")


def test_a_planted_factory_error_in_the_real_tree_is_found():
    # Built and returned to be raised elsewhere, as update/_refusals.py:translate does.
    sources = _src()
    sources["update/_planted.py"] = (
        "from insitu import errors\ndef refusal(detail):\n    return errors.KeyStoreError(detail)\n"
    )
    (line,) = unprovoked(sources, _tests())
    assert line.startswith("KeyStoreError is raised at update/_planted.py:3")


def test_a_class_of_the_same_name_from_another_package_is_not_insitus():
    # python-tuf has a RollbackError too; raising or catching it says nothing of insitu's.
    foreign = "from tuf.api.exceptions import RepositoryError\n"
    assert raised({"update/_x.py": foreign + "raise RepositoryError('x')\n"}) == {}
    check = foreign + "with pytest.raises(RepositoryError):\n    f()\n"
    assert provoked({"test_x.py": check}) == set()


@pytest.mark.parametrize(
    "check",
    [
        "with pytest.raises(KAnonymityError, match='k'):\n    f()",
        "with pytest.raises((SchemaError, KAnonymityError)):\n    f()",
        "assert isinstance(caught.value, SchemaError | KAnonymityError)",
        "try:\n    f()\nexcept errors.KAnonymityError:\n    pass",
        "assert type(exc) is KAnonymityError",
        "assert out == {'ok': False, 'error': 'KAnonymityError'}",
        (
            "@pytest.mark.parametrize('error', [SchemaError, KAnonymityError])\n"
            "def test_x(error):\n    with pytest.raises(error):\n        f()"
        ),
    ],
)
def test_each_way_of_checking_a_raised_class_counts(check):
    assert "KAnonymityError" in provoked({"test_x.py": IMPORTS + check})


@pytest.mark.parametrize(
    "mention",
    [
        "x = KAnonymityError",
        "# pytest.raises(KAnonymityError)",
        "with pytest.raises(InsituError, match='KAnonymityError'):\n    f()",
        "with pytest.raises(tuf_exc.KAnonymityError):\n    f()",
    ],
)
def test_a_mere_mention_of_a_class_does_not_count(mention):
    assert "KAnonymityError" not in provoked({"test_x.py": IMPORTS + mention})
