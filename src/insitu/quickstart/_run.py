"""The quickstart as a library: the main job, step by step, on the data insitu carries.

:func:`run_quickstart` runs a fixed list of steps (:data:`STEPS`), each recorded in the
coordinator's ledger (``quickstart.step``): a coordinator and five sites (each a
workspace with its own keys, ledger and per-subject privacy budget), each site preparing
its part of the data under the data schema (minimized, pseudonymized with its own key,
consent applied); federated training on Flower's engine with record-level DP (Opacus,
secret noise) and SecAgg+, each site recording what it sends; a membership-inference
audit and a one-run white-box audit of the trained model, and a non-private baseline;
the model exported to ONNX and optimized for the edge (calibrated on declared public
rows), bundled (signed, encrypted for the sites) and published to a TUF repository served
on loopback, every site updating, verifying and running it in memory, then serving it on
loopback; every ledger verified; and the compliance report written from the ledgers.
``insitu quickstart`` parses its options, calls this and prints the result.

Running it again on the same ``out_dir`` trains again on the same data: it spends the
sites' budgets (epsilon 10 per subject by default); subjects out of budget are left out,
and a round no site can run ends the run with no model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from insitu.audit import (
    check_proof,
    consistency_document,
    export_ledger,
    inclusion_document,
    verify_export,
)
from insitu.data import DataSchema, read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.federated import FederatedResult, FederationConfig, RoundRecord, simulate
from insitu.quickstart._steps import (
    STEPS,
    StepResult,
    audit_membership_of,
    declare_processing,
    record_step,
)
from insitu.workspace import Workspace

__all__ = ["QuickstartResult", "QuickstartSettings", "run_quickstart"]


@dataclass(frozen=True)
class QuickstartSettings:
    """What the quickstart runs: where, how many sites and rounds, at which epsilon."""

    out_dir: Path = Path("insitu-quickstart")
    sites: int = 5
    rounds: int = 5
    epsilon: float = 3.0
    #: 5 local epochs with rate 1.0: the settings tuned on this public data
    #: (benchmarks/federated_bench.py).
    local_epochs: int = 5
    #: A random sample of this many rows (a quicker look); all rows by default.
    rows: int | None = None


@dataclass
class QuickstartResult:
    """Every step's outcome and the summary figures (what ``--json`` prints)."""

    settings: QuickstartSettings
    steps: list[StepResult]
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def step(self, name: str) -> StepResult:
        """The step named ``name``."""
        return next(s for s in self.steps if s.step == name)

    def to_json(self) -> dict[str, Any]:
        """The summary, the steps and the time taken."""
        return {
            **self.summary,
            "steps": [s.to_json() for s in self.steps],
            "seconds": round(self.seconds, 2),
        }


#: Called at the start of each step with a short description (a progress display).
Progress = Callable[[str], None]


class _Steps:
    """Runs and records the steps in order (the state one step hands to the next)."""

    def __init__(
        self,
        settings: QuickstartSettings,
        on_step: Progress | None,
        on_round: Callable[[RoundRecord], None] | None,
    ) -> None:
        self.settings = settings
        self.on_step = on_step or (lambda _: None)
        self.on_round = on_round
        self.results: dict[str, StepResult] = {}
        self._since = time.perf_counter()

    def begin(self, description: str) -> None:
        self.on_step(description)
        self._since = time.perf_counter()

    def done(self, result: StepResult) -> StepResult:
        if not result.seconds:  # steps that time themselves keep their own figure
            result.seconds = time.perf_counter() - self._since
        self.results[result.step] = result
        return result

    # -- the steps -------------------------------------------------------------------

    def workspaces(self) -> tuple[Workspace, Any, DataSchema, pd.DataFrame]:
        s = self.settings
        self.begin("creating the coordinator's workspace")
        coordinator, created = Workspace.init(s.out_dir / "coordinator", name="coordinator")
        with coordinator.ledger() as ledger:
            kept_head = ledger.sign_head()
        schema = DataSchema.load(builtin_schema("adult"))
        frame = read_table(builtin_data("adult"))
        if s.rows is not None and s.rows < len(frame):
            frame = frame.sample(n=s.rows, random_state=0).reset_index(drop=True)
        declare_processing(coordinator, schema, s.sites)
        self.done(
            StepResult(
                "workspaces",
                "ok",
                f"{'created' if created else 'reused'} {coordinator.home} and {s.sites} site "
                f"workspaces under it; {len(frame):,} records of {schema.name}",
                {"records": len(frame), "sites": s.sites},
            )
        )
        return coordinator, kept_head, schema, frame

    def training(
        self, coordinator: Workspace, schema: DataSchema, frame: pd.DataFrame
    ) -> FederatedResult:
        s = self.settings
        self.begin("federated training: preparing the sites' data")
        subjects = frame[schema.subject or ""].astype(str).tolist()
        # The sites' consent systems: everyone consented, one in a hundred withdrew since.
        consent = [(x, "training", "granted") for x in subjects]
        consent += [(x, "training", "withdrawn") for x in subjects[::100]]
        config = FederationConfig(
            sites=s.sites,
            rounds=s.rounds,
            privacy="record",
            epsilon=s.epsilon,
            local_epochs=s.local_epochs,
            learning_rate=1.0 if s.local_epochs > 1 else FederationConfig.learning_rate,
        )
        # simulate() raises RoundFailedError (and records federation.failed) for a round
        # with fewer sites than required: a result here completed every round.
        result = simulate(
            coordinator, frame, config, schema=schema, consent=consent, on_round=self.on_round
        )
        self.done(
            StepResult(
                "federated training",
                "ok",
                f"{s.sites} sites x {s.rounds} rounds, DP-SGD + SecAgg+: accuracy "
                f"{result.central_accuracy:.4f} on the coordinator's hold-out, epsilon of this "
                f"run {result.epsilon_run:.2f} (target {s.epsilon}); most any subject spent "
                f"so far {max(x.epsilon_spent_max for x in result.sites):.2f}",
                {
                    "run": result.run_id,
                    "central_accuracy": result.central_accuracy,
                    "epsilon_by_site": {x.site: x.epsilon_run for x in result.sites},
                    "epsilon_spent_max_by_site": {
                        x.site: x.epsilon_spent_max for x in result.sites
                    },
                },
            )
        )
        for name in ("workspaces", "federated training"):
            record_step(coordinator, result.run_id, self.results[name])
        return result

    def audit(self, coordinator: Workspace, result: FederatedResult, schema: DataSchema) -> None:
        self.begin("auditing the model (membership inference, one-run) and the baseline")
        audit, baseline = audit_membership_of(
            coordinator,
            run_id=result.run_id,
            model_dir=result.model_dir,
            site_homes=result.site_homes,
            schema=schema,
            epsilon=result.epsilon_run,
            delta=result.config.delta,
        )
        for step in (self.done(baseline), self.done(audit)):
            record_step(coordinator, result.run_id, step)

    def optimize(
        self, coordinator: Workspace, result: FederatedResult, frame: pd.DataFrame
    ) -> bytes:
        self.begin("optimizing the model for the edge (measured on this machine)")
        optimized, shipped_onnx = _optimize_step(coordinator, result, frame)
        record_step(coordinator, result.run_id, self.done(optimized))
        return shipped_onnx

    def ship(
        self, coordinator: Workspace, result: FederatedResult, schema: DataSchema, onnx: bytes
    ) -> dict[str, Any]:
        s = self.settings
        self.begin("bundle, sign, encrypt, publish; every site updates")
        shipped = _ship(
            coordinator, result, schema, epsilon=s.epsilon, out_dir=s.out_dir, model=onnx
        )
        step = StepResult(
            "supply chain",
            "ok",
            f"{shipped['name']} {shipped['version']} signed and encrypted for {s.sites} sites "
            f"({shipped['bundle_bytes']:,} bytes), published to a TUF repository; every "
            f"site updated ({', '.join(sorted(set(shipped['methods'])))} download), "
            f"verified and loaded it in memory: local accuracy "
            f"{shipped['local_accuracy']:.4f}",
            shipped,
        )
        record_step(coordinator, result.run_id, self.done(step))
        return shipped

    def serve(self, coordinator: Workspace, result: FederatedResult, schema: DataSchema) -> None:
        self.begin("every site serves the model on loopback: predict and explain")
        record_step(coordinator, result.run_id, self.done(_serve_step(result, schema)))

    def ledgers(self, coordinator: Workspace, result: FederatedResult, kept_head: Any) -> None:
        s = self.settings
        self.begin("verifying every ledger")
        step = _verify_ledgers(coordinator, result.site_homes, kept_head, s.out_dir, s.rounds)
        record_step(coordinator, result.run_id, self.done(step))

    def report(self) -> Path:
        from insitu.report import write_report

        out_dir = self.settings.out_dir
        self.begin("writing the compliance report")
        report_path = out_dir / "report.html"
        written = write_report(
            [out_dir], report_path, command=f"insitu report {out_dir} --out {report_path}"
        )
        self.done(
            StepResult(
                "report",
                "ok",
                f"{report_path} ({len(written.evidence.ledgers)} ledgers and "
                f"{len(written.evidence.artefacts)} artefacts verified)",
                {"path": str(report_path)},
            )
        )
        return report_path


def run_quickstart(
    settings: QuickstartSettings | None = None,
    *,
    on_step: Progress | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> QuickstartResult:
    """Run every step of the quickstart (see the module docstring) and return the figures.

    ``on_step`` is called with a description as each step starts, ``on_round`` after
    each federated round (progress displays).

    Raises:
        InsituError: a step failed (its error names the step's problem and fix).

    """
    settings = settings or QuickstartSettings()
    started = time.perf_counter()
    steps = _Steps(settings, on_step, on_round)
    coordinator, kept_head, schema, frame = steps.workspaces()
    result = steps.training(coordinator, schema, frame)
    steps.audit(coordinator, result, schema)
    shipped_onnx = steps.optimize(coordinator, result, frame)
    shipped = steps.ship(coordinator, result, schema, shipped_onnx)
    steps.serve(coordinator, result, schema)
    steps.ledgers(coordinator, result, kept_head)
    report_path = steps.report()
    results = steps.results
    baseline, audit = results["baseline"], results["privacy audit"]
    optimized, served, ledgers = results["optimize"], results["serve"], results["ledgers"]
    summary: dict[str, Any] = {
        "coordinator": str(coordinator.home),
        "model_dir": str(result.model_dir),
        "run": result.run_id,
        "central_accuracy": result.central_accuracy,
        "private_accuracy": baseline.figures["private_accuracy"],
        "baseline_accuracy": baseline.figures["baseline_accuracy"],
        "epsilon_target": settings.epsilon,
        "epsilon_run": result.epsilon_run,
        "epsilon_by_site": {site.site: site.epsilon_run for site in result.sites},
        "epsilon_spent_max_by_site": {site.site: site.epsilon_spent_max for site in result.sites},
        "attack_auc": audit.figures["attack_auc"],
        "one_run_lower_bound": audit.figures.get("one_run_lower_bound"),
        "model_bytes_before": len((result.model_dir / "model.onnx").read_bytes()),
        "model_bytes_after": optimized.figures.get("model_bytes_after"),
        "p50_ms": served.figures.get("p50_ms", optimized.figures.get("p50_ms")),
        "excluded_without_consent": ledgers.figures["excluded_without_consent"],
        "rounds": result.to_json()["rounds"],
        "ledgers_verified": ledgers.figures["ledgers_verified"],
        "bundle": shipped,
        "report": str(report_path),
    }
    return QuickstartResult(
        settings,
        [results[name] for name in STEPS if name in results],
        summary,
        time.perf_counter() - started,
    )


def _verify_ledgers(
    coordinator: Workspace, site_homes: list[Path], kept_head: Any, out_dir: Path, rounds: int
) -> StepResult:
    """Verify every site's ledger and the coordinator's (with an export and proofs)."""
    excluded = 0
    entries = 0
    for home in site_homes:
        site = Workspace.open(home)
        with site.ledger() as ledger:
            entries += ledger.verify().entries
            excluded += sum(
                e.payload["excluded_without_consent"]
                for e in ledger.entries(event_type="data.consent_applied")
                if e.payload.get("role") == "training" and e.payload.get("round") == rounds
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
    total = 1 + len(site_homes)
    return StepResult(
        "ledgers",
        "ok",
        f"{total} ledgers verified ({entries + verified.entries:,} entries); the "
        f"coordinator's export verified with the pinned key ({exported.report.entries}); "
        f"{inclusion.summary}; {growth.summary}; {excluded} training records left out of the "
        "last round for lack of consent",
        {"ledgers_verified": [total, total], "excluded_without_consent": excluded},
    )


def _optimize_step(
    coordinator: Workspace, result: FederatedResult, frame: pd.DataFrame
) -> tuple[StepResult, bytes]:
    """Run ``insitu optimize --target auto`` (quick) on the trained model.

    Calibration and evaluation use the *public* census rows the package carries, never a
    site's records: in a deployment the coordinator holds no site data, and public data
    of the same kind is what it can calibrate on. Returns the step and the ONNX model to
    ship (the chosen candidate, or the fp32 export when nothing met the constraints).
    """
    from insitu.optimize import optimize_workspace_model

    fp32 = (result.model_dir / "model.onnx").read_bytes()
    rows = frame.sample(n=min(len(frame), 4000), random_state=7)
    calibration, evaluation = rows.iloc[:1000], rows.iloc[1000:]
    report = optimize_workspace_model(
        coordinator, calibration, evaluation, run_id=result.run_id, public_calibration=True
    )
    chosen = report.chosen_candidate
    base = report.candidate.get("fp32")
    candidates = [
        {
            "name": c.name,
            "bytes": None if c.error else c.size_bytes,
            "p50_ms": None if c.error else round(c.latency_p50_ms, 4),
            "accuracy": c.accuracy,
            "error": c.error,
        }
        for c in report.candidates
    ]
    figures: dict[str, Any] = {
        "model_bytes_before": len(fp32),
        "model_bytes_after": chosen.size_bytes if chosen else len(fp32),
        "p50_ms": round(chosen.latency_p50_ms, 4) if chosen else None,
        "p50_ms_fp32": round(base.latency_p50_ms, 4) if base else None,
        "chosen": report.chosen,
        "reason": report.reason,
        "candidates": candidates,
    }
    if chosen is None or chosen.onnx is None:
        return (
            StepResult(
                "optimize",
                "warn",
                f"nothing met the constraints ({report.reason}); shipping the fp32 model",
                figures,
            ),
            fp32,
        )
    ratio = len(fp32) / max(1, chosen.size_bytes)
    if report.chosen == "fp32" or chosen.size_bytes >= 0.95 * len(fp32):
        # A model this small (a logistic regression is a few kilobytes) has nothing to
        # gain: int8 weights come with quantize/dequantize nodes that cost more than they
        # save, and the smaller candidates were slower than fp32 at batch 1.
        summary = (
            f"{report.chosen} ({chosen.size_bytes:,} bytes, p50 {chosen.latency_p50_ms:.4f} ms "
            f"at batch 1): no candidate of the {len(candidates)} measured was meaningfully "
            "smaller without being slower than fp32 or less accurate"
        )
        return StepResult("optimize", "ok", summary, figures), chosen.onnx
    summary = (
        f"{report.chosen}: {chosen.size_bytes:,} bytes ({ratio:.1f}x smaller than fp32), "
        f"p50 {chosen.latency_p50_ms:.3f} ms at batch 1"
        + (f" (fp32 {base.latency_p50_ms:.3f} ms)" if base else "")
        + f", accuracy drop {chosen.accuracy_drop or 0.0:.2f} points; "
        f"{len(candidates)} candidates measured"
    )
    return StepResult("optimize", "ok", summary, figures), chosen.onnx


def _serve_step(
    result: FederatedResult, schema: DataSchema, requests_per_site: int = 40
) -> StepResult:
    """Each site starts ``insitu serve`` in-process on 127.0.0.1 and queries it.

    One-row predictions of the site's held-out records over HTTP (what an application
    at the site would send), checked against the labels, and an explanation of one of
    them; the p50 is the server's own request latency.
    """
    import httpx
    import numpy as np

    from insitu.data import SiteDataset
    from insitu.serve import running

    requests = correct = explanations = 0
    p50s: list[float] = []
    top: list[str] = []
    for home in result.site_homes:
        site = Workspace.open(home)
        held = SiteDataset.open(site, site.prepared_part(schema.name, "test")).for_round(
            role="inference"
        )
        rows = held.features[:requests_per_site]
        with (
            running(site, port=0, dashboard=False) as server,
            httpx.Client(base_url=server.url, headers=server.headers, timeout=60.0) as client,
        ):
            for index, row in enumerate(rows):
                reply = client.post(
                    f"/v1/models/{schema.name}/predict", json={"inputs": [row.tolist()]}
                )
                reply.raise_for_status()
                logit = np.asarray(next(iter(reply.json()["outputs"].values()))).reshape(-1)[0]
                correct += int((logit > 0) == bool(held.labels[index]))
                requests += 1
            reply = client.post(
                f"/v1/models/{schema.name}/explain", json={"inputs": [rows[0].tolist()]}
            )
            reply.raise_for_status()
            explained = reply.json()
            explanations += 1
            p50s.append(float(server.snapshot().latency_p50_ms or 0.0))
        if not top:
            values = np.abs(np.asarray(explained["attributions"]).reshape(-1))
            names = explained["feature_names"]
            top = [names[i] for i in np.argsort(values)[::-1][:3]]
    p50 = float(np.median(p50s))
    return StepResult(
        "serve",
        "ok",
        f"{len(result.site_homes)} sites served the model on 127.0.0.1: {requests} one-row "
        f"predictions over HTTP ({correct / max(1, requests):.3f} correct), p50 {p50:.2f} ms "
        f"at the server; {explanations} explanations (top features of one: {', '.join(top)})",
        {
            "p50_ms": round(p50, 3),
            "requests": requests,
            "predictions_correct": correct,
            "explanations": explanations,
        },
    )


def _ship(
    coordinator: Workspace,
    result: FederatedResult,
    schema: DataSchema,
    *,
    epsilon: float,
    out_dir: Path,
    model: bytes,
) -> dict[str, Any]:
    """Bundle the (optimized) model, publish it, and have every site update to it and run it."""
    import threading

    import numpy as np

    from insitu.bundle import bundle_model
    from insitu.data import SiteDataset
    from insitu.update import (
        UpdateClient,
        init_directory_repository,
        make_server,
        open_directory_repository,
    )

    name = schema.name
    with coordinator.ledger() as ledger:
        earlier = len(ledger.entries(event_type="bundle.created"))
    version = f"1.0.{earlier}"
    sites = [Workspace.open(home) for home in result.site_homes]
    spent = result.epsilon_run
    blob, bundle = bundle_model(
        coordinator,
        model,
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
            update_dir = site.update_dir
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
            test_dir = site.prepared_part(schema.name, "test")
            data = SiteDataset.open(site, test_dir).for_round(role="inference")
            feed = {session.get_inputs()[0].name: data.features}
            logits = session.run(None, feed)[0].reshape(-1)
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
