"""``insitu federate``: private federated training (Flower's engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, err_console, out, print_json
from insitu.data import DataSchema
from insitu.federated import FederationConfig, RoundRecord, simulate
from insitu.workspace import Workspace

__all__ = ["federate_app"]

federate_app = typer.Typer(
    help=(
        "Train one model across sites without moving a record: DP-SGD per record or "
        "DP-FedAvg per site, SecAgg+ secure aggregation, and privacy budgets that each "
        "site enforces across all its trainings."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(federate_app, name="federate", rich_help_panel="Training")


@federate_app.command("simulate")
def simulate_command(
    data: Annotated[
        Path,
        typer.Option(
            "--data", help="CSV or Parquet file to split into sites.", exists=True, dir_okay=False
        ),
    ],
    schema: Annotated[
        Path | None,
        typer.Option(
            "--schema",
            "-s",
            help="Data schema (TOML); or give --label.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    label: Annotated[
        str | None,
        typer.Option(help="Label column (the schema is then inferred: simulation only)."),
    ] = None,
    sites: Annotated[int, typer.Option(min=1, help="Number of simulated sites.")] = 5,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 5,
    partition: Annotated[
        str, typer.Option(help="iid, by:COLUMN or dirichlet:ALPHA (label skew).")
    ] = "iid",
    privacy: Annotated[
        str, typer.Option(help="record (DP-SGD at each site), site (DP-FedAvg) or none.")
    ] = "record",
    epsilon: Annotated[float, typer.Option(help="Target epsilon of this run, per site.")] = 3.0,
    delta: Annotated[float, typer.Option(help="Target delta.")] = 1e-5,
    secure_aggregation: Annotated[
        bool,
        typer.Option(
            "--secure-aggregation/--no-secure-aggregation",
            help="SecAgg+: the aggregator sees only the sum.",
        ),
    ] = True,
    robust: Annotated[
        str, typer.Option(help="none, trimmed-mean or median (needs --no-secure-aggregation).")
    ] = "none",
    model: Annotated[str, typer.Option(help="logistic or mlp.")] = "logistic",
    local_epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round.")] = 1,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Expected batch size (Poisson sampling under DP).")
    ] = 256,
    learning_rate: Annotated[float, typer.Option(help="Local SGD learning rate.")] = 2.0,
    min_sites: Annotated[
        int, typer.Option(min=0, help="Sites needed for a round to count [default: all].")
    ] = 0,
    consent: Annotated[
        Path | None,
        typer.Option(
            help="Consent CSV every site imports (subject,purpose,status).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    site_budget: Annotated[
        float | None, typer.Option(help="Privacy budget (epsilon) of sites this run creates.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of partitioning and initialization.")] = 0,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Train across simulated sites on this machine with Flower's simulation engine.

    Each site is a workspace of its own under [bold]<home>/sites/[/] (keys, ledger, budget),
    so budgets hold across runs. The global model (PyTorch and ONNX) and a training record
    go to [bold]<home>/models/<run>/[/].

    [dim]Examples:[/]
      insitu federate simulate --data adult.csv --label income --sites 5 --rounds 10 --epsilon 1
      insitu federate simulate --data adult.csv -s adult.schema.toml --partition dirichlet:0.5
    """
    config = FederationConfig(
        sites=sites,
        rounds=rounds,
        partition=partition,
        privacy=privacy,  # type: ignore[arg-type]
        epsilon=epsilon,
        delta=delta,
        secure_aggregation=secure_aggregation,
        robust=robust,  # type: ignore[arg-type]
        model=model,  # type: ignore[arg-type]
        local_epochs=local_epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        min_sites=min_sites,
        seed=seed,
    )
    ws = Workspace.open(home)
    parsed = DataSchema.load(schema) if schema else None
    table = Table(title="federated rounds", title_justify="left")
    for column in (
        "round",
        "sites",
        "failed",
        "accuracy (sites)",
        "accuracy (held out)",
        "epsilon (max site)",
    ):
        table.add_column(column)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=json_output,
    ) as progress:
        task = progress.add_task("federated training", total=rounds)

        def on_round(record: RoundRecord) -> None:
            eps = max(record.epsilon_by_site.values(), default=0.0)
            progress.update(
                task,
                completed=record.round,
                description=(
                    f"round {record.round}: accuracy {record.central_accuracy or 0:.3f}, "
                    f"epsilon {eps:.2f}"
                ),
            )
            table.add_row(
                str(record.round),
                str(record.sites_ok),
                str(record.failures),
                f"{record.accuracy:.4f}" if record.accuracy is not None else "-",
                f"{record.central_accuracy:.4f}" if record.central_accuracy is not None else "-",
                f"{eps:.3f}",
            )

        result = simulate(
            ws,
            data,
            config,
            schema=parsed,
            label=label,
            consent=consent,
            site_epsilon_budget=site_budget,
            on_round=on_round,
        )
    if json_output:
        print_json(result.to_json())
        return
    out.print(table)
    out.print(
        f"model: {result.model_dir} (model.onnx, model.pt, record.json); held-out accuracy "
        f"{result.central_accuracy:.4f}; {result.seconds:.1f} s"
    )
