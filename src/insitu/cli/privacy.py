"""``insitu privacy``: attack our own models and updates, and report measured leakage."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from insitu._atomic import atomic_write_text
from insitu.cli._app import app
from insitu.cli._output import HomeOption, JsonOption, err_console, out, print_json
from insitu.data import DataSchema
from insitu.errors import BoundViolationError, UsageError
from insitu.workspace import Workspace

__all__ = ["privacy_app"]

privacy_app = typer.Typer(
    help=(
        "Empirical privacy audit: membership inference against a trained model and "
        "gradient inversion against updates, with measured leakage beside the (epsilon, "
        "delta) bound. Results go to the ledger (figures only)."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(privacy_app, name="privacy", rich_help_panel="Governance")

OutDirOption = Annotated[
    Path | None,
    typer.Option(
        "--out",
        "-o",
        help="Directory for the report (JSON) and the plot \\[default: <home>/reports/...].",
        file_okay=False,
    ),
]


def _out_dir(ws: Workspace, out_dir: Path | None, stem: str) -> Path:
    path = out_dir or ws.report_dir(f"{stem}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _attacks(choice: str) -> tuple[str, ...]:
    from insitu.attacks import ATTACKS

    if choice == "all":
        return ATTACKS
    if choice not in ATTACKS:
        raise UsageError(f"--attack {choice!r}: use {', '.join(ATTACKS)} or all")
    return (choice,)


@privacy_app.command("audit")
def audit_command(
    model: Annotated[
        Path,
        typer.Argument(
            help="A model directory (<home>/models/<run>/) or an .onnx file.", exists=True
        ),
    ],
    members: Annotated[
        Path,
        typer.Option(
            "--members",
            help="Records that were in the training set (CSV/Parquet).",
            exists=True,
            dir_okay=False,
        ),
    ],
    non_members: Annotated[
        Path,
        typer.Option(
            "--non-members",
            help="Held-out records of the same distribution (CSV/Parquet).",
            exists=True,
            dir_okay=False,
        ),
    ],
    attack: Annotated[str, typer.Option(help="loss, lira-offline or all.")] = "loss",
    shadow_models: Annotated[
        int, typer.Option(min=4, help="Shadow models LiRA trains (each like the target).")
    ] = 16,
    shadow_epochs: Annotated[
        int | None, typer.Option(min=1, help="Epochs of each shadow \\[default: the run's].")
    ] = None,
    fpr: Annotated[
        list[float] | None,
        typer.Option(help="FPR at which TPR is reported (repeatable) \\[default: 0.01, 0.001]."),
    ] = None,
    schema: Annotated[
        Path | None,
        typer.Option(
            "--schema",
            "-s",
            help="Data schema \\[default: the model's own].",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    epsilon: Annotated[
        float | None, typer.Option(help="Epsilon on paper \\[default: the run's record].")
    ] = None,
    delta: Annotated[float | None, typer.Option(help="Delta on paper.")] = None,
    bootstrap: Annotated[int, typer.Option(min=100, help="Bootstrap resamples.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of shadow sampling and bootstrap.")] = 0,
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Write roc.png.")] = True,
    out_dir: OutDirOption = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Membership inference against MODEL: can an attacker tell who was in training.

    Reports ROC AUC and TPR at low FPR with 95% bootstrap intervals, and for a DP model
    the bound TPR <= e^eps * FPR + delta at each FPR. Exits 1 if an interval lies wholly
    above the bound (the epsilon on paper cannot be right); the report is written first.

    [dim]Examples:[/]
      insitu privacy audit .insitu/models/RUN --members train.csv --non-members held.csv
      insitu privacy audit model.onnx -s adult.schema.toml --members a.csv
          --non-members b.csv --epsilon 1 --delta 1e-5 --fpr 0.01
    """
    from insitu.attacks import (
        audit_membership,
        load_records,
        load_target,
        record_membership_audit,
        write_audit_evidence,
    )

    ws = Workspace.open(home)
    fprs = tuple(fpr) if fpr else (0.01, 0.001)
    attacks = _attacks(attack)
    parsed = DataSchema.load(schema) if schema else None
    target = load_target(
        model, schema=parsed, epsilon=epsilon, delta=delta, shadow_epochs=shadow_epochs
    )
    if target.schema is None:
        raise UsageError(f"{model.name} carries no data schema: pass --schema")
    x_m, y_m, ids_m = load_records(members, target.schema, target.feature_names)
    x_n, y_n, ids_n = load_records(non_members, target.schema, target.feature_names)
    status = err_console.status("attacking the model", spinner="dots")
    with contextlib.nullcontext() if json_output else status:
        audit = audit_membership(
            target.predict,
            (x_m, y_m),
            (x_n, y_n),
            attacks=attacks,
            fprs=fprs,
            epsilon=target.epsilon,
            delta=target.delta,
            member_ids=ids_m,
            non_member_ids=ids_n,
            shadow_trainer=target.shadow_trainer() if "lira-offline" in attacks else None,
            shadow_models=shadow_models,
            bootstrap=bootstrap,
            seed=seed,
        )
    directory = _out_dir(ws, out_dir, f"privacy-audit-{target.name}")
    report: dict[str, Any] = {
        "model": target.name,
        "onnx_sha256": target.onnx_sha256,
        "privacy": target.privacy,
        "shadow_recipe": target.recipe.to_json() if target.recipe else None,
    } | audit.to_json()
    if plot:
        from insitu.attacks import plot_roc

        eps_text = "non-private" if target.epsilon is None else f"epsilon {target.epsilon:g}"
        plot_roc(audit, directory / "roc.png", title=f"{target.name} ({eps_text})")
        report["plot"] = "roc.png"
    artefacts = write_audit_evidence(
        ws.home, directory, audit, {k: v for k, v in report.items() if k != "plot"}
    )
    with ws.ledger() as ledger:
        entry = record_membership_audit(ledger, report, run=target.run, artefacts=artefacts)
    report["ledger_seq"] = entry.seq
    report["report_dir"] = str(directory)
    if json_output:
        print_json(report)
    else:
        _print_audit(report)
    if audit.violation:
        raise BoundViolationError(
            "measured membership leakage lies above the DP bound TPR <= e^eps*FPR + delta "
            f"(epsilon {target.epsilon}, delta {target.delta}) beyond its 95% interval: the "
            "privacy accounting or the training is wrong; do not ship this model "
            f"(report: {directory / 'audit.json'})"
        )


def _print_audit(report: dict[str, Any]) -> None:
    table = Table(title=f"membership inference against {report['model']}", title_justify="left")
    for column in ("attack", "AUC (95% CI)", "FPR", "TPR (95% CI)", "DP bound", ""):
        table.add_column(column)
    for attack in report["attacks"]:
        first = True
        for point in attack["points"]:
            low, high = point["tpr_ci"]
            flag = ""
            if point["violation"]:
                flag = "[bold red]VIOLATION[/]"
            elif point["above_bound"]:
                flag = "[yellow]above bound (within chance)[/]"
            table.add_row(
                attack["attack"] if first else "",
                f"{attack['auc']:.3f} ({attack['auc_ci'][0]:.3f}-{attack['auc_ci'][1]:.3f})"
                if first
                else "",
                f"{point['fpr']:g}",
                f"{point['tpr']:.4f} ({low:.4f}-{high:.4f})",
                "-" if point["bound"] is None else f"{point['bound']:.4f}",
                flag,
            )
            first = False
    out.print(table)
    eps = report["epsilon"]
    out.print(
        f"{report['members']} members, {report['non_members']} non-members; "
        + (
            "no DP bound (non-private model)"
            if eps is None
            else f"epsilon {eps:g}, delta {report['delta']:g}"
        )
        + f"; {report['seconds']:.1f} s; report in {report['report_dir']}"
    )


@privacy_app.command("inversion")
def inversion_command(
    data: Annotated[
        str, typer.Option(help="digits (scikit-learn's 8x8 images), adult, or a CSV/Parquet file.")
    ] = "digits",
    schema: Annotated[
        Path | None,
        typer.Option(
            "--schema", "-s", help="Data schema of a DATA file.", exists=True, dir_okay=False
        ),
    ] = None,
    sites: Annotated[int, typer.Option(min=1, help="Sites in the aggregate.")] = 5,
    records_per_site: Annotated[int, typer.Option(min=1, help="Records in each site's step.")] = 16,
    noise_multiplier: Annotated[
        float, typer.Option(min=0.0, help="DP-SGD noise multiplier.")
    ] = 1.0,
    max_grad_norm: Annotated[float, typer.Option(min=0.0, help="DP-SGD clipping norm.")] = 1.0,
    hidden: Annotated[int, typer.Option(min=1, help="Hidden units of the MLP attacked.")] = 32,
    restarts: Annotated[int, typer.Option(min=1, help="Random restarts of the attack.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of model, records and noise.")] = 0,
    plot: Annotated[
        bool, typer.Option("--plot/--no-plot", help="Write inversion.png (images).")
    ] = True,
    out_dir: OutDirOption = None,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """Gradient inversion (DLG + iDLG) on one raw update, and on what the aggregator sees.

    A demonstration for reports and security reviews: a small MLP at initialization, one
    site's raw one-record gradient, the SecAgg+ sum of several sites' updates without DP,
    and the sum of DP-SGD (clipped, noised) updates. Reconstruction quality is the cosine
    similarity to the true record (centred on the data mean) and the MSE.

    [dim]Examples:[/]
      insitu privacy inversion
      insitu privacy inversion --data adult --noise-multiplier 0.5 --json
    """
    import torch

    from insitu.attacks import inversion_demo, record_inversion
    from insitu.training import build_model

    ws = Workspace.open(home)
    features, labels, shape = _inversion_data(data, schema)
    n_classes = int(labels.max()) + 1 if len(labels) else 2
    torch.manual_seed(seed)
    model = build_model("mlp", features.shape[1], hidden=hidden, n_classes=max(2, n_classes))
    if sites * records_per_site > len(labels):
        raise UsageError(
            f"{sites} sites of {records_per_site} records need {sites * records_per_site} "
            f"records; {data} has {len(labels)}"
        )
    demo = inversion_demo(
        model,
        features,
        labels,
        sites=sites,
        records_per_site=records_per_site,
        max_grad_norm=max_grad_norm,
        noise_multiplier=noise_multiplier,
        restarts=restarts,
        seed=seed,
    )
    directory = _out_dir(ws, out_dir, "privacy-inversion")
    report: dict[str, Any] = {"data": Path(data).name, "model": f"mlp({hidden})"} | demo.to_json()
    if plot and shape is not None:
        from insitu.attacks import plot_inversion

        plot_inversion(demo, directory / "inversion.png", shape=shape)
        report["plot"] = "inversion.png"
    atomic_write_text(
        directory / "inversion.json", json.dumps(report, indent=2, sort_keys=True) + "\n"
    )
    with ws.ledger() as ledger:
        entry = record_inversion(ledger, report)
    report["ledger_seq"] = entry.seq
    report["report_dir"] = str(directory)
    if json_output:
        print_json(report)
        return
    table = Table(title="gradient inversion (DLG + iDLG)", title_justify="left")
    for column in (
        "what the attacker sees",
        "records",
        "cosine to target (guess 99.9%)",
        "MSE",
        "best cosine (guess mean, 99.9%)",
    ):
        table.add_column(column)
    for r in report["results"]:
        table.add_row(
            r["setting"],
            str(r["records_in_update"]),
            f"{r['cosine']:.3f} ({r['chance_target_high']:.3f})",
            f"{r['mse']:.4g}",
            f"{r['best_cosine']:.3f} ({r['chance_cosine']:.3f}, {r['chance_best_high']:.3f})",
        )
    out.print(table)
    out.print(f"report in {directory}")


def _inversion_data(data: str, schema: Path | None) -> tuple[Any, Any, tuple[int, int] | None]:
    import numpy as np

    if data == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise UsageError(
                "--data digits needs scikit-learn: pip install 'insitu[audit]'"
            ) from exc
        digits = load_digits()
        return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64), (8, 8)
    from insitu.data import FeatureEncoder, Pseudonymizer, prepare, read_table
    from insitu.datasets import builtin_data, builtin_schema

    if data == "adult":
        path, schema_path = builtin_data("adult"), builtin_schema("adult")
    else:
        path = Path(data)
        if not path.is_file():
            raise UsageError(f"--data {data!r}: use digits, adult, or a CSV/Parquet file")
        if schema is None:
            raise UsageError("a --data file needs its --schema")
        schema_path = schema
    parsed = DataSchema.load(schema_path)
    frame = read_table(path)
    import os

    prepared = prepare(frame, parsed, Pseudonymizer(os.urandom(32)), source=path.name, k=1).frame
    encoder = FeatureEncoder.for_schema(parsed, prepared)
    return encoder.encode(prepared), encoder.labels(prepared), None


@privacy_app.command("one-run")
def one_run_command(
    epsilon: Annotated[
        float,
        typer.Option(
            "--epsilon", min=0.0, help="Claimed epsilon: the noise is calibrated to it (PLD)."
        ),
    ],
    delta: Annotated[float, typer.Option(min=0.0, max=1.0, help="Claimed delta.")] = 1e-5,
    sample_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Poisson sampling rate of each step.")
    ] = 0.1,
    steps: Annotated[int, typer.Option(min=1, help="DP-SGD steps of the one run.")] = 100,
    canaries: Annotated[
        int, typer.Option(min=20, help="Canaries, each in the run with probability 1/2.")
    ] = 1000,
    data: Annotated[
        str, typer.Option(help="Real records: adult (built in) or breast-cancer (scikit-learn).")
    ] = "adult",
    seed: Annotated[
        int, typer.Option(help="The published seed, given to the run and to the replay.")
    ] = 0,
    significance: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Chance of flagging a correct epsilon.")
    ] = 0.05,
    home: HomeOption = None,
    json_output: JsonOption = False,
) -> None:
    """White-box one-run audit with canaries of insitu's DP-SGD (Steinke et al. 2023).

    Calibrates the noise for the claimed epsilon over STEPS steps at SAMPLE-RATE,
    trains a linear model once on the records plus canaries (each secretly in or out),
    and lets an attacker that knows the published seed and every other record guess
    which canaries were in. Reports the empirical lower bound on epsilon those guesses
    prove; exits 1 if it exceeds the claimed epsilon (the implementation leaks more than
    its accounting says, e.g. predictable noise). Passing is not a proof of privacy.

    [dim]Examples:[/]
      insitu privacy one-run --epsilon 1
      insitu privacy one-run --epsilon 8 --data breast-cancer --canaries 1000 --json
    """
    from insitu.attacks import insitu_mechanism, one_run_audit, record_one_run_audit
    from insitu.privacy import calibrate_noise

    ws = Workspace.open(home)
    if epsilon <= 0 or not 0 < delta < 1 or not 0 < sample_rate <= 1:
        raise UsageError("--epsilon must be positive, --delta in (0, 1), --sample-rate in (0, 1]")
    features, labels = _one_run_data(data)
    noise = calibrate_noise(
        target_epsilon=epsilon, delta=delta, sample_rate=sample_rate, steps=steps
    )
    mechanism = insitu_mechanism(noise_multiplier=noise, sample_rate=sample_rate, steps=steps)
    status = err_console.status("training once with canaries", spinner="dots")
    with contextlib.nullcontext() if json_output else status:
        audit = one_run_audit(
            mechanism,
            features,
            labels,
            claimed_epsilon=epsilon,
            delta=delta,
            canaries=canaries,
            published_seed=seed,
            significance=significance,
        )
    with ws.ledger() as ledger:
        entry = record_one_run_audit(ledger, audit, run=None, data=data)
    report = audit.to_json() | {"data": data, "ledger_seq": entry.seq}
    if json_output:
        print_json(report)
    else:
        verdict = "[bold red]FLAGGED[/]" if audit.flagged else "not flagged"
        out.print(
            f"one-run audit ({data}): claimed epsilon {epsilon:g} (delta {delta:g}, noise "
            f"{noise:.3f}), empirical lower bound {audit.epsilon_lower_bound:.3f}; "
            f"{audit.canaries} canaries, {audit.correct}/{audit.guesses} guesses correct; "
            f"{verdict}",
            soft_wrap=True,
        )
    if audit.flagged:
        raise BoundViolationError(
            f"the one-run audit proves epsilon >= {audit.epsilon_lower_bound:.3f} at "
            f"significance {significance:g}, above the claimed {epsilon:g}: DP-SGD leaks "
            "more than its accounting says (predictable noise or sampling, missing "
            "clipping); do not train with this build"
        )


def _one_run_data(data: str) -> tuple[Any, Any]:
    import numpy as np

    if data == "breast-cancer":
        try:
            from sklearn.datasets import load_breast_cancer
        except ImportError as exc:
            raise UsageError(
                "--data breast-cancer needs scikit-learn: pip install 'insitu[audit]'"
            ) from exc
        table = load_breast_cancer()
        low, high = table.data.min(axis=0), table.data.max(axis=0)
        scaled = (table.data - low) / np.where(high > low, high - low, 1.0)
        return scaled.astype(np.float32), table.target.astype(np.int64)
    if data == "adult":
        features, labels, _ = _inversion_data("adult", None)
        return features, labels
    raise UsageError(f"--data {data!r}: use adult or breast-cancer")
