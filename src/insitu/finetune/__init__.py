"""On-device fine-tuning with DP-SGD, charged to the site's budget, installed only if better.

``docs/operations.md`` describes it; :func:`finetune` is what ``insitu finetune`` runs.

Layer 9: imports ``insitu.training``, ``insitu.update``, ``insitu.bundle``,
``insitu.data``, ``insitu.privacy`` and below.
"""

from __future__ import annotations

from insitu.finetune._finetune import (
    FinetuneResult,
    finetune,
    local_start_weights,
    split_holdout,
)

__all__ = ["FinetuneResult", "finetune", "local_start_weights", "split_holdout"]
