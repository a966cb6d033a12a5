"""The batch size and local learning rate a run uses when the user gives none.

Here, below both ``federated`` (whose runs use them) and ``attacks`` (whose shadow models
must train as the audited run's sites did), so that the two cannot drift apart.
"""

from __future__ import annotations

import math

__all__ = ["DEFAULT_BATCH_RULE", "default_batch", "default_learning_rate"]

#: Bounds of the batch size chosen from a site's size (:func:`default_batch`).
AUTO_BATCH_MIN, AUTO_BATCH_MAX = 8, 256
#: The chosen batch is about this share of a site's records (4 steps an epoch at least).
AUTO_BATCH_SHARE = 1 / 4
#: The rule in words (``federation.started`` records it).
DEFAULT_BATCH_RULE = (
    f"1/4 of a site's records as a power of two, {AUTO_BATCH_MIN} to {AUTO_BATCH_MAX}"
)
#: The local learning rate when none is given, by server optimizer: plain averaging
#: takes the sites' steps as they are (2.0: the rate insitu used before), an adaptive
#: server optimizer rescales them (measured on breast cancer, make_classification, Adult).
AUTO_LEARNING_RATE = {"fedavg": 2.0, "fedadam": 1.0, "fedyogi": 1.0}


def default_batch(rows: int) -> int:
    """About a quarter of ``rows`` as a power of two, from 8 to 256 (120 rows: 32)."""
    target = max(rows, 1) * AUTO_BATCH_SHARE
    power = 2 ** round(math.log2(max(target, 1.0)))
    return int(min(AUTO_BATCH_MAX, max(AUTO_BATCH_MIN, power)))


def default_learning_rate(server_optimizer: str) -> float:
    """The local rate for a run whose server applies ``server_optimizer``."""
    return AUTO_LEARNING_RATE.get(server_optimizer, AUTO_LEARNING_RATE["fedavg"])
