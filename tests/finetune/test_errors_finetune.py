"""Local data that cannot be split for fine-tuning: refused before any budget is charged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from insitu.errors import UnusableSplitError
from insitu.finetune import finetune, split_holdout

from ._device import NAME, Device, build_device


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Device:
    return build_device(tmp_path_factory.mktemp("device"))


def _spent(device: Device) -> list[dict]:
    with device.workspace().ledger() as ledger:
        return [e.payload for e in ledger.entries(event_type="privacy.spent")]


def test_local_records_of_a_single_class_are_refused_and_nothing_is_charged(
    device: Device, tmp_path: Path
) -> None:
    # A ward that only ever records one outcome: no accuracy can be measured on it.
    frame = pd.read_csv(device.data)
    single = tmp_path / "one-class.csv"
    frame[frame[device.schema.label] == "<=50K"].to_csv(single, index=False)
    state, spent = device.state(), _spent(device)
    with pytest.raises(
        UnusableSplitError, match=r"training split holds a single class .* of every class"
    ):
        finetune(device.workspace(), NAME, single)
    assert device.state() == state
    assert _spent(device) == spent


def test_too_few_records_to_hold_any_out_are_refused() -> None:
    # Two records, one of each class: 30% of one record rounds to none held out.
    with pytest.raises(UnusableSplitError, match=r"local held-out split is empty \(2 usable"):
        split_holdout(np.array([0, 1]), fraction=0.3, seed=0)
