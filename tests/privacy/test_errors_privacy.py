"""A privacy audit that measures more leakage than the accounting allows is an error.

``insitu privacy one-run`` raises :class:`BoundViolationError` after it printed and
recorded the audit; the build under audit here replays its noise from the published seed
(the bug the audit exists to catch).
"""

from __future__ import annotations

import pytest
import typer

import insitu.attacks as attacks
from insitu.cli import app, run
from insitu.errors import BoundViolationError
from insitu.workspace import Workspace

from .conftest import SeededRandom

ONE_RUN = ["privacy", "one-run", "--epsilon", "1", "--data", "breast-cancer"]
SMALL = ["--canaries", "500", "--steps", "50"]


def _insitu(*args: str) -> None:
    """``insitu ARGS`` as the console script runs it, but with the error let through."""
    command = typer.main.get_command(app)
    command.main(args=list(args), prog_name="insitu", standalone_mode=False)


@pytest.fixture
def replayed_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    real = attacks.insitu_mechanism

    def broken(**settings):
        return real(**settings, randomness_for_seed=SeededRandom)

    monkeypatch.setattr(attacks, "insitu_mechanism", broken)


@pytest.mark.usefixtures("replayed_noise")
def test_a_one_run_audit_above_the_claimed_epsilon_raises_after_recording(tmp_path, capsys):
    home = tmp_path / "ws"
    assert run(["init", "--home", str(home)]) == 0
    with pytest.raises(
        BoundViolationError,
        match=r"proves epsilon >= .* above the claimed 1: DP-SGD leaks .* do not train",
    ) as caught:
        _insitu(*ONE_RUN, *SMALL, "--home", str(home))
    assert caught.value.exit_code == 1
    assert "FLAGGED" in capsys.readouterr().out  # the verdict is printed before the error
    with Workspace.open(home).ledger() as ledger:
        (entry,) = ledger.entries(event_type="privacy.one_run_audit")
    assert entry.payload["flagged"] is True
