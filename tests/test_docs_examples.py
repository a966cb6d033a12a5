"""Every ```python example in README.md and docs/*.md runs against the package as it is.

Each block runs on its own, as a reader would paste it: a fresh namespace, a temporary
directory as the working directory, and ``INSITU_HOME`` naming a workspace created there.
A page gets what its text says its example needs:

* ``docs/serving.md``: a workspace where ``insitu update`` installed ``adult-income`` (a
  logistic model over the encoded features of the schema insitu carries, published to an
  in-memory update repository);
* ``docs/federated.md``: the ``adult.csv`` it names, a sample of the census rows insitu
  carries (:func:`insitu.datasets.builtin_data`), small enough for a short run;
* ``docs/optimize.md``: the workspace of a federated run, i.e. the federated example run
  just before it, in the same directory. Both pages run in one test, the only one that
  starts Flower's simulation engine (Ray), so that runs never overlap.

A block that cannot run here is marked in its page by ``<!-- not-run: reason -->`` on the
line before its fence; it is reported as skipped with that reason. Nothing else is
skipped, and a block whose page the extraction missed fails the first test below.
"""

from __future__ import annotations

import gc
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from insitu.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Pages whose examples train on Flower's simulation engine, or continue from such a run,
#: in the order they run (one test, one directory).
FEDERATION_PAGES = ("docs/federated.md", "docs/optimize.md")
#: Rows of ``adult.csv`` for the federated example: enough for 3 sites at epsilon 1 over
#: 2 rounds (about 640 training records each; ``min_rows_for`` asks 256), no more.
FEDERATION_ROWS = 3000

_FENCE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.+?)\s*-->$")


@dataclass(frozen=True)
class Example:
    """One ```python block of a page."""

    page: str  # relative to the repository
    line: int  # of the opening fence
    source: str
    not_run: str | None  # the reason given by a ``not-run`` marker

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    def run(self) -> None:
        """Execute the block; a traceback names the page and its lines."""
        code = compile("\n" * self.line + self.source, str(ROOT / self.page), "exec")
        exec(code, {"__name__": "__docs__"})


def _examples(path: Path, root: Path = ROOT) -> list[Example]:
    text = path.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip().rsplit("\n", 1)[-1].strip()
        marker = _NOT_RUN.match(before)
        found.append(
            Example(
                page=path.relative_to(root).as_posix(),
                line=text.count("\n", 0, match.start()) + 1,
                source=match.group(1),
                not_run=marker.group(1) if marker else None,
            )
        )
    return found


EXAMPLES = [example for page in PAGES for example in _examples(page)]


def _runnable(pages: tuple[str, ...]) -> list[Example]:
    return [e for page in pages for e in EXAMPLES if e.page == page and e.not_run is None]


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary working directory, with ``INSITU_HOME`` at a workspace inside it."""
    monkeypatch.chdir(tmp_path)
    home = tmp_path / ".insitu"
    monkeypatch.setenv("INSITU_HOME", str(home))
    Workspace.init(home, name="docs")
    return tmp_path


@pytest.fixture(scope="module")
def adult_model() -> bytes:
    """A logistic model over the carried schema's encoded features, as a run exports it."""
    import torch

    from insitu.training import build_model, export_onnx
    from tests._adult import N_INPUTS

    torch.manual_seed(0)
    return export_onnx(build_model("logistic", N_INPUTS), N_INPUTS)


@pytest.fixture
def installed_model(here: Path, adult_model: bytes) -> None:
    """``adult-income`` installed by ``insitu update`` in the workspace INSITU_HOME names."""
    from tests.serve.conftest import make_site

    make_site(here / ".insitu", adult_model, name="adult-income")


#: What a page's examples need besides the working directory (a fixture's name).
NEEDS = {"docs/serving.md": "installed_model"}


def test_every_python_block_of_the_docs_is_collected() -> None:
    for page in PAGES:
        fences = page.read_text(encoding="utf-8").count("```python")
        assert fences == len(_examples(page)), f"{page.name}: a ```python block was not parsed"
    assert len(EXAMPLES) >= 5  # README, federated, optimize, and serving's two


def test_a_not_run_marker_names_the_next_block_only(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n<!-- not-run: needs a SuperLink -->\n```python\nserve()\n```\n\n"
        "```python\nx = 1\n```\n",
        encoding="utf-8",
    )
    marked, plain = _examples(page, root=tmp_path)
    assert (marked.id, marked.not_run, marked.source) == (
        "page.md:4",
        "needs a SuperLink",
        "serve()\n",
    )
    assert (plain.id, plain.not_run) == ("page.md:8", None)


@pytest.mark.parametrize(
    "example",
    [e for e in EXAMPLES if e.page not in FEDERATION_PAGES or e.not_run is not None],
    ids=lambda e: e.id,
)
def test_example(example: Example, here: Path, request: pytest.FixtureRequest) -> None:
    if example.not_run is not None:
        pytest.skip(f"not-run: {example.not_run}")
    if example.page in NEEDS:
        request.getfixturevalue(NEEDS[example.page])
    example.run()


@pytest.mark.slow
# Ray's leftovers (see tests/federated/conftest.py), never insitu's own.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_federated_example_and_the_examples_that_continue_from_its_run(here: Path) -> None:
    from insitu.data import read_table
    from insitu.datasets import builtin_data

    sample = read_table(builtin_data("adult")).sample(FEDERATION_ROWS, random_state=0)
    sample.to_csv(here / "adult.csv", index=False)
    examples = _runnable(FEDERATION_PAGES)
    assert {e.page for e in examples} == set(FEDERATION_PAGES)
    try:
        for example in examples:
            example.run()
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
    with Workspace.open().ledger() as ledger:
        assert ledger.entries(event_type="federation.completed")
        assert ledger.entries(event_type="model.optimized")
