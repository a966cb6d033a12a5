"""The root Typer application and the process entry point.

``run(argv)`` is what ``insitu`` executes and what the tests call: it turns every
:class:`~insitu.errors.InsituError` into one line on stderr and its exit code, usage
errors into exit 2, and shows a traceback only under ``--debug``.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Annotated

import click
import typer
from rich.logging import RichHandler

import insitu
from insitu.cli._output import err_console, out, print_error
from insitu.errors import InsituError

__all__ = ["app", "main", "run"]

app = typer.Typer(
    name="insitu",
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
    for handler in list(logger.handlers):
        if getattr(handler, "_insitu_cli", False):
            logger.removeHandler(handler)
    handler = RichHandler(console=err_console, show_time=debug, show_path=debug, markup=False)
    handler._insitu_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    logger.propagate = False


def run(argv: list[str] | None = None) -> int:  # noqa: PLR0911 -- one return per outcome
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    _State.debug = False
    args = list(sys.argv[1:] if argv is None else argv)
    command = typer.main.get_command(app)
    try:
        result = command.main(args=args, prog_name="insitu", standalone_mode=False)
    except InsituError as exc:
        if _State.debug:
            traceback.print_exc()
        print_error(str(exc))
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        # Click's usage errors show the usage line, then the error; exit code 2.
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        print_error("aborted")
        return 130
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 -- a bug, or an environment failure no check anticipated
        if _State.debug:
            traceback.print_exc()
        print_error(
            f"unexpected {type(exc).__name__}: {exc}; rerun with --debug for the traceback "
            "and report it if it looks like a bug"
        )
        return 1
    # click returns the exit code of --help, --version and no-argument help here.
    return result if isinstance(result, int) else 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
