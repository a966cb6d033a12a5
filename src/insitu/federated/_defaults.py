"""Defaults that need no tuning: a server optimizer and inputs centred while training.

Two things made insitu's federated models poor on data nobody had tuned for (issue 18):

* **Uncentred inputs.** The schema scales each numeric feature to [0, 1] by its declared
  range. Every input is then positive, around the middle of its range, so the bias and
  the sum of the features point the same way: the loss is badly conditioned and plain
  SGD at the rate insitu used (2.0) oscillates. On ``make_classification`` (20 features
  declared over [-10, 10]) a non-private run stayed at 0.50 accuracy. :func:`centered`
  trains on ``2x - 1`` instead (each input in [-1, 1], centred on the middle of its
  declared range: a function of the schema, not of anyone's data), and
  :func:`fold_centering` folds that shift into the first layer of the final model, so the
  saved model takes the schema's encoding as it is (serving, bundles, drift and
  fine-tuning see an ordinary model).
* **A step size the user must tune.** :class:`ServerOptimizer` applies FedAdam or
  FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021) to the aggregated
  update: the aggregate is what the sites released (under DP, already noised), and the
  optimizer is a function of it and of earlier aggregates only, so it is post-processing
  and costs no privacy. It wraps whatever strategy the run chose (FedAvg, the robust
  means, site-level DP), outermost, so site-level DP noise is added *before* it.
  Flower's own ``FedAdam``/``FedYogi`` are subclasses of ``FedAvg`` and cannot wrap
  :class:`~insitu.federated._server_app.SiteLevelDP` or the robust means; the update rule
  here is theirs (no bias correction; ``eta``, ``beta_1`` 0.9, ``beta_2`` 0.99, ``tau``).
  A run resumed from a checkpoint starts the optimizer's moments afresh.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from insitu.federated._config import FederationConfig

__all__ = [
    "RoundKeeper",
    "ServerOptimizer",
    "centered",
    "central_baseline",
    "fold_centering",
    "uses_centering",
    "wrap",
]

BETA_1, BETA_2 = 0.9, 0.99


class _Center(torch.nn.Module):
    """``2x - 1``: inputs scaled to [0, 1] by their declared range, centred on its middle."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 - 1.0


def uses_centering(config: FederationConfig, model: torch.nn.Module) -> bool:
    """Whether a run trains ``model`` on centred inputs.

    Tabular families whose first layer is linear (``logistic``, ``mlp``), when the run
    asks for it (``center_inputs``).
    """
    first = next(iter(model.children()), None) if isinstance(model, torch.nn.Sequential) else None
    return config.center_inputs and isinstance(first, torch.nn.Linear)


def centered(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` after :class:`_Center`, with the same ``state_dict`` keys (no parameter)."""
    if not isinstance(model, torch.nn.Sequential):
        raise TypeError("only sequential models are trained on centred inputs")
    layers: OrderedDict[str, torch.nn.Module] = OrderedDict(center=_Center())
    layers.update(model.named_children())
    return torch.nn.Sequential(layers)


def fold_centering(weights: list[np.ndarray]) -> list[np.ndarray]:
    """Weights of a model trained on ``2x - 1``, as a model of ``x``.

    ``W(2x - 1) + b`` is ``(2W)x + (b - W 1)``; ``weights[0]`` and ``weights[1]`` are the
    first layer's.
    """
    first, bias = weights[0].astype(np.float64), weights[1].astype(np.float64)
    folded = [
        (2.0 * first).astype(weights[0].dtype),
        (bias - first.sum(axis=1)).astype(weights[1].dtype),
    ]
    return folded + [w.copy() for w in weights[2:]]


class ServerOptimizer(Strategy):
    """FedAdam or FedYogi on the aggregate of an inner strategy (see the module docstring)."""

    def __init__(self, inner: Strategy, *, config: FederationConfig, initial: Parameters) -> None:
        super().__init__()
        self.inner = inner
        self.kind = config.server_optimizer
        self.eta, self.tau = config.server_learning_rate, config.server_tau
        self.current = [np.asarray(w, dtype=np.float64) for w in parameters_to_ndarrays(initial)]
        self.m = [np.zeros_like(w) for w in self.current]
        self.v = [np.zeros_like(w) for w in self.current]

    def __repr__(self) -> str:
        return f"ServerOptimizer({self.inner!r}, {self.kind}, eta={self.eta}, tau={self.tau})"

    def step(self, aggregate: list[np.ndarray]) -> list[np.ndarray]:
        """One optimizer step towards ``aggregate``; the new global weights."""
        dtypes = [a.dtype for a in aggregate]
        deltas = [
            np.asarray(a, dtype=np.float64) - c
            for a, c in zip(aggregate, self.current, strict=True)
        ]
        self.m = [BETA_1 * m + (1 - BETA_1) * d for m, d in zip(self.m, deltas, strict=True)]
        if self.kind == "fedyogi":
            self.v = [
                v - (1 - BETA_2) * d * d * np.sign(v - d * d)
                for v, d in zip(self.v, deltas, strict=True)
            ]
        else:
            self.v = [
                BETA_2 * v + (1 - BETA_2) * d * d for v, d in zip(self.v, deltas, strict=True)
            ]
        self.current = [
            c + self.eta * m / (np.sqrt(v) + self.tau)
            for c, m, v in zip(self.current, self.m, self.v, strict=True)
        ]
        return [c.astype(t) for c, t in zip(self.current, dtypes, strict=True)]

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Delegate."""
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Delegate."""
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The inner strategy's aggregate, then one optimizer step from the current model."""
        aggregated, metrics = self.inner.aggregate_fit(server_round, results, failures)
        if aggregated is None:
            return None, metrics
        return ndarrays_to_parameters(self.step(parameters_to_ndarrays(aggregated))), metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Delegate."""
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Delegate."""
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Delegate."""
        return self.inner.evaluate(server_round, parameters)


def wrap(strategy: Strategy, config: FederationConfig, initial: Parameters) -> Strategy:
    """``strategy`` with the run's server optimizer outermost, or as it is (``fedavg``)."""
    if config.server_optimizer == "fedavg":
        return strategy
    return ServerOptimizer(strategy, config=config, initial=initial)


class RoundKeeper:
    """The round whose model is kept, by accuracy on a held-out set that is no site's data.

    Simulation only: the coordinator holds back part of the file (the *selection* half of
    its central rows), so choosing a round by it spends no site's privacy budget; the
    accuracy it reports is measured on the other half, which took no part in the choice.
    The last round is kept unless an earlier one beats it on the selection rows by more
    than two standard errors of the last round's accuracy there (on 57 rows, about 8
    points; on 3,000, about 1.4): on a few dozen rows the best round is mostly chance, and
    choosing it kept a first round far below the last. A deployment keeps the last round
    (no such set exists there, and choosing by the sites' figures would need a DP release).
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.best: tuple[int, float, list[np.ndarray]] | None = None
        self.last: tuple[int, float, list[np.ndarray]] | None = None

    def observe(self, server_round: int, weights: list[np.ndarray], accuracy: float) -> None:
        """Note a round's selection accuracy (the best so far and the latest are kept)."""
        seen = (server_round, accuracy, [w.copy() for w in weights])
        if self.best is None or accuracy > self.best[1]:
            self.best = seen
        self.last = seen

    def margin(self) -> float:
        """How much better an earlier round must be: two standard errors of the last's."""
        accuracy = self.last[1] if self.last else 0.5
        spread = max(accuracy * (1 - accuracy), 1.0 / max(self.rows, 1))
        return 2.0 * math.sqrt(spread / max(self.rows, 1))

    def kept(self) -> tuple[int, float, list[np.ndarray]] | None:
        """(round, selection accuracy, weights) of the kept round; None before any round."""
        if self.best is None or self.last is None:
            return None
        return self.best if self.best[1] - self.last[1] > self.margin() else self.last

    @property
    def round(self) -> int:
        """The kept round (0 before any)."""
        kept = self.kept()
        return kept[0] if kept else 0

    @property
    def weights(self) -> list[np.ndarray] | None:
        """The kept round's weights (None before any round)."""
        kept = self.kept()
        return kept[2] if kept else None

    def reason(self, last_round: int) -> str:
        """Why the kept round was kept, in one line."""
        kept = self.kept()
        if kept is None or self.last is None:
            return "the last round"
        where = (
            f"on the coordinator's {self.rows} selection rows (simulation only; no site's "
            "data, no privacy cost)"
        )
        if kept[0] == self.last[0]:
            return (
                f"round {kept[0]} of {last_round}, the last: no earlier round beat its accuracy "
                f"({kept[1]:.4f}) by more than {self.margin():.4f} {where}"
            )
        return (
            f"round {kept[0]} of {last_round}: its accuracy ({kept[1]:.4f}) beat the last "
            f"round's ({self.last[1]:.4f}) by more than {self.margin():.4f} {where}; the "
            "sites' figures of the final round describe the last round's model"
        )


def central_baseline(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> float:
    """Accuracy of a non-private logistic regression on pooled records (simulation only).

    Full-batch L-BFGS on the same encoded features, with a small L2 penalty (1e-4): the
    figure a central analyst with every site's records would reach with the same inputs.
    """
    torch.manual_seed(0)
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y.astype(np.float32))
    layer = torch.nn.Linear(x.shape[1], 1)
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = layer(x * 2.0 - 1.0).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        loss = loss + 1e-4 * (layer.weight**2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        predicted = layer(torch.from_numpy(test_x) * 2.0 - 1.0).squeeze(-1) > 0
    return float((predicted.numpy().astype(np.int64) == test_y.astype(np.int64)).mean())
