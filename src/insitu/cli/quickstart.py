"""``insitu quickstart``: the first thing a newcomer runs.

The main job on the Adult census data insitu carries, through what exists so far: a
coordinator and five sites (each a workspace with its own keys, ledger and privacy
budget), each site preparing its part of the data under the data schema (minimized,
pseudonymized with its own key, consent applied), federated training on Flower's engine
with record-level DP (Opacus) and SecAgg+, the global model exported to ONNX, bundled
(signed, encrypted for the five sites) and published to a TUF repository served on
loopback, every site updating, verifying and running it in memory, and every ledger
verified, the coordinator's also through an export and Merkle proofs. Optimization, the
localhost server and the privacy audit join as they land.

Running it again on the same ``--out`` trains again on the same data: it spends the
sites' privacy budgets (epsilon 10 each by default), which refuse once exhausted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from insitu.audit import (
    check_proof,
    consistency_document,
    export_ledger,
    inclusion_document,
    verify_export,
)
from insitu.cli._app import app
from insitu.cli._output import JsonOption, err_console, out, print_json
from insitu.data import DataSchema, read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.federated import FederationConfig, RoundRecord, simulate
from insitu.workspace import Workspace

__all__ = ["quickstart"]


@app.command(rich_help_panel="Start here")
def quickstart(  # noqa: PLR0915 -- the main job, step by step
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where to create the demo workspaces and files.")
    ] = Path("insitu-quickstart"),
    sites: Annotated[int, typer.Option(min=3, help="Number of simulated sites.")] = 5,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 5,
    epsilon: Annotated[float, typer.Option(help="Record-level epsilon per site.")] = 3.0,
    json_output: JsonOption = False,
) -> None:
    """Run the whole job on the data insitu carries, and verify the evidence it leaves.

    [dim]Example:[/] insitu quickstart --out /tmp/demo --epsilon 1
    """
    started = time.perf_counter()
    steps: list[tuple[str, str]] = []
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=json_output,
    ) as progress:
        task = progress.add_task("quickstart", total=rounds + 5)

        def step(description: str, result: str) -> None:
            steps.append((description, result))
            progress.update(task, advance=1, description=description)

        coordinator, created = Workspace.init(out_dir / "coordinator", name="coordinator")
        step("workspace", f"{'created' if created else 'reused'} {coordinator.home}")
        with coordinator.ledger() as ledger:
            kept_head = ledger.sign_head()

        schema = DataSchema.load(builtin_schema("adult"))
        subjects = read_table(builtin_data("adult"))[schema.subject or ""].astype(str).tolist()
        # The sites' consent systems: everyone consented, one in a hundred withdrew since.
        consent = [(s, "training", "granted") for s in subjects]
        consent += [(s, "training", "withdrawn") for s in subjects[::100]]

        def on_round(record: RoundRecord) -> None:
            eps = max(record.epsilon_by_site.values(), default=0.0)
            progress.update(
                task,
                advance=1,
                description=f"round {record.round}: accuracy "
                f"{record.central_accuracy or 0:.3f}, epsilon {eps:.2f}",
            )

        config = FederationConfig(sites=sites, rounds=rounds, privacy="record", epsilon=epsilon)
        result = simulate(
            coordinator,
            builtin_data("adult"),
            config,
            schema=schema,
            consent=consent,
            on_round=on_round,
        )
        last = result.rounds[-1]
        steps.append(
            (
                "federated training",
                f"{sites} sites x {rounds} rounds, DP-SGD + SecAgg+: held-out accuracy "
                f"{result.central_accuracy:.4f}, epsilon per site "
                f"{max(last.epsilon_by_site.values(), default=0):.2f} (target {epsilon})",
            )
        )

        progress.update(task, description="bundle, publish, update the sites")
        shipped = _ship(coordinator, result, schema, epsilon, out_dir)
        step(
            "supply chain",
            f"{shipped['name']} {shipped['version']} signed and encrypted for {sites} sites "
            f"({shipped['bundle_bytes']:,} bytes), published to a TUF repository; every site "
            f"updated ({', '.join(sorted(set(shipped['methods'])))} download), verified and "
            f"loaded it in memory: local accuracy {shipped['local_accuracy']:.4f} on the "
            "sites' held-out records",
        )

        excluded = 0
        verified_entries = 0
        for home in result.site_homes:
            site = Workspace.open(home)
            with site.ledger() as ledger:
                verified_entries += ledger.verify().entries
                excluded += sum(
                    e.payload["excluded_without_consent"]
                    for e in ledger.entries(event_type="data.consent_applied")
                    if e.payload.get("role") == "training" and e.payload.get("round") == rounds
                )
        steps.append(
            (
                "sites",
                f"{verified_entries} ledger entries verified at {sites} sites; {excluded} "
                "training records left out of the last round for lack of consent",
            )
        )

        with coordinator.ledger() as ledger:
            verified = ledger.verify(trusted_head=kept_head)
            export_path = out_dir / "coordinator-ledger.jsonl"
            export_ledger(ledger, export_path)
            exported = verify_export(export_path, public_key=coordinator.signing_public_key)
            started_entry = ledger.entries(event_type="federation.started")[-1]
            inclusion = check_proof(
                inclusion_document(ledger, started_entry.seq), coordinator.signing_public_key
            )
            growth = check_proof(
                consistency_document(ledger, kept_head), coordinator.signing_public_key
            )
        step(
            "coordinator ledger",
            f"{verified.entries} entries verified; export verified with the pinned key "
            f"({exported.report.entries}); {inclusion.summary}; {growth.summary}",
        )

    summary: dict[str, Any] = {
        "coordinator": str(coordinator.home),
        "model_dir": str(result.model_dir),
        "central_accuracy": result.central_accuracy,
        "epsilon_target": epsilon,
        "epsilon_by_site": last.epsilon_by_site,
        "excluded_without_consent": excluded,
        "rounds": result.to_json()["rounds"],
        "ledgers_verified": 1 + len(result.site_homes),
        "bundle": shipped,
        "steps": [{"step": s, "result": r} for s, r in steps],
        "seconds": round(time.perf_counter() - started, 2),
    }
    if json_output:
        print_json(summary)
        return
    table = Table(title="insitu quickstart", title_justify="left")
    table.add_column("step", style="bold")
    table.add_column("result", overflow="fold")
    for description, text in steps:
        table.add_row(description, text)
    out.print(table)
    out.print(
        f"[bold green]done[/] in {summary['seconds']} s; model and training record: "
        f"{result.model_dir}"
    )


def _ship(
    coordinator: Workspace, result: Any, schema: DataSchema, epsilon: float, out_dir: Path
) -> dict[str, Any]:
    """Bundle the global model, publish it, and have every site update to it and run it."""
    import threading

    import numpy as np

    from insitu.bundle import bundle_model
    from insitu.data import SiteDataset
    from insitu.update import UpdateClient, init_directory_repository, open_directory_repository
    from insitu.update._serve import make_server

    name = schema.name
    with coordinator.ledger() as ledger:
        earlier = len(ledger.entries(event_type="bundle.created"))
    version = f"1.0.{earlier}"
    sites = [Workspace.open(home) for home in result.site_homes]
    spent = max(result.rounds[-1].epsilon_by_site.values(), default=epsilon)
    blob, bundle = bundle_model(
        coordinator,
        (result.model_dir / "model.onnx").read_bytes(),
        name=name,
        version=version,
        recipients=[site.encryption_public_key for site in sites],
        metrics={"accuracy": round(float(result.central_accuracy or 0.0), 4)},
        epsilon=max(spent, epsilon),
        delta=result.config.delta,
        data_schema_sha256=schema.digest(),
        description="Adult income (>50K), federated with DP-SGD and SecAgg+ by insitu quickstart.",
    )
    repo_dir = out_dir / "repository"
    if (repo_dir / "public" / "metadata" / "root.json").is_file():
        repository = open_directory_repository(repo_dir)
    else:
        repository = init_directory_repository(
            repo_dir, publishers=[coordinator.signing_public_key]
        )
    with coordinator.ledger() as ledger:
        repository.publish(
            blob,
            channels=["stable"],
            devices=[],
            publisher_key=coordinator.encryption_key(),
            max_deltas=2,
            ledger=ledger,
        )
    server = make_server(repo_dir, port=0)  # loopback, an ephemeral port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    methods: list[str] = []
    correct = total = 0
    try:
        for site in sites:
            update_dir = site.home / "update"
            if not (update_dir / "config.json").is_file():
                root = (repo_dir / "public" / "metadata" / "1.root.json").read_bytes()
                UpdateClient.enroll(update_dir, root=root, url=url, model=name)
            else:  # a rerun: the lab server's port changed
                UpdateClient.enroll(
                    update_dir, root=(update_dir / "root.json").read_bytes(), url=url, model=name
                )
            with site.ledger() as ledger:
                client = UpdateClient(update_dir, device_key=site.encryption_key(), ledger=ledger)
                outcome = client.update()
                methods.append(str(outcome.get("method", "none")))
                _, session = client.session()
            test_dir = site.home / "prepared" / schema.name / "test"
            data = SiteDataset.open(site, test_dir).for_round(role="inference")
            logits = session.run(None, {"features": data.features})[0].reshape(-1)
            correct += int(np.sum((logits > 0).astype(np.int64) == data.labels))
            total += len(data.labels)
    finally:
        server.shutdown()
        server.server_close()
    return {
        "name": name,
        "version": version,
        "bundle_bytes": len(blob),
        "bundle_id": bundle.bundle_id,
        "methods": methods,
        "local_accuracy": correct / total if total else 0.0,
    }
