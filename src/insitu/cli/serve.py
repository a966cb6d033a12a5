"""``insitu serve``, ``insitu predict`` and ``insitu explain``: local inference."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, err_console, out, print_json
from insitu.errors import CannotListenError, UsageError
from insitu.workspace import Workspace

if TYPE_CHECKING:
    pass

__all__ = ["explain", "predict", "serve"]

_PANEL = "Local inference"


@app.command(rich_help_panel=_PANEL)
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (an IP address).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8765,
    expose: Annotated[
        bool, typer.Option("--expose", help="Allow a non-loopback --host (needs TLS).")
    ] = False,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Most rows in one micro-batch.")] = 256,
    max_wait_ms: Annotated[
        float, typer.Option(min=0, help="Longest wait for a micro-batch to fill (ms).")
    ] = 1.0,
    uds: Annotated[
        Path | None,
        typer.Option(help="Listen on this Unix socket instead of --host and --port."),
    ] = None,
    isolate: Annotated[
        bool,
        typer.Option(
            "--isolate",
            help="Run in a network namespace of its own with no interface up (Linux); "
            "listens on a Unix socket (--uds, default HOME/serve.sock).",
        ),
    ] = False,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Serve the installed model on a localhost API (bearer token: keys/api-token).

    OpenAPI at /docs; the egress guard blocks non-loopback connections while serving.
    With --json, one JSON line on stdout says where, once the server listens.

    [dim]Examples:[/]

      insitu serve

      insitu serve --port 9000 --max-wait-ms 2

      insitu serve --isolate    # then: curl --unix-socket .insitu/serve.sock ...
    """
    from insitu.serve import check_bind
    from insitu.serve import serve as run_server

    ws = Workspace.open(home)
    if isolate:
        uds = _isolated_socket(ws, uds, max_batch, max_wait_ms, json_output)
    if uds is None:
        check_bind(host, expose=expose, certfile=tls_cert, keyfile=tls_key)
        _check_port_free(host, port)
        scheme = "https" if tls_cert else "http"
        url = f"{scheme}://{host}:{port}"
    else:
        _clear_stale_socket(uds)
        url = f"unix:{uds}"
    token_file = ws.keys_dir / "api-token"

    def started() -> None:
        if json_output:
            print_json({"serving": url, "docs": f"{url}/docs", "token_file": str(token_file)})
            out.file.flush()
        else:
            err_console.print(
                f"serving on {url} (docs at /docs, token in {token_file}); Ctrl+C stops"
            )

    run_server(
        ws,
        host=host,
        port=port,
        expose=expose,
        certfile=tls_cert,
        keyfile=tls_key,
        on_started=started,
        uds=uds,
        max_batch_rows=max_batch,
        max_wait=max_wait_ms / 1000,
    )


def _isolated_socket(
    ws: Workspace, uds: Path | None, max_batch: int, max_wait_ms: float, json_output: bool
) -> Path:
    """In the isolated process: its socket. Outside it: start it (this process ends)."""
    from insitu.serve import ISOLATED_ENV, check_isolated

    uds = (uds or ws.home / "serve.sock").absolute()
    if os.environ.get(ISOLATED_ENV) != "1":
        argv = ["serve", "--isolate", "--home", str(ws.home), "--uds", str(uds)]
        argv += ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
        _become_isolated([*argv, "--json"] if json_output else argv)
    check_isolated()
    return uds


def _become_isolated(argv: list[str]) -> NoReturn:
    """Replace this process with ``insitu argv`` in a new user and network namespace."""
    from insitu.serve import isolated_environment, isolation_command

    command = isolation_command(argv)
    out.file.flush()
    err_console.file.flush()
    os.execve(command[0], command, isolated_environment())  # noqa: S606 -- fixed argv


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a server that is gone; refuse anything else there."""
    import stat

    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"--uds {path} exists and is not a socket; choose another path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: a leftover
            return
    raise CannotListenError(f"a server already listens on {path}; stop it or choose another --uds")


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port already in use now, before the model is loaded.

    uvicorn binds the same way (``SO_REUSEADDR``) once the app has started; a port taken
    in between still fails there, and is reported as the same error.
    """
    if port == 0:
        return  # an ephemeral port is always free
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
    except OSError as exc:
        raise CannotListenError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port, "
            "or stop what holds this one"
        ) from exc


def _model_name(runtime: Any, model: str | None) -> str:
    if model is None:
        return str(runtime.names[0])
    if model not in runtime.names:
        raise UsageError(f"no model named {model!r}; installed: {', '.join(runtime.names)}")
    return model


@app.command(rich_help_panel=_PANEL)
def predict(
    model: Annotated[str, typer.Argument(help="Name of the installed model.")],
    input_file: Annotated[
        Path, typer.Argument(help="Input .csv, .csv.gz, .tsv or .parquet.", dir_okay=False)
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .csv or .parquet.")],
    schema: Annotated[
        Path | None,
        typer.Option(
            help="Encode raw records with this data schema (as in training); by default, "
            "the schema the model's card carries."
        ),
    ] = None,
    columns: Annotated[
        str | None,
        typer.Option(help="Comma-separated encoded input columns, in model order."),
    ] = None,
    chunk_rows: Annotated[int, typer.Option(min=1, help="Rows read per chunk.")] = 4096,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Predict every row of a file, streamed (files larger than memory work).

    Records are encoded by the data schema of the model's card (or --schema); a value
    outside the schema stops the run, naming its row and column. The output keeps the
    row key (the schema's identifier column, else the row number), the raw outputs, and
    the label and probability.

    [dim]Example:[/] insitu predict adult-income patients.csv -o out.csv
    """
    from insitu.data import DataSchema
    from insitu.runtime import ModelRuntime, predict_file

    ws = Workspace.open(home)
    parsed = DataSchema.load(schema) if schema else None
    total = input_file.stat().st_size if input_file.is_file() else None
    # No server here: every core goes to the model, threads spinning between chunks.
    threads = os.cpu_count() or 1
    with ModelRuntime.for_workspace(ws, threads=threads, spinning=True) as runtime:
        name = _model_name(runtime, model)
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[rows]:,} rows"),
            TimeElapsedColumn(),
            console=err_console,
            disable=json_output,
        ) as progress:
            task = progress.add_task(f"predicting with {name}", total=None, rows=0)
            summary = predict_file(
                runtime,
                name,
                input_file,
                output,
                schema=parsed,
                columns=columns.split(",") if columns else None,
                chunk_rows=chunk_rows,
                progress=lambda rows: progress.update(task, rows=rows),
            )
    summary |= {"output": str(output), "input_bytes": total}
    if json_output:
        print_json(summary)
    else:
        labelled = ", with labels and probabilities," if summary["labelled"] else ""
        out.print(
            f"[green]wrote[/] {summary['rows']:,} predictions of {name} {summary['version']}"
            f"{labelled} to {output} (keyed by {summary['key']})"
        )


@app.command(rich_help_panel=_PANEL)
def explain(
    model: Annotated[str, typer.Argument(help="Name of the installed model.")],
    input_file: Annotated[
        Path, typer.Argument(help="Rows to explain (.csv/.parquet, at most 16).", dir_okay=False)
    ],
    schema: Annotated[
        Path | None, typer.Option(help="Encode raw records with this data schema.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Also save a global importance plot (.png/.svg/.pdf).")
    ] = None,
    top: Annotated[int, typer.Option(min=1, help="Features to show per row.")] = 5,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Explain predictions: SHAP attributions against this site's own records.

    [dim]Example:[/] insitu explain adult-income three-rows.csv --schema adult.schema.toml
    """
    import numpy as np

    from insitu.data import DataSchema, FeatureEncoder, read_table
    from insitu.errors import InvalidInputError
    from insitu.runtime import Explainer, ModelRuntime, plot_global_importance
    from insitu.serve import site_background

    ws = Workspace.open(home)
    frame = read_table(input_file)
    names: list[str] | None = None
    if schema:
        encoder = FeatureEncoder.for_schema(DataSchema.load(schema))
        rows = encoder.encode(frame)
        names = encoder.names
    else:
        try:
            rows = frame.to_numpy(dtype=np.float64)
        except ValueError as exc:
            raise InvalidInputError(
                f"{input_file} holds non-numeric values; give --schema to encode raw records"
            ) from exc
    with ModelRuntime.for_workspace(ws) as runtime:
        name = _model_name(runtime, model)
        found = site_background(ws)(name)
        if found is None:
            raise InvalidInputError(
                f"no prepared data for {name!r} in {ws.prepared_dir(name).parent}: explanations "
                "compare with this site's records; prepare the data set here first"
            )
        loaded = runtime.get(name)
        with err_console.status("computing SHAP attributions...", spinner="dots"):
            result = Explainer(loaded, found[0], feature_names=names or found[1]).explain(rows)
        if plot is not None:
            plot_global_importance(result, plot)
    doc = {"model": name, "version": loaded.version, **result.to_json()}
    if plot is not None:
        doc["plot"] = str(plot)
    if json_output:
        print_json(doc)
        return
    table = Table(title=f"{name} {loaded.version}: why each prediction", title_justify="left")
    table.add_column("row", justify="right")
    table.add_column("output", justify="right")
    table.add_column(f"top {top} features (SHAP, output units)", overflow="fold")
    for index, values in enumerate(result.values):
        order = np.argsort(-np.abs(values))[:top]
        parts = [f"{result.feature_names[j]} {values[j]:+.3f}" for j in order]
        table.add_row(str(index), f"{result.outputs[index]:.3f}", ", ".join(parts))
    out.print(table)
    out.print(f"base value (mean output over the site's records): {result.base_value:.3f}")
