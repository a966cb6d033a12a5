"""Output conventions shared by every command.

* Human output goes to stdout through Rich; ``--json`` replaces it with one JSON
  document on stdout (sorted keys, stable for scripts), nothing else on stdout.
* Errors are one line on stderr, ``error: <problem>; <fix>``, and the exit code of the
  :class:`~insitu.errors.InsituError` (1, or 2 for usage). ``--debug`` adds the traceback.
  Under ``--json`` a failure also prints one JSON object on stdout,
  ``{"error": <the line>, "exit_code": N, "type": <error class>}``, so a script reads
  every outcome from stdout; ``run()`` prints it unless the command wrote its own
  document before failing (see :func:`json_requested`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from rich.console import Console
from rich.markup import escape

from insitu._home import HOME_ENV

__all__ = [
    "HomeOption",
    "JsonOption",
    "err_console",
    "json_printed",
    "json_requested",
    "out",
    "print_error",
    "print_json",
    "print_json_error",
    "reset_json_state",
]

#: The width of output that is not a terminal (a cron mail, a CI log, a pipe): wide
#: enough that Rich never wraps a line or a table cell. At Rich's default of 80 columns a
#: digest or a path was split over lines, and a script reading the log lost it.
PLAIN_WIDTH = 10_000


def _console(stream: TextIO) -> Console:
    if stream.isatty() or os.environ.get("COLUMNS"):
        return Console(stderr=stream is sys.stderr, highlight=False)
    return Console(stderr=stream is sys.stderr, highlight=False, width=PLAIN_WIDTH)


out = _console(sys.stdout)
err_console = _console(sys.stderr)

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


class _JsonState:
    """What the running command did with ``--json`` (reset by ``run()`` before each)."""

    requested = False  # it parsed --json
    printed = False  # it wrote its JSON document


def _remember_json(value: bool) -> bool:
    if value:
        _JsonState.requested = True
    return value


def json_requested() -> bool:
    """Whether the running command parsed its ``--json`` option as given.

    Set by the option's callback: true only for a command that offers ``--json`` and
    read it as that option (not as another option's value).
    """
    return _JsonState.requested


def json_printed() -> bool:
    """Whether the running command has written its JSON document (one per command)."""
    return _JsonState.printed


def reset_json_state() -> None:
    """Start a command with neither ``--json`` seen nor a JSON document written."""
    _JsonState.requested = False
    _JsonState.printed = False


JsonOption = Annotated[
    bool,
    typer.Option(
        "--json", help="Print one JSON document instead of tables.", callback=_remember_json
    ),
]


def print_json(value: Any) -> None:
    """Write ``value`` as the command's JSON document."""
    _JsonState.printed = True
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def print_json_error(message: str, *, exit_code: int, error_type: str) -> None:
    """Write a failure as the command's JSON document (the line ``print_error`` shows).

    ``run()`` calls it only when the command has not written its own document (as
    ``audit verify`` does, with the verification's findings, before failing).
    """
    print_json({"error": message, "exit_code": exit_code, "type": error_type})


def print_error(message: str) -> None:
    """One line on stderr, never wrapped; the message is text, never Rich markup.

    (An error naming ``pip install 'insitu[data]'`` or a list ``[1, 2]`` keeps its
    brackets.)
    """
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, markup=True)
