"""``insitu federate``: private federated training (Flower's engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, err_console, out, print_json
from insitu.data import load_schema
from insitu.federated import (
    DEFAULT_ADDRESS,
    FederationConfig,
    RoundRecord,
    join,
    make_certs,
    serve,
    simulate,
)
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

# Settings shared by 'simulate' and 'server' (one declaration each).
PrivacyOption = Annotated[
    str, typer.Option(help="record (DP-SGD at each site), site (DP-FedAvg) or none.")
]
EpsilonOption = Annotated[float, typer.Option(help="Target epsilon of this run, per site.")]
DeltaOption = Annotated[float, typer.Option(help="Target delta.")]
SecAggOption = Annotated[
    bool,
    typer.Option(
        "--secure-aggregation/--no-secure-aggregation",
        help="SecAgg+: the aggregator sees only the sum.",
    ),
]
RobustOption = Annotated[
    str, typer.Option(help="none, trimmed-mean or median (needs --no-secure-aggregation).")
]
ModelOption = Annotated[
    str, typer.Option(help="logistic, mlp, or cnn (a small GroupNorm CNN: array data).")
]
LocalEpochsOption = Annotated[int, typer.Option(min=1, help="Local epochs per round.")]
BatchSizeOption = Annotated[
    int,
    typer.Option(
        min=0,
        help="Expected batch size (Poisson sampling under DP); 0: from each site's size "
        "(1/4 of its records as a power of two, 8 to 256).",
    ),
]
LearningRateOption = Annotated[
    float,
    typer.Option(
        min=0.0,
        help="Local SGD learning rate; 0: by the server optimizer (2.0 FedAvg, 1.0 Adam/Yogi).",
    ),
]
ServerOptimizerOption = Annotated[
    str,
    typer.Option(
        help="auto (FedAdam; FedAvg for --model cnn), fedadam, fedyogi or fedavg: the "
        "server's step on the aggregated update (post-processing, no privacy cost)."
    ),
]
CenterOption = Annotated[
    bool,
    typer.Option(
        "--center-inputs/--no-center-inputs",
        help="Train on inputs centred on their declared ranges (the saved model takes the "
        "schema's encoding as it is).",
    ),
]
MinSitesOption = Annotated[
    int,
    typer.Option(
        min=0,
        show_default=False,
        help="Sites whose update a round needs to count (the quorum) \\[default: what "
        "SecAgg+ needs to unmask: 60% of the sites, at least 2; with secure aggregation, "
        "no lower is accepted].",
    ),
]


def _lost(missing: dict[str, str]) -> str:
    """The round's lost sites and why, or 0."""
    return ", ".join(f"{site} ({why})" for site, why in sorted(missing.items())) or "0"


def _site_accuracy(accuracy: float | None, evaluated: int, lost: int) -> str:
    """The sites' accuracy and how many sites it covers; "-" when none was measured."""
    if accuracy is None:
        return f"- (0 of {evaluated + lost} sites)" if evaluated + lost else "-"
    return f"{accuracy:.4f} ({evaluated} of {evaluated + lost} sites)"


@federate_app.command("simulate")
def simulate_command(
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="CSV or Parquet file to split into sites; or array data: an .npz of records "
            "and labels, or a folder of images with one subfolder per class.",
            exists=True,
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
    privacy: PrivacyOption = "record",
    epsilon: EpsilonOption = 3.0,
    delta: DeltaOption = 1e-5,
    secure_aggregation: SecAggOption = True,
    robust: RobustOption = "none",
    model: ModelOption = "logistic",
    local_epochs: LocalEpochsOption = 1,
    batch_size: BatchSizeOption = 0,
    learning_rate: LearningRateOption = 0.0,
    server_optimizer: ServerOptimizerOption = "auto",
    center_inputs: CenterOption = True,
    min_sites: MinSitesOption = 0,
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
    seed: Annotated[
        int,
        typer.Option(help="Seed of the initial model (DP noise and sampling are never seeded)."),
    ] = 0,
    evaluation_epsilon: Annotated[
        float, typer.Option(help="What the sites' final evaluation costs each held-out record.")
    ] = 0.5,
    inference_epsilon: Annotated[
        float, typer.Option(help="What inferring the schema (--label) costs each record.")
    ] = 0.5,
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
      insitu federate simulate --data digits.npz -s digits.schema.toml --model cnn --sites 3
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
        server_optimizer=server_optimizer,  # type: ignore[arg-type]
        center_inputs=center_inputs,
        min_sites=min_sites,
        seed=seed,
        evaluation_epsilon=evaluation_epsilon,
        inference_epsilon=inference_epsilon,
    )
    ws = Workspace.open(home)
    parsed = load_schema(schema) if schema else None
    table = Table(title="federated rounds", title_justify="left")
    for column in (
        "round",
        "sites",
        "lost",
        "accuracy (sites)",
        "accuracy (held out)",
        "epsilon this run",
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
                description=f"round {record.round}: {record.summary(sites)}",
            )
            table.add_row(
                str(record.round),
                str(record.sites_ok),
                _lost(record.missing),
                _site_accuracy(
                    record.accuracy, record.sites_evaluated, len(record.evaluation_missing)
                ),
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
    for site in result.sites:
        left = f"; {site.excluded_over_budget} subjects left out (budget spent)"
        out.print(
            f"{site.site}: epsilon {site.epsilon_run:.3f} this run, {site.epsilon_spent_max:.3f} "
            f"the most any subject has spent here so far"
            + (left if site.excluded_over_budget else "")
        )
    out.print(f"defaults: {config.rules()}")
    out.print(f"kept: {result.kept_because}")
    out.print(
        f"model: {result.model_dir} (model.onnx, model.pt, record.json); held-out accuracy "
        f"{result.central_accuracy:.4f}; {result.seconds:.1f} s"
        + ("" if config.privacy == "none" else "; DP noise is secret: not reproducible")
    )
    if result.baseline_accuracy is not None:
        out.print(
            f"baseline: non-private central logistic regression on the pooled records "
            f"{result.baseline_accuracy:.4f} on the same held-out rows (simulation only); "
            f"gap {100 * (result.baseline_accuracy - (result.central_accuracy or 0.0)):.1f} points"
        )


@federate_app.command("certs")
def certs_command(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Directory to write the federation's certificates to.")
    ],
    site: Annotated[
        list[str],
        typer.Option("--site", help="A site name (repeat for each site); one key per site."),
    ],
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="Another name or IP the server is reached at (127.0.0.1 and localhost "
            "are always included).",
        ),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity of the certificates, in days.")] = 365,
    force: Annotated[
        bool, typer.Option("--force", help="Replace certificates that exist already.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Create a federation's CA, the server's TLS certificate and one key per site.

    Give [bold]ca.pem[/] and [bold]sites/NAME.key[/] to each site; the server registers
    every [bold]sites/*.pub[/]. Private keys are written 0600. To use your own CA, put
    ca.pem, server.pem and server.key in a directory and pass it to the server.

    [dim]Example:[/]
      insitu federate certs --out fed-certs --site hospital-a --site hospital-b --site hospital-c
    """
    made = make_certs(out_dir, sites=site, hosts=tuple(host or ()), days=days, force=force)
    summary = {
        "directory": str(made.directory),
        "ca": str(made.ca),
        "server_cert": str(made.server_cert),
        "server_key": str(made.server_key),
        "sites": {
            s: {"key": str(made.site_key(s)), "public": str(made.site_public(s))} for s in site
        },
    }
    if json_output:
        print_json(summary)
        return
    out.print(f"CA and server certificate in {made.directory}")
    for name in site:
        out.print(f"  {name}: give it {made.ca} and {made.site_key(name)}")


@federate_app.command("server")
def server_command(
    schema: Annotated[
        Path,
        typer.Option(
            "--schema",
            "-s",
            help="Data schema (TOML) every site uses: a table's, or an array schema.",
            exists=True,
            dir_okay=False,
        ),
    ],
    certs: Annotated[
        Path,
        typer.Option(
            "--certs",
            help="Directory with ca.pem, server.pem, server.key and sites/*.pub.",
            exists=True,
            file_okay=False,
        ),
    ],
    sites: Annotated[int, typer.Option(min=1, help="Sites that must connect.")] = 3,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 5,
    address: Annotated[
        str, typer.Option(help="HOST:PORT the SuperLink listens on (HTTPS).")
    ] = DEFAULT_ADDRESS,
    site_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--site-key",
            help="A site public key to register (repeatable) [default: <certs>/sites/*.pub].",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    privacy: PrivacyOption = "record",
    epsilon: EpsilonOption = 3.0,
    delta: DeltaOption = 1e-5,
    secure_aggregation: SecAggOption = True,
    robust: RobustOption = "none",
    model: ModelOption = "logistic",
    local_epochs: LocalEpochsOption = 1,
    batch_size: BatchSizeOption = 0,
    learning_rate: LearningRateOption = 0.0,
    server_optimizer: ServerOptimizerOption = "auto",
    center_inputs: CenterOption = True,
    min_sites: MinSitesOption = 0,
    timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait for the run to finish.")
    ] = 3600.0,
    seed: Annotated[int, typer.Option(help="Seed of the initial model.")] = 0,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            metavar="RUN",
            help="Go on with stopped run RUN from its last checkpoint, with its own "
            "settings (the training options are not used).",
        ),
    ] = None,
    attest: Annotated[
        Path | None,
        typer.Option(
            "--attest",
            metavar="ALLOWLIST",
            help="Admit a site only after a fresh TPM quote of its measured insitu build "
            "that this allow-list of measured states (TOML) allows; each site's attestation "
            "key is <certs>/sites/NAME.ak.pem. Off by default.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    ek_ca: Annotated[
        Path | None,
        typer.Option(
            "--ek-ca",
            metavar="CA.pem",
            help="With --attest: the TPM vendors' CA certificates (PEM). A site's AK must "
            "then be bound to its TPM's EK certificate chaining to them (the nonce is sent "
            "as a credential only that TPM recovers). Without it, the AK is trusted on "
            "first use.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Run a federation's server: a Flower SuperLink over TLS that admits registered sites.

    Starts Flower's SuperLink with SuperNode authentication on loopback, registers the
    site keys, opens --address to the Fleet API only (sites cannot reach the Control or
    ServerAppIo API), runs one federated run (the same strategy, SecAgg+ and ledger
    records as [bold]simulate[/]), checkpointing after every round, and stops. The model
    goes to [bold]<home>/models/<run>/[/]. After a crash, [bold]--resume RUN[/] goes on
    from the last checkpoint.

    [dim]Example:[/]
      insitu federate server -s adult.schema.toml --certs fed-certs --sites 3 --rounds 5
      insitu federate server -s adult.schema.toml --certs fed-certs --resume 20261207T1500Z-1a2b3c
      insitu federate server -s digits.schema.toml --model cnn --certs fed-certs --sites 3
    """
    config = FederationConfig(
        sites=sites,
        rounds=rounds,
        privacy=privacy,  # type: ignore[arg-type]
        epsilon=epsilon,
        delta=delta,
        secure_aggregation=secure_aggregation,
        robust=robust,  # type: ignore[arg-type]
        model=model,  # type: ignore[arg-type]
        local_epochs=local_epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        server_optimizer=server_optimizer,  # type: ignore[arg-type]
        center_inputs=center_inputs,
        min_sites=min_sites,
        seed=seed,
    )
    ws = Workspace.open(home)
    parsed = load_schema(schema)  # a table's, or an array schema (images, signals)

    def status(text: str) -> None:
        if not json_output:
            err_console.print(text)

    result = serve(
        ws,
        config,
        schema=parsed,
        certs=certs,
        site_keys=site_key,
        address=address,
        timeout=timeout,
        resume=resume,
        on_status=status,
        attest=attest,
        ek_ca=ek_ca,
    )
    if json_output:
        print_json(result.to_json())
        return
    table = Table(title=f"run {result.run_id}", title_justify="left")
    for column in ("round", "sites", "lost", "accuracy (sites)", "epsilon (max site)"):
        table.add_column(column)
    for record in result.rounds:
        eps = max(record["epsilon_by_site"].values(), default=0.0)
        table.add_row(
            str(record["round"]),
            str(record["sites_ok"]),
            _lost(record.get("missing", {})),
            _site_accuracy(
                record["accuracy"],
                int(record.get("sites_evaluated", 0)),
                len(record.get("evaluation_missing", {})),
            ),
            f"{eps:.3f}",
        )
    out.print(table)
    out.print(
        f"model: {result.model_dir} (model.onnx, model.pt, record.json); {result.seconds:.1f} s"
    )


@federate_app.command("site")
def site_command(
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="This site's own CSV or Parquet file, or its array data (.npz, or a folder "
            "of images with one subfolder per class).",
        ),
    ],
    schema: Annotated[
        Path,
        typer.Option(
            "--schema",
            "-s",
            help="The federation's data schema (TOML).",
            exists=True,
            dir_okay=False,
        ),
    ],
    ca: Annotated[
        Path, typer.Option("--ca", help="The federation's CA certificate (ca.pem).", dir_okay=False)
    ],
    key: Annotated[
        Path,
        typer.Option(
            "--key", help="This site's authentication key (sites/NAME.key).", dir_okay=False
        ),
    ],
    server: Annotated[str, typer.Option(help="The server's HOST:PORT.")] = DEFAULT_ADDRESS,
    name: Annotated[
        str | None, typer.Option(help="This site's name [default: the key's file name].")
    ] = None,
    retries: Annotated[
        int, typer.Option(min=0, help="Connection retries, with exponential backoff.")
    ] = 5,
    once: Annotated[
        bool,
        typer.Option(
            "--once", help="Stop once the server has ended the first run this site took part in."
        ),
    ] = False,
    give_up_after: Annotated[
        float,
        typer.Option(
            "--give-up-after",
            min=1.0,
            help="Seconds without an answer from the server before the site stops (exit 1).",
        ),
    ] = 60.0,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    r"""Take part in a federation as one site: a Flower SuperNode that trains here.

    Checks the server and its certificate first, prepares [bold]--data[/] under the
    schema in this site's own workspace (pseudonymized with its key, sealed), then trains
    when the server asks, within this site's own privacy budget. Runs until interrupted,
    or one run with [bold]--once[/]: the SuperNode stays up until the server says the run
    ended, so its last reply is collected. Stopping this command (Ctrl-C, SIGTERM) stops
    the SuperNode and every process it started.

    [dim]Example:[/]
      insitu federate site --home site-a --data a.csv -s adult.schema.toml \
        --ca fed-certs/ca.pem --key fed-certs/sites/hospital-a.key --server 127.0.0.1:9092
    """
    from insitu.workspace import resolve_home

    def status(text: str) -> None:
        if not json_output:
            err_console.print(text)

    result = join(
        resolve_home(home),
        data,
        schema=load_schema(schema),
        server=server,
        ca=ca,
        key=key,
        name=name,
        retries=retries,
        once=once,
        on_status=status,
        give_up_after=give_up_after,
    )
    if json_output:
        print_json(result.to_json())
        return
    out.print(f"{result.site}: took part in {len(result.runs)} run(s); ledger in {result.home}")
