"""The guard ends a Flower process tree when the insitu process that started it is killed.

Found by the server-resume test in a CI run: after the server's insitu process was
killed with SIGKILL, its SuperLink died (death signal) but the ``flwr-serverapp`` its
SuperExec had started lived on for minutes (Flower's ``--parent-pid`` watch is polled by
a busy process). The stand-in here is a grandchild that ignores every parent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

#: Starts, through ``spawn``, a child that starts a grandchild which never looks at its
#: parent and leaves the group for a session of its own (as Flower's SuperExec does);
#: prints both pids, then waits to be killed.
STARTER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from insitu.federated._processes import spawn

    child = [sys.executable, "-c",
             "import subprocess, sys, time;"
             "g = subprocess.Popen(['sleep', '300'], start_new_session=True);"
             "print(g.pid, flush=True); time.sleep(300)"]
    process = spawn(child, log_path=Path(sys.argv[1]), env=dict(__import__('os').environ),
                    cwd=Path(sys.argv[1]).parent)
    print(json.dumps({"guard": process.pid}), flush=True)
    time.sleep(300)
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_attack_killing_the_insitu_process_leaves_no_flower_process_behind(tmp_path: Path):
    log = tmp_path / "child.log"
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(log)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert starter.stdout is not None
        guard = json.loads(starter.stdout.readline())["guard"]
        deadline = time.monotonic() + 30
        while not log.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.1)
        grandchild = int(log.read_text().split()[0])
        assert _alive(grandchild)
        starter.send_signal(signal.SIGKILL)  # no finally of insitu's runs
        starter.wait(10)
        assert _wait_gone([guard, grandchild], 30) == []
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait(10)
        if starter.stdout:
            starter.stdout.close()


def test_a_command_that_ends_by_itself_takes_what_it_left_with_it(tmp_path: Path):
    script = "import subprocess; g = subprocess.Popen(['sleep', '300']); print(g.pid, flush=True)"
    done = subprocess.run(
        [sys.executable, "-m", "insitu.federated._guard", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
        check=False,
    )
    assert done.returncode == 0
    assert _wait_gone([int(done.stdout.split()[0])], 10) == []


def test_the_guard_passes_the_commands_exit_code_and_refuses_no_command():
    done = subprocess.run(
        [sys.executable, "-m", "insitu.federated._guard", sys.executable, "-c", "exit(3)"],
        timeout=60,
        start_new_session=True,
        check=False,
    )
    assert done.returncode == 3
    bare = subprocess.run(
        [sys.executable, "-m", "insitu.federated._guard"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ),
    )
    assert bare.returncode == 2
    assert "usage:" in bare.stderr
