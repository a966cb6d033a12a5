"""The root command group, loading each verb's module only when that verb runs.

A device runs ``insitu update`` from cron and ``insitu serve`` at boot; neither may pay
for PyTorch, Flower or pandas, and a device install does not have them. So the root
group knows its verbs from :data:`VERBS` (name, module, one line of help, panel) and
imports ``insitu.cli.<module>`` only when a verb of it is invoked (or its own ``--help``
is asked). ``insitu --version`` and ``insitu --help`` import no verb at all; the help
lists the verbs from the table. ``tests/cli/test_lazy.py`` checks the table against the
commands the modules define, so the two cannot drift apart.

A verb whose module needs a package this install lacks fails with one line naming the
package and the extra that brings it (:class:`~insitu.errors.MissingDependencyError`),
not a traceback.

Written by hand because Click leaves lazy loading to the application (its documentation
gives this pattern, "Lazily Loading Subcommands"), and Typer builds its groups eagerly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import click
import typer
import typer.core
import typer.main

from insitu.errors import MissingDependencyError

__all__ = ["EXTRAS", "VERBS", "LazyGroup", "Verb", "missing_dependency"]


@dataclass(frozen=True)
class Verb:
    """A root verb: the module under ``insitu.cli`` that defines it, its help and panel."""

    module: str
    help: str
    panel: str


VERBS: dict[str, Verb] = {
    "quickstart": Verb(
        "quickstart",
        "Run the whole job on the data insitu carries, verify the evidence, write the report.",
        "Start here",
    ),
    "init": Verb(
        "workspace",
        "Create a workspace: config, this node's keys, and its audit ledger.",
        "Workspace",
    ),
    "info": Verb(
        "workspace",
        "Show this workspace: node id, key protection, ledger size and latest signed head.",
        "Workspace",
    ),
    "keys": Verb(
        "keys",
        "The node's keys: move a workspace's file signing key into a PKCS#11 token "
        "(an HSM, a smart card, SoftHSM2, a TPM through tpm2-pkcs11).",
        "Workspace",
    ),
    "data": Verb(
        "data",
        "Data protection at the source: a schema declares every column (feature, label, "
        "identifier, quasi-identifier) and what happens to it.",
        "Data",
    ),
    "consent": Verb("consent", "Consent per subject and purpose.", "Data"),
    "federate": Verb(
        "federate",
        "Train one model across sites without moving a record: DP-SGD, SecAgg+ secure "
        "aggregation, and privacy budgets that refuse.",
        "Training",
    ),
    "optimize": Verb(
        "optimize",
        "The smallest ONNX model that meets the constraints, chosen by measurement here.",
        "Models",
    ),
    "bundle": Verb(
        "bundle",
        "Model bundles: the ONNX model, its model card and a manifest of digests, signed "
        "and optionally encrypted.",
        "Supply chain",
    ),
    "repo": Verb(
        "repo",
        "The update repository: signed TUF metadata over bundles, per-tensor deltas and channels.",
        "Supply chain",
    ),
    "attest": Verb(
        "attest",
        "Attested membership: measure this insitu build into a TPM PCR, quote it over a "
        "verifier's nonce, and check quotes against an allow-list of measured states.",
        "Supply chain",
    ),
    "update": Verb(
        "update",
        "Update this device's model from a TUF repository: verify, install into an A/B slot.",
        "Supply chain",
    ),
    "rollback": Verb(
        "update",
        "Return to the previously installed model (local, instant, no network).",
        "Supply chain",
    ),
    "serve": Verb(
        "serve",
        "Serve the installed model on a localhost API (bearer token: keys/api-token).",
        "Local inference",
    ),
    "predict": Verb(
        "serve",
        "Predict every row of a file, streamed (files larger than memory work).",
        "Local inference",
    ),
    "explain": Verb(
        "serve",
        "Explain predictions: SHAP attributions against this site's own records.",
        "Local inference",
    ),
    "drift": Verb(
        "drift",
        "Drift of what the models see against the DP reference profile in their cards.",
        "Operations",
    ),
    "finetune": Verb(
        "finetune",
        "Fine-tune the installed model on local data with DP-SGD; install it only if better.",
        "Operations",
    ),
    "audit": Verb(
        "audit",
        "The audit ledger: every training round, budget spent, model published, installed "
        "or rolled back, signed and hash-chained.",
        "Governance",
    ),
    "privacy": Verb(
        "privacy",
        "Empirical privacy audit: membership inference and gradient inversion against the "
        "DP bound.",
        "Governance",
    ),
    "report": Verb(
        "report",
        "Write the compliance report: processing record, Annex IV items, data flows, privacy.",
        "Governance",
    ),
}

# Which extra brings a package a verb may miss (the top-level import name).
EXTRAS: dict[str, str] = {
    "torch": "federated",
    "flwr": "federated",
    "opacus": "federated",
    "onnxscript": "federated",
    "dp_accounting": "federated",
    "pandas": "data",
    "pyarrow": "data",
    "sklearn": "audit",
    "matplotlib": "audit",
    "skl2onnx": "optimize",
    "shap": "serve",
    "onnxruntime": "runtime",
    "onnx": "runtime",
    "numpy": "runtime",
    "tuf": "bundle",
    "securesystemslib": "bundle",
    "zstandard": "bundle",
    "fastapi": "device",
    "uvicorn": "device",
    "prometheus_client": "device",
}


class LazyGroup(typer.core.TyperGroup):
    """Typer's root group, with the verbs of :data:`VERBS` imported on first use."""

    _listing = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = list(VERBS)
        return names + [name for name in self.commands if name not in VERBS]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        verb = VERBS.get(cmd_name)
        if verb is None:
            return None
        if self._listing:
            return _placeholder(cmd_name, verb)
        command = _load(cmd_name, verb)
        self.commands[cmd_name] = command
        return command

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # The root help lists the verbs from the table; it imports none of them.
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


def _placeholder(name: str, verb: Verb) -> click.Command:
    command = click.Command(name, help=verb.help, short_help=verb.help)
    command.rich_help_panel = verb.panel  # type: ignore[attr-defined]
    return command


def _load(name: str, verb: Verb) -> click.Command:
    """Import the verb's module (it registers on the root app) and build its command."""
    try:
        importlib.import_module(f"insitu.cli.{verb.module}")
    except ModuleNotFoundError as exc:
        missing = missing_dependency(exc, [name])
        if missing is None:
            raise
        raise missing from exc
    from insitu.cli._app import app

    group: Any = typer.main.get_command(app)
    command: click.Command = group.commands[name]
    return command


def missing_dependency(exc: BaseException, args: list[str]) -> MissingDependencyError | None:
    """The one-line error for a package this install lacks, or ``None`` for anything else.

    A verb's module loads its domain lazily, so a package can also be found missing deep
    in a command (``insitu explain`` on a device reads a table with pandas).
    """
    if not isinstance(exc, ModuleNotFoundError):
        return None
    missing = (exc.name or "").partition(".")[0]
    if not missing or missing == "insitu":
        return None  # a missing module of insitu itself is a bug, not a missing extra
    verb = next((arg for arg in args if arg in VERBS), None)
    who = f"insitu {verb}" if verb else "this command"
    return MissingDependencyError(
        f"{who} needs {missing}, which this install lacks; install the extra that brings "
        f"it: pip install 'insitu[{EXTRAS.get(missing, 'all')}]'"
    )
