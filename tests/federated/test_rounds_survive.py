"""Rounds that survive a lost site, runs that stop honestly, checkpoints, resumed runs.

Most tests drive the aggregator in this process: :class:`RoundRecorder` with fake
proxies and results, or the real server loop (``run_rounds``, the deployed ServerApp
body ``run_server_app``) against :class:`FakeGrid`, a Flower ``Grid`` that delivers each
message to a real ``ClientApp`` per node (with ``secaggplus_mod`` when the run uses
secure aggregation), copying it as the wire would. One short simulation shows a site
lost in round 2 on Flower's own engine.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Status,
    ndarrays_to_parameters,
)
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.serverapp.grid import Grid
from flwr.supercore.task_identity import TaskIdentity

from insitu.audit import events
from insitu.cli import run
from insitu.data import DataSchema, FeatureEncoder, read_table
from insitu.datasets import builtin_data, builtin_schema
from insitu.errors import FederationError, RoundFailedError, UsageError
from insitu.federated import FederationConfig as _FederationConfig
from insitu.federated import run_server_app, simulate
from insitu.federated._checkpoint import CHECKPOINT_NAME, Checkpoint
from insitu.federated._config import default_quorum, secagg_threshold
from insitu.federated._plan import RunPlan, SharedPlan
from insitu.federated._processes import RUN_DIR_ENV
from insitu.federated._server_app import (
    RoundRecord,
    RoundRecorder,
    build_strategy,
    record_round,
    run_rounds,
)
from insitu.federated._site_app import SiteClient, SitePlan, prepare_site_data
from insitu.training import build_model, get_weights
from insitu.workspace import Workspace

# Rounds, quorums and checkpoints are checked against plain averaging (the aggregate is
# the mean of the answers); the server optimizer's step is tested in test_defaults.py.
FederationConfig = functools.partial(_FederationConfig, server_optimizer="fedavg")

# --------------------------------------------------------------------------- helpers


class Proxy(ClientProxy):
    """A node as the strategy sees it; never called (the workflow sends the messages)."""

    def get_properties(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def get_parameters(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def reconnect(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


OK = Status(Code.OK, "")
START = [np.zeros(3, np.float32)]


def fit_result(site: str | None, value: float = 1.0) -> FitRes:
    metrics: dict[str, Any] = {} if site is None else {"site": site, "epsilon_run": 0.25}
    return FitRes(OK, ndarrays_to_parameters([np.full(3, value, np.float32)]), 1, metrics)


def eval_result() -> EvaluateRes:
    return EvaluateRes(OK, 0.0, 1, {"correct": 3.0, "count": 4.0})


def recorder(config: FederationConfig, **kwargs: Any) -> tuple[RoundRecorder, list[RoundRecord]]:
    closed: list[RoundRecord] = []
    strategy = RoundRecorder(
        build_strategy(
            config, ndarrays_to_parameters(START), evaluate_fn=None, site_noise_multiplier=0.0
        ),
        config=config,
        on_round=closed.append,
        **kwargs,
    )
    return strategy, closed


def manager(*cids: str) -> SimpleClientManager:
    clients = SimpleClientManager()
    for cid in cids:
        clients.register(Proxy(cid))
    return clients


def play_round(
    strategy: RoundRecorder,
    server_round: int,
    clients: SimpleClientManager,
    *,
    answer: dict[str, str],
    failures: list[BaseException],
    evaluate_failures: list[BaseException] = (),  # type: ignore[assignment]
) -> None:
    """One round through the strategy: ``answer`` maps the nodes that reply to their site."""
    asked = strategy.configure_fit(server_round, ndarrays_to_parameters(START), clients)
    results = [(p, fit_result(answer[p.cid])) for p, _ in asked if p.cid in answer]
    strategy.aggregate_fit(server_round, results, failures)
    asked_eval = strategy.configure_evaluate(server_round, ndarrays_to_parameters(START), clients)
    lost_eval = {str(e).split(":")[0].removeprefix("[site ") for e in evaluate_failures}
    replies = [
        (p, eval_result())
        for p, _ in asked_eval
        if p.cid in answer and answer[p.cid] not in lost_eval
    ]
    strategy.aggregate_evaluate(server_round, replies, list(evaluate_failures))


# --------------------------------------------------------------------------- the quorum


def test_the_default_quorum_is_the_secagg_reconstruction_threshold():
    # Flower's rule (round(0.6 * shares), at least 2): 4 sites need 2, 5 need 3, 10 need 6.
    assert [FederationConfig(sites=n).required_sites for n in (3, 4, 5, 10)] == [2, 2, 3, 6]
    assert [secagg_threshold(n) for n in (3, 4, 5, 10)] == [2, 2, 3, 6]
    # Beyond 10 sites SecAgg+ shares each key with about half: the quorum stays 60% of all.
    assert (default_quorum(20), secagg_threshold(20)) == (12, 7)
    # Without secure aggregation: the same 60%, at least 2 and at most every site.
    plain = {"secure_aggregation": False, "privacy": "none"}
    assert FederationConfig(sites=2, **plain).required_sites == 2
    assert FederationConfig(sites=1, **plain).required_sites == 1
    assert FederationConfig(sites=5, min_sites=5).required_sites == 5


def test_flower_sends_the_threshold_the_quorum_counts_on(monkeypatch):
    for sites in (4, 5):
        grid = FakeGrid({n: Site(f"site-{n}") for n in range(1, sites + 1)}, secagg=True)
        config = FederationConfig(sites=sites, rounds=1, privacy="none")
        strategy, _ = recorder(config)
        run_rounds(grid, server_context(), config, strategy)
        assert grid.thresholds == {secagg_threshold(sites)} == {config.required_sites}


def test_a_min_sites_secagg_cannot_unmask_is_refused():
    with pytest.raises(UsageError, match=r"--min-sites 2: SecAgg\+ cannot unmask a round of 5"):
        FederationConfig(sites=5, min_sites=2)
    FederationConfig(sites=5, min_sites=2, secure_aggregation=False, privacy="none")


# --------------------------------------------------------------------------- lost sites


def test_a_round_that_loses_a_site_completes_with_the_quorum_and_names_it(ledger):
    config = FederationConfig(sites=4, rounds=1, privacy="none", secure_aggregation=False)
    names = [f"site-0{i}" for i in range(1, 5)]
    strategy, closed = recorder(config, site_names=names)
    clients = manager("11", "12", "13", "14")
    play_round(
        strategy,
        1,
        clients,
        answer={"11": "site-01", "12": "site-02", "13": "site-03"},
        failures=[Exception("Error(code=0, reason='ClientApp crashed')")],
        evaluate_failures=[Exception("[site site-02: budget] no budget left")],
    )
    (record,) = closed
    assert record.aggregated
    assert record.sites_ok == 3
    assert record.missing == {"site-04": "dropout"}
    assert record.failures == 1
    assert record.participants == {"site-01": 11, "site-02": 12, "site-03": 13}
    # site-04's node never answered, so its name is unknown here: its node id names it.
    assert record.sites_evaluated == 2
    assert record.evaluation_missing == {"site-02": "budget", "node_14": "dropout"}
    assert record.accuracy == 0.75
    record_round(ledger, run_id="r", record=record)
    (entry,) = ledger.entries(event_type=events.FEDERATION_ROUND.name)
    assert entry.payload["missing"] == {"site-04": "dropout"}
    assert entry.payload["participants"]["site-03"] == 13
    assert entry.payload["evaluation_missing"] == record.evaluation_missing
    assert record.summary(4) == (
        "3 of 4 sites (lost: site-04 dropout), accuracy 0.7500 on 2 of 4 sites, "
        "epsilon this run 0.250"
    )


def test_a_site_lost_before_it_ever_answered_is_named_by_its_node():
    config = FederationConfig(sites=3, rounds=2, privacy="none", secure_aggregation=False)
    clients = manager("1", "2", "3")
    answer = {"1": "site-a", "2": "site-b"}
    strategy, closed = recorder(config)  # deployment without the registered names
    play_round(strategy, 1, clients, answer=answer, failures=[Exception("timeout")])
    assert closed[0].missing == {"node_3": "dropout"}
    named, closed = recorder(config, node_names={"3": "site-c"})
    play_round(named, 1, clients, answer=answer, failures=[Exception("timeout")])
    assert closed[0].missing == {"site-c": "dropout"}
    # Known from round 1, a site lost in round 2 is named even with no message at all.
    strategy, closed = recorder(config)
    play_round(strategy, 1, clients, answer=answer | {"3": "site-c"}, failures=[])
    play_round(strategy, 2, clients, answer=answer, failures=[])
    assert closed[1].missing == {"site-c": "dropout"}


def test_node_ids_that_pass_for_card_numbers_are_still_recorded(ledger):
    # Flower's node ids are random 64-bit integers: as digit strings, one in ten would
    # pass the Luhn check and be refused by the ledger as a card number.
    card_like = ("4111111111111111", "5500005555555559", "6011000990139424")
    config = FederationConfig(sites=3, rounds=1, privacy="none", secure_aggregation=False)
    strategy, closed = recorder(config)
    answer = {card_like[0]: "site-a", card_like[1]: "site-b"}
    play_round(strategy, 1, manager(*card_like), answer=answer, failures=[])
    record_round(ledger, run_id="r", record=closed[0])
    (entry,) = ledger.entries(event_type=events.FEDERATION_ROUND.name)
    assert entry.payload["participants"] == {"site-a": 4111111111111111, "site-b": 5500005555555559}
    assert entry.payload["missing"] == {"node_6011000990139424": "dropout"}


def test_below_the_quorum_the_run_stops_naming_each_lost_site_once(tmp_path):
    config = FederationConfig(sites=5, rounds=3, min_sites=3, privacy="none")
    names = [f"site-0{i}" for i in range(1, 6)]
    strategy, _ = recorder(config, site_names=names, run_id="r", checkpoint_dir=tmp_path)
    clients = manager("1", "2", "3", "4", "5")
    play_round(strategy, 1, clients, answer={c: f"site-0{c}" for c in "12345"}, failures=[])
    refusal = Exception("[site site-03: budget] no subject has privacy budget left")
    # SecAgg+ in Flower 1.41 lists a failed site twice: it is still one lost site.
    with pytest.raises(RoundFailedError) as caught:
        play_round(
            strategy,
            2,
            clients,
            answer={"1": "site-01", "2": "site-02"},
            failures=[refusal, refusal, Exception("Error(code=0, reason='timeout')")],
        )
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "round 2 of 3: 2 site(s) contributed, 3 of 5 required; "
        "lost: site-03 (budget), site-04 (dropout), site-05 (dropout). "
    )
    assert "privacy.budget_refused in the site's ledger" in message
    assert "the site's process and its network" in message
    assert "No model is the result of this run" in message
    assert f"(round 1) is kept as a checkpoint to resume from: {tmp_path / CHECKPOINT_NAME}" in (
        message
    )
    assert caught.value.round == 2
    assert caught.value.sites == {"site-03": "budget", "site-04": "dropout", "site-05": "dropout"}
    assert strategy.records[2].failures == 3
    assert Checkpoint.read(tmp_path / CHECKPOINT_NAME).round == 1  # the last good round


def test_an_error_names_its_hint_and_not_the_budgets():
    config = FederationConfig(sites=3, rounds=1, min_sites=3, privacy="none")
    strategy, _ = recorder(config, site_names=["a", "b", "c"])
    with pytest.raises(
        RoundFailedError, match=r"lost: c \(error\)\. To check: error, the site"
    ) as caught:
        play_round(
            strategy,
            1,
            manager("1", "2", "3"),
            answer={"1": "a", "2": "b"},
            failures=[Exception("[site c: error] RuntimeError: disk full")],
        )
    assert "budget" not in str(caught.value)
    assert "checkpoint" not in str(caught.value)  # none was written: nothing to resume


# --------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_is_written_after_every_round_and_atomically(tmp_path, monkeypatch):
    config = FederationConfig(sites=3, rounds=3, privacy="none", secure_aggregation=False)
    written: list[tuple[int, str]] = []
    strategy, _ = recorder(
        config,
        run_id="r",
        checkpoint_dir=tmp_path,
        on_checkpoint=lambda c, sha: written.append((c.round, sha)),
    )
    clients = manager("1", "2", "3")
    answer = {"1": "a", "2": "b", "3": "c"}
    path = tmp_path / CHECKPOINT_NAME
    play_round(strategy, 1, clients, answer=answer, failures=[])
    first = Checkpoint.read(path, sha256=written[0][1])
    assert (first.run_id, first.round, first.rounds_planned) == ("r", 1, 3)
    assert [r["round"] for r in first.history] == [1]
    assert first.epsilon_run_by_site == {"a": 0.25, "b": 0.25, "c": 0.25}
    assert first.config == config.to_json()
    np.testing.assert_allclose(first.weights[0], np.ones(3))

    # A crash at the rename (the last step) leaves round 1's checkpoint whole.
    def crash(self: Path, target: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", crash)
    with pytest.raises(OSError, match="No space left"):
        play_round(strategy, 2, clients, answer=answer, failures=[])
    monkeypatch.undo()
    assert Checkpoint.read(path, sha256=written[0][1]).round == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no temp file

    play_round(strategy, 3, clients, answer=answer, failures=[])
    assert [r for r, _ in written] == [1, 3]
    assert Checkpoint.read(path, sha256=written[-1][1]).round == 3


def test_attack_an_altered_checkpoint_is_refused(tmp_path):
    checkpoint = Checkpoint(
        run_id="r",
        round=1,
        rounds_planned=2,
        weights=[np.ones(3, np.float32)],
        config=FederationConfig().to_json(),
        secure_aggregation={},
        epsilon_run_by_site={},
        history=[],
    )
    sha = checkpoint.write(tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    swapped = Checkpoint(**{**checkpoint.__dict__, "weights": [np.full(3, 9.0, np.float32)]})
    swapped.write(tmp_path)
    with pytest.raises(FederationError, match="is not the one the resume plan names"):
        Checkpoint.read(path, sha256=sha)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(FederationError, match="is not an insitu checkpoint"):
        Checkpoint.read(path)


# --------------------------------------------------------------------------- the server loop


class Site(NumPyClient):
    """A site that adds 1 to every weight, and refuses or fails the rounds it is told to."""

    def __init__(self, name: str, *, refuse: int = 0, fail_evaluate: int = 0) -> None:
        self.name, self.refuse, self.fail_evaluate = name, refuse, fail_evaluate
        self.rounds: list[int] = []

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        round_number = int(config["round"])
        self.rounds.append(round_number)
        if round_number == self.refuse:
            raise RuntimeError(f"[site {self.name}: budget] no subject has privacy budget left")
        metrics = {"site": self.name, "epsilon_run": 0.1 * round_number}
        return [p + 1.0 for p in parameters], 1, metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        if int(config["round"]) == self.fail_evaluate:
            raise RuntimeError(f"[site {self.name}: error] evaluation failed")
        return 0.0, 1, {"correct": 1.0, "count": 2.0}


class FakeGrid(Grid):
    """Delivers each message to its node's ``ClientApp``, a copy as the wire would make."""

    def __init__(
        self, sites: dict[int, Site], *, secagg: bool, dead_from: dict[int, int] | None = None
    ) -> None:
        self.sites = sites
        #: node -> the round from which it answers nothing (its process was killed).
        self.dead_from = dead_from or {}
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in sites
        }
        self.groups: set[str] = set()
        self.thresholds: set[int] = set()
        self.app = ClientApp(
            client_fn=lambda context: self.sites[context.node_id].to_client(),
            mods=[secaggplus_mod] if secagg else [],
        )

    @property
    def run(self) -> Any:
        return SimpleNamespace(run_id=1)

    def set_run(self, run_id: int) -> None:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def push_messages(self, messages: Any) -> Any:
        raise NotImplementedError

    def pull_messages(self, message_ids: Any) -> Any:
        raise NotImplementedError

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        replies = []
        for sent in messages:
            message = copy.deepcopy(sent)
            self.groups.add(message.metadata.group_id)
            configs = message.content.config_records.get("secaggplus_configs")
            if configs is not None and "threshold" in configs:
                self.thresholds.add(int(configs["threshold"]))
            node = message.metadata.dst_node_id
            if int(message.metadata.group_id or 0) >= self.dead_from.get(node, 10**9):
                unavailable = Error(code=3, reason="Node unavailable")  # as the SuperLink says
                replies.append(Message(unavailable, reply_to=message))
                continue
            try:
                replies.append(self.app(message, self.contexts[node]))
            except Exception as exc:  # noqa: BLE001 -- what a site's runtime sends back
                replies.append(Message(Error(code=0, reason=str(exc)), reply_to=message))
        return replies


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """What Flower's ServerApp process sets before messages are created."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def server_context(run_config: dict[str, Any] | None = None) -> Context:
    return Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config or {}
    )


@pytest.mark.parametrize("secagg", [False, True])
def test_a_resumed_run_numbers_its_rounds_from_the_checkpoint(tmp_path, secagg):
    config = FederationConfig(
        sites=4, rounds=4, min_sites=4, privacy="none", secure_aggregation=secagg
    )
    sites = {n: Site(f"site-0{n}", refuse=3 if n == 3 else 0) for n in range(1, 5)}
    strategy, _ = recorder(config, run_id="r", checkpoint_dir=tmp_path)
    with pytest.raises(RoundFailedError, match=r"round 3 of 4: 3 site\(s\) contributed, 4 of 4"):
        run_rounds(FakeGrid(sites, secagg=secagg), server_context(), config, strategy)
    checkpoint = Checkpoint.read(tmp_path / CHECKPOINT_NAME)
    assert checkpoint.round == 2

    again = {n: Site(f"site-0{n}") for n in range(1, 5)}
    grid = FakeGrid(again, secagg=secagg)
    resumed, closed = recorder(config, run_id="r", checkpoint_dir=tmp_path, resume_from=checkpoint)
    weights = run_rounds(grid, server_context(), config, resumed)
    assert all(site.rounds == [3, 4] for site in again.values())  # the real round numbers
    assert grid.groups == {"3", "4"}  # and in every message Flower sends for them
    assert [r.round for r in closed] == [3, 4]
    assert [r.round for r in resumed.history] == [1, 2, 3, 4]
    # Two rounds of +1 on top of round 2's weights (2.0): never restarted from scratch.
    np.testing.assert_allclose(weights[0], np.full(3, 4.0), atol=0.05)
    assert Checkpoint.read(tmp_path / CHECKPOINT_NAME).round == 4


def test_a_run_stopped_after_its_last_round_resumes_to_its_checkpoints_weights(tmp_path):
    # Every round ran and was checkpointed, but the server stopped before the model was
    # saved: the resumed run trains nothing and ends with the checkpoint's weights.
    config = FederationConfig(sites=3, rounds=2, privacy="none", secure_aggregation=False)
    sites = {n: Site(f"site-0{n}") for n in range(1, 4)}
    strategy, _ = recorder(config, run_id="r", checkpoint_dir=tmp_path)
    run_rounds(FakeGrid(sites, secagg=False), server_context(), config, strategy)
    checkpoint = Checkpoint.read(tmp_path / CHECKPOINT_NAME)
    again = {n: Site(f"site-0{n}") for n in range(1, 4)}
    resumed, closed = recorder(config, run_id="r", checkpoint_dir=tmp_path, resume_from=checkpoint)
    weights = run_rounds(FakeGrid(again, secagg=False), server_context(), config, resumed)
    assert not closed
    assert all(not site.rounds for site in again.values())
    np.testing.assert_array_equal(weights[0], checkpoint.weights[0])
    assert [r.round for r in resumed.history] == [1, 2]


def test_a_site_lost_mid_round_under_secagg_leaves_the_round_to_the_others():
    config = FederationConfig(sites=4, rounds=2, privacy="none")  # quorum 2 of 4
    sites = {
        n: Site(f"site-0{n}", refuse=2 if n == 3 else 0, fail_evaluate=2 if n == 1 else 0)
        for n in range(1, 5)
    }
    strategy, closed = recorder(config)
    run_rounds(FakeGrid(sites, secagg=True), server_context(), config, strategy)
    last = closed[-1]
    assert (last.round, last.sites_ok, last.missing) == (2, 3, {"site-03": "budget"})
    assert set(last.participants) == {"site-01", "site-02", "site-04"}
    assert len(set(last.seen_by_strategy)) == 1  # the aggregate only, as ever
    assert (last.sites_evaluated, last.evaluation_missing) == (3, {"site-01": "error"})


def test_a_site_killed_before_it_shared_its_keys_leaves_the_round_to_the_others():
    # The deployed kill test's case: a site gone from the first SecAgg+ stage of round 2.
    # Flower 1.41 alone failed the round ("Not enough shares to recover secret"): it asked
    # for shares of the lost site's keys, which it never shared.
    config = FederationConfig(sites=3, rounds=3, privacy="none")  # quorum 2 of 3
    sites = {n: Site(f"site-0{n}") for n in range(1, 4)}
    strategy, closed = recorder(config)
    grid = FakeGrid(sites, secagg=True, dead_from={3: 2})
    weights = run_rounds(grid, server_context(), config, strategy)
    assert [(r.round, r.sites_ok) for r in closed] == [(1, 3), (2, 2), (3, 2)]
    assert closed[1].missing == {"site-03": "dropout"}
    assert set(closed[2].participants) == {"site-01", "site-02"}
    np.testing.assert_allclose(weights[0], np.full(3, 3.0), atol=0.05)  # +1 per round


# --------------------------------------------------------------------------- deployed server


def _plan(ws: Workspace, config: FederationConfig) -> RunPlan:
    run_id = "20250101T000000Z-abcdef"
    plan = RunPlan(
        shared=SharedPlan(
            run_id=run_id,
            config=config,
            dataset="toy",
            schema_sha256="0" * 64,
            n_features=3,
            site_noise_multiplier=0.0,
        ),
        home=ws.home.absolute(),
        run_dir=ws.deployed_run_dir(run_id).absolute(),
        feature_names=("a", "b", "c"),
        schema_source={  # as a real plan carries one: the server reads it after the run
            "dataset": {"name": "toy", "label": "y"},
            "features": {"numeric": ["a", "b", "c"]},
            "consent": {"required": False, "legal_basis": "test"},
        },
        sites_registered=("site-01", "site-02", "site-03"),
    )
    plan.run_dir.mkdir(parents=True)
    (plan.run_dir / "plan.json").write_text(json.dumps(plan.to_json()))
    with ws.ledger() as ledger:
        events.FEDERATION_SITES_REGISTERED.record(
            ledger,
            run=run_id,
            address="127.0.0.1:9092",
            ca_sha256="0" * 64,
            sites={},
            node_ids={"site-01": "1", "site-02": "2", "site-03": "3"},
        )
    return plan


def test_a_deployed_run_that_stops_keeps_a_checkpoint_and_resumes_from_it(workspace, monkeypatch):
    config = FederationConfig(sites=3, rounds=4, min_sites=3, privacy="none")
    plan = _plan(workspace, config)
    monkeypatch.setenv(RUN_DIR_ENV, str(plan.run_dir))
    context = server_context({"insitu": plan.shared.dumps()})
    sites = {n: Site(f"site-0{n}", refuse=3 if n == 2 else 0) for n in range(1, 4)}
    with pytest.raises(RoundFailedError, match=r"lost: site-02 \(budget\)"):
        run_server_app(FakeGrid(sites, secagg=True), context)
    result = json.loads((plan.run_dir / "result.json").read_text())
    assert result["checkpoint_round"] == 2
    assert "kept as a checkpoint to resume from" in result["error"]
    assert not workspace.model_dir(plan.run_id).exists()  # a checkpoint, not a result
    with workspace.ledger() as ledger:
        (failed,) = ledger.entries(event_type=events.FEDERATION_FAILED.name)
        assert failed.payload["checkpoint_round"] == 2
        assert failed.payload["sites"] == {"site-02": "budget"}
        assert not ledger.entries(event_type=events.FEDERATION_COMPLETED.name)
        kept = ledger.entries(event_type=events.FEDERATION_CHECKPOINTED.name)
        assert [e.payload["round"] for e in kept] == [1, 2]
        closed = [
            e.payload["round"] for e in ledger.entries(event_type=events.FEDERATION_ROUND.name)
        ]
        assert closed == [1, 2]  # the failed round closed nothing

    resumed = RunPlan.resumed(plan.run_dir)
    assert resumed.resume is not None
    assert (resumed.resume.from_round, resumed.resume.checkpoint) == (
        2,
        plan.run_dir / CHECKPOINT_NAME,
    )
    assert resumed.resume.checkpoint_sha256 == kept[-1].payload["checkpoint_sha256"]
    assert RunPlan.from_json(resumed.to_json()) == resumed
    (plan.run_dir / "plan.json").write_text(json.dumps(resumed.to_json()))
    again = {n: Site(f"site-0{n}") for n in range(1, 4)}
    run_server_app(FakeGrid(again, secagg=True), context)
    assert all(site.rounds == [3, 4] for site in again.values())
    result = json.loads((plan.run_dir / "result.json").read_text())
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3, 4]
    assert (workspace.model_dir(plan.run_id) / "model.onnx").exists()
    with workspace.ledger() as ledger:
        (resumed_entry,) = ledger.entries(event_type=events.FEDERATION_RESUMED.name)
        assert resumed_entry.payload["from_round"] == 2
        rounds = {e.seq: e.payload for e in ledger.entries(event_type=events.FEDERATION_ROUND.name)}
        (completed,) = ledger.entries(event_type=events.FEDERATION_COMPLETED.name)
        linked = [rounds[seq]["round"] for seq in completed.payload["round_entries"]]
        assert linked == [1, 2, 3, 4]  # every round of the run, once
        assert rounds[completed.payload["round_entries"][0]]["participants"]["site-02"] == 2
    with pytest.raises(FederationError, match=r"completed .* nothing to resume"):
        RunPlan.resumed(plan.run_dir)


def test_attack_a_checkpoint_swapped_before_the_resume_is_refused(workspace, monkeypatch):
    config = FederationConfig(
        sites=3, rounds=3, min_sites=3, privacy="none", secure_aggregation=False
    )
    plan = _plan(workspace, config)
    monkeypatch.setenv(RUN_DIR_ENV, str(plan.run_dir))
    context = server_context({"insitu": plan.shared.dumps()})
    sites = {n: Site(f"site-0{n}", refuse=2 if n == 1 else 0) for n in range(1, 4)}
    with pytest.raises(RoundFailedError):
        run_server_app(FakeGrid(sites, secagg=False), context)
    resumed = RunPlan.resumed(plan.run_dir)
    (plan.run_dir / "plan.json").write_text(json.dumps(resumed.to_json()))
    # Someone with write access to the run directory plants weights of their own.
    planted = Checkpoint.read(plan.run_dir / CHECKPOINT_NAME)
    Checkpoint(**{**planted.__dict__, "weights": [w + 100 for w in planted.weights]}).write(
        plan.run_dir
    )
    again = {n: Site(f"site-0{n}") for n in range(1, 4)}
    with pytest.raises(FederationError, match="is not the one the resume plan names"):
        run_server_app(FakeGrid(again, secagg=False), context)
    assert all(not site.rounds for site in again.values())  # nothing was trained from it
    # Re-planned from the planted file, it is still not the one the ledger recorded.
    (plan.run_dir / "plan.json").write_text(json.dumps(RunPlan.resumed(plan.run_dir).to_json()))
    with pytest.raises(FederationError, match="is not the one the ledger recorded"):
        run_server_app(FakeGrid(again, secagg=False), context)
    with workspace.ledger() as ledger:
        assert not ledger.entries(event_type=events.FEDERATION_RESUMED.name)


def test_a_run_with_no_completed_round_has_nothing_to_resume(workspace, monkeypatch):
    config = FederationConfig(
        sites=3, rounds=2, min_sites=3, privacy="none", secure_aggregation=False
    )
    plan = _plan(workspace, config)
    monkeypatch.setenv(RUN_DIR_ENV, str(plan.run_dir))
    sites = {n: Site(f"site-0{n}", refuse=1 if n == 1 else 0) for n in range(1, 4)}
    with pytest.raises(RoundFailedError) as caught:
        run_server_app(
            FakeGrid(sites, secagg=False), server_context({"insitu": plan.shared.dumps()})
        )
    assert "checkpoint" not in str(caught.value)
    with pytest.raises(FederationError, match=r"has no checkpoint .* start a new run"):
        RunPlan.resumed(plan.run_dir)


# --------------------------------------------------------------------------- progress


def test_progress_never_prints_an_unmeasured_figure_as_zero():
    record = RoundRecord(2, sites_ok=3, epsilon_by_site={"a": 0.5})
    assert record.summary(3) == (
        "3 of 3 sites, accuracy - (not evaluated this round), epsilon this run 0.500"
    )
    record.evaluation_missing = {"a": "dropout", "b": "budget"}
    assert "accuracy - (0 of 2 sites evaluated)" in record.summary(3)
    record.central_accuracy = 0.8125
    assert "held-out accuracy 0.8125" in record.summary(3)
    assert " 0.0000" not in record.summary(3)


# --------------------------------------------------------------------------- the site side


def test_a_round_trained_again_after_a_resume_is_charged_again(workspace):
    schema_doc = DataSchema.load(builtin_schema("adult")).source
    schema_doc["consent"] = {"required": False, "legal_basis": "GDPR art. 6(1)(e), test"}
    schema = DataSchema.from_dict(schema_doc)
    frame = read_table(builtin_data("adult")).iloc[:1500].reset_index(drop=True)
    train_dir, test_dir = prepare_site_data(
        workspace, frame, schema, test_fraction=0.2, source="adult.csv"
    )
    n_features = len(FeatureEncoder.for_schema(schema).names)
    config = FederationConfig(
        sites=3, rounds=2, privacy="record", epsilon=3.0, secure_aggregation=False, batch_size=64
    )
    plan = SitePlan(
        run_id="resumed-run",
        site="site-01",
        home=workspace.home,
        train_dir=train_dir,
        test_dir=test_dir,
        dataset=schema.name,
        n_features=n_features,
        config=config,
    )
    initial = get_weights(build_model("logistic", n_features))
    site = SiteClient(plan)
    _, _, first = site.fit(initial, {"round": 1})  # the round that was not checkpointed
    _, _, again = site.fit(initial, {"round": 1})  # the same round, after the resume
    assert again["epsilon_run"] > first["epsilon_run"]  # paid twice, and says so
    with workspace.ledger() as ledger:
        spent = [
            e.payload
            for e in ledger.entries(event_type=events.PRIVACY_SPENT.name)
            if e.payload["mechanism"] == "dp-sgd"
        ]
        rounds = [e.payload for e in ledger.entries(event_type=events.FEDERATION_SITE_ROUND.name)]
    assert [(p["run"], p["round"]) for p in spent] == [("resumed-run", 1)] * 2
    assert [p.get("attempt") for p in rounds] == [None, 2]
    assert rounds[1]["epsilon_run"] == again["epsilon_run"]


# --------------------------------------------------------------------------- simulation


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_simulated_site_lost_in_round_2_leaves_the_round_to_the_others(workspace, adult):
    config = FederationConfig(
        sites=3, rounds=2, privacy="none", secure_aggregation=False
    )  # quorum 2 of 3
    result = simulate(workspace, adult, config, label="income", faults={2: "raise:2"})
    first, second = result.rounds
    assert first.missing == {}
    assert set(first.participants) == {"site-01", "site-02", "site-03"}
    assert (second.sites_ok, second.missing) == (2, {"site-02": "error"})
    assert set(second.participants) == {"site-01", "site-03"}
    assert second.sites_evaluated == 3  # the site failed its training, not its evaluation
    with workspace.ledger() as ledger:
        recorded = [
            e.payload
            for e in ledger.entries(event_type=events.FEDERATION_ROUND.name)
            if e.payload["run"] == result.run_id
        ]
    assert [p["missing"] for p in recorded] == [{}, {"site-02": "error"}]
    assert recorded[1]["participants"] == second.participants


def test_the_command_line_refuses_a_quorum_secagg_cannot_unmask(workspace, capsys):
    code = run(
        ["federate", "simulate", "--home", str(workspace.home), "--data",
         str(builtin_data("adult")), "--label", "income", "--sites", "5", "--min-sites", "2"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "--min-sites 2: SecAgg+ cannot unmask a round of 5 sites with fewer than 3" in err
    assert err.strip().count("\n") == 0
