"""The root Typer application and the process entry point.

``run(argv)`` is what ``insitu`` executes and what the tests call. Every failure
becomes one line on stderr (a traceback only under ``--debug``) and an exit code:

====  ==================================================================================
0     success (and ``--help``, ``--version``)
1     an :class:`~insitu.errors.InsituError` (its ``exit_code``), or an ``OSError`` that
      reached the top: the machine refused (disk full, permission denied, read-only
      folder); the line names the file, the reason and what to check
2     a usage error: :class:`~insitu.errors.UsageError` or Click's (the usage line first)
70    anything else (``EX_SOFTWARE``): a bug in insitu, never a failure a test may accept
      as a 1
130   interrupted (Ctrl+C) or aborted at a prompt
====  ==================================================================================

A command that offers ``--json`` and was given it also prints the failure as one JSON
object on stdout, ``{"error": <the line>, "exit_code": N, "type": <class name>}``,
unless it wrote its own document before failing (stdout holds one document).
"""

from __future__ import annotations

import errno
import gc
import logging
import sys
import traceback
from dataclasses import dataclass
from typing import Annotated, ClassVar

import click
import typer
from rich.logging import RichHandler
from rich.markup import escape

import insitu
from insitu.cli._lazy import LazyGroup, missing_dependency
from insitu.cli._output import (
    err_console,
    json_printed,
    json_requested,
    out,
    print_error,
    print_json_error,
    reset_json_state,
)
from insitu.errors import InsituError

__all__ = ["app", "main", "run"]

app = typer.Typer(
    name="insitu",
    cls=LazyGroup,
    help=(
        "Private AI where the data lives: federated training with differential privacy, "
        "signed and encrypted model bundles, local inference, and a verifiable audit ledger.\n\n"
        "Start with [bold]insitu quickstart[/], or [bold]insitu init[/] to create a workspace."
    ),
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class _State:
    debug = False


def _version(value: bool) -> None:
    if value:
        out.print(f"insitu {insitu.__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show debug logs and tracebacks of errors.")
    ] = False,
) -> None:
    _State.debug = debug
    _configure_logging(debug)


def _configure_logging(debug: bool) -> None:
    # The library never configures logging; the CLI is an application and does.
    logger = logging.getLogger("insitu")
    for old in list(logger.handlers):
        if getattr(old, "_insitu_cli", False):
            logger.removeHandler(old)
    handler: logging.Handler = (
        RichHandler(console=err_console, show_time=True, show_path=True, markup=False)
        if debug
        else _LineHandler()
    )
    handler._insitu_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    logger.propagate = False


class _LineHandler(logging.Handler):
    """One line per record on stderr, ``warning: ...`` as the CLI's own warnings read."""

    _STYLE: ClassVar[dict[str, str]] = {"WARNING": "yellow", "ERROR": "red", "CRITICAL": "red"}

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelname
        style = self._STYLE.get(level, "dim")
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 -- a bad format string must not kill the command
            self.handleError(record)
            return
        err_console.print(
            f"[{style}]{level.lower()}:[/] {escape(message)}", soft_wrap=True, highlight=False
        )


EX_SOFTWARE = 70  # sysexits.h: an internal software error, i.e. a bug
_INTERRUPTED = 130  # what a shell reports for a process ended by SIGINT

# What to check for the errno of an OSError that reached the top.
_OS_CHECKS = {
    errno.ENOSPC: "the free space on its disk",
    errno.EACCES: "the permissions of it and of its folder",
    errno.EPERM: "the permissions of it and of its folder",
    errno.EROFS: "that its file system is not mounted read-only",
    errno.ENOENT: "that it (and its folder) exists",
    errno.EMFILE: "the limit of open files (ulimit -n)",
    errno.ELOOP: "why a link is there, remove it or choose another path",
}


@dataclass(frozen=True)
class _Failure:
    """How a command failed: the line shown, the exit code, the exception's class name."""

    message: str
    exit_code: int
    type: str


def run(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    _State.debug = False
    reset_json_state()
    args = list(sys.argv[1:] if argv is None else argv)
    command = typer.main.get_command(app)
    sessions = _open_token_sessions()
    try:
        result = command.main(args=args, prog_name="insitu", standalone_mode=False)
    except click.exceptions.Exit as exc:
        # --help, --version or typer.Exit: not failures.
        return int(exc.exit_code)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 -- each gets its exit code
        failure = _show_failure(missing_dependency(exc, args) or exc)
        if _json_wanted(exc, args) and not json_printed():
            print_json_error(failure.message, exit_code=failure.exit_code, error_type=failure.type)
        return failure.exit_code
    finally:
        _close_token_sessions(sessions)
    # click returns the exit code of --help, --version and no-argument help here.
    return result if isinstance(result, int) else 0


def _open_token_sessions() -> frozenset[object]:
    """The PKCS#11 sessions open before a command (none unless a token was touched)."""
    if "insitu.workspace" not in sys.modules:  # no import at start-up for this
        return frozenset()
    from insitu.workspace import open_token_sessions

    return open_token_sessions()


def _close_token_sessions(before: frozenset[object]) -> None:
    """Release the token sessions the command opened, as its process's end would."""
    if "insitu.workspace" in sys.modules:
        from insitu.workspace import close_token_sessions

        if close_token_sessions(keep=before):
            # What else of PKCS#11 the command left in reference cycles (a module's
            # library object, model_signing's signer) is finalized now, not at some later
            # collection: until then tpm2-pkcs11 kept keys loaded in a TPM that holds three.
            gc.collect()


def _show_failure(exc: BaseException) -> _Failure:
    """Print the human line (stderr) for ``exc`` and say how the command failed."""
    kind = type(exc).__name__
    if isinstance(exc, click.ClickException):
        # Click's usage errors show the usage line, then the error; exit code 2.
        exc.show()
        return _Failure(exc.format_message(), exc.exit_code, kind)
    if isinstance(exc, click.exceptions.Abort | KeyboardInterrupt):
        message = "aborted" if isinstance(exc, click.exceptions.Abort) else "interrupted"
        print_error(message)
        return _Failure(message, _INTERRUPTED, kind)
    if _State.debug:
        traceback.print_exc()
    if isinstance(exc, InsituError):
        failure = _Failure(str(exc), exc.exit_code, kind)
    elif isinstance(exc, OSError):
        # The machine refused (disk full, permission denied, read-only folder): not a bug,
        # and the operator can fix it, so one line saying what to check; exit 1.
        failure = _Failure(_environment_failure(exc), 1, kind)
    else:
        # A bug: its own exit code, so that no test accepting a failure (1) passes on it.
        failure = _Failure(
            f"unexpected {kind}: {exc}; rerun with --debug for the traceback and report it "
            "if it looks like a bug",
            EX_SOFTWARE,
            kind,
        )
    print_error(failure.message)
    return failure


def _environment_failure(exc: OSError) -> str:
    """One line for an ``OSError`` no check anticipated: the file, the reason, what to check."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    check = _OS_CHECKS.get(exc.errno or 0)
    if exc.filename is None:
        return (
            f"the operating system refused an operation: {reason}; check "
            f"{check or 'the disk, the permissions and the network of this machine'}, "
            "then run the command again"
        )
    target = str(exc.filename)
    if exc.filename2 is not None:
        target += f" -> {exc.filename2}"
    return (
        f"cannot use {target}: {reason}; check "
        f"{check or 'its permissions and the free space on its disk'}, then run the command again"
    )


def _json_wanted(exc: BaseException, args: list[str]) -> bool:
    """Whether the failed command offers ``--json`` and was given it."""
    # The option's callback is the reliable witness: it runs only for a command that
    # offers --json, and only when the parser read the token as that option (not as the
    # value of another option, nor after "--"). A usage error can stop the parsing
    # before that callback runs (an unknown option, a bad value given before --json, a
    # missing argument); then the command that failed (the error's context) is asked
    # whether it offers --json, and the arguments whether they hold it. Scanning argv
    # alone would also answer for commands without --json, and for a "--json" value.
    if json_requested():
        return True
    ctx = exc.ctx if isinstance(exc, click.UsageError) else None
    if ctx is None:
        return False
    offered = any("--json" in getattr(param, "opts", ()) for param in ctx.command.params)
    given = args[: args.index("--")] if "--" in args else args
    return offered and "--json" in given


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
