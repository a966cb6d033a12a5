"""Output conventions shared by every command.

* Human output goes to stdout through Rich; ``--json`` replaces it with one JSON
  document on stdout (sorted keys, stable for scripts), nothing else on stdout.
* Errors are one line on stderr, ``error: <problem>; <fix>``, and the exit code of the
  :class:`~insitu.errors.InsituError` (1, or 2 for usage). ``--debug`` adds the traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from insitu.workspace import HOME_ENV

__all__ = [
    "HomeOption",
    "JsonOption",
    "err_console",
    "out",
    "print_error",
    "print_json",
]

out = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home",
        envvar=HOME_ENV,
        # "\[" keeps Rich from reading the brackets as markup and dropping them.
        help=f"Workspace directory \\[default: ./.insitu, or ${HOME_ENV}].",
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON document instead of tables.")
]


def print_json(value: Any) -> None:
    """Write ``value`` as the command's JSON document."""
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def print_error(message: str) -> None:
    """One line on stderr, never wrapped."""
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=True)
