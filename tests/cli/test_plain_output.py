"""Output that is not a terminal (cron mail, CI logs, pipes) is never hard-wrapped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_a_long_path_and_a_warning_stay_on_one_line_in_a_log(tmp_path: Path) -> None:
    home = tmp_path / ("a-long-directory-name-" * 6) / "site"
    env = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "INSITU_PASSPHRASE"}}
    proc = subprocess.run(
        [sys.executable, "-c", "from insitu.cli import main; main()", "init", "--home", str(home)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert any(str(home) in line for line in proc.stdout.splitlines()), proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert warnings[0].endswith("on any machine that holds real data.")
