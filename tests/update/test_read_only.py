"""An update directory that refuses writes: mounted read-only, or a disk that fills up in
the middle of an install.

Either way ``insitu update`` exits 1 with one line naming the update directory and what
to check, records ``update.failed`` in the ledger (which lives elsewhere and can still
be written), and leaves nothing half-written: no temporary file, the active slot and
``state.json`` as they were. Once the disk is writable again, the next update completes.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.update._cli import Site, invoke, invoke_json
from tests.update._http import serving

CLI = "import sys; from insitu.cli import run; sys.exit(run(sys.argv[1:]))"
# In a private mount namespace (unshare: no privilege needed where user namespaces are
# allowed), the directory is bind-mounted over itself read-only: a real EROFS, as on a
# device whose data partition was remounted read-only after an error.
READ_ONLY_MOUNT = (
    'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"'
)


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


@contextmanager
def read_only(directory: Path) -> Iterator[list[str]]:
    """A command prefix under which ``directory`` cannot be written."""
    if _can_unshare():
        yield ["unshare", "-rm", "sh", "-c", READ_ONLY_MOUNT, "sh", str(directory)]
        return
    if os.geteuid() == 0:
        pytest.skip("needs unshare (user namespaces), or a user other than root for chmod")
    paths = [directory, *directory.rglob("*")]
    modes = {p: p.lstat().st_mode for p in paths if not p.is_symlink()}
    for path, mode in modes.items():
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield []
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def _tree(directory: Path) -> dict[str, bytes | str]:
    """Every entry under ``directory``: file contents, link targets, directory markers."""
    tree: dict[str, bytes | str] = {}
    for path in sorted(directory.rglob("*")):
        name = str(path.relative_to(directory))
        if path.is_symlink():
            tree[name] = f"-> {path.readlink()}"
        elif path.is_dir():
            tree[name] = "dir"
        else:
            tree[name] = path.read_bytes()
    return tree


@pytest.fixture
def site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[tuple[Site, str]]:
    """1.0.0 installed on the device; 2.0.0 published and not yet installed."""
    site = Site.make(tmp_path, capsys)
    site.publish("1.0.0")
    with serving(site.repo) as url:
        site.enroll(url)
        invoke_json(capsys, "update", "--home", site.device)
        site.publish("2.0.0")
        yield site, url


def test_a_read_only_update_directory_is_one_line_and_changes_nothing(site, capsys):
    site, _ = site
    before = _tree(site.update_dir)
    with read_only(site.update_dir) as prefix:
        child = subprocess.run(
            [*prefix, sys.executable, "-c", CLI, "update", "--home", site.device],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert child.returncode == 1, child.stderr
    (line,) = child.stderr.strip().splitlines()
    assert line.startswith(f"error: update failed: the update directory {site.update_dir} ")
    assert "cannot be written" in line
    assert ("EROFS" in line and "not mounted read-only" in line) or "EACCES" in line
    assert "then run 'insitu update' again" in line
    assert "unexpected" not in line
    assert _tree(site.update_dir) == before  # nothing written, nothing half-written
    failed = site.update_events()[-1]
    assert failed.type == "update.failed"
    assert failed.payload["action"] == "update"
    assert failed.payload["reason"].split(":")[0] in {"EROFS", "EACCES"}
    # Writable again: the update completes.
    assert invoke_json(capsys, "update", "--home", site.device)["installed"] == "2.0.0"


def test_a_disk_full_during_the_install_leaves_nothing_half_written(site, capsys, monkeypatch):
    site, _ = site
    slots = site.update_dir / "slots"
    slots_before = _tree(slots)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        # The disk fills up while the new slot's temporary file is flushed.
        target = str(Path(f"/proc/self/fd/{fd}").readlink())
        if f"{os.sep}slots{os.sep}." in target and target.endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code, _, err = invoke(capsys, "update", "--home", site.device)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert code == 1
    (line,) = err.strip().splitlines()
    assert f"the update directory {site.update_dir} cannot be written" in line
    assert "ENOSPC: No space left on device" in line
    assert "check the free space on its disk" in line
    assert _tree(slots) == slots_before  # no temporary file, no slot b, same state.json
    leftovers = [p for p in site.update_dir.rglob("*") if p.suffix in {".tmp", ".part"}]
    assert leftovers == []
    failed = site.update_events()[-1]
    assert (failed.type, failed.payload["reason"]) == (
        "update.failed",
        "ENOSPC: No space left on device",
    )
    assert invoke_json(capsys, "update", "--home", site.device)["installed"] == "2.0.0"


def test_a_read_only_update_directory_refuses_a_rollback_in_one_line(site, capsys):
    site, _ = site
    invoke_json(capsys, "update", "--home", site.device)  # 2.0.0: something to roll back to
    before = _tree(site.update_dir)
    with read_only(site.update_dir) as prefix:
        child = subprocess.run(
            [*prefix, sys.executable, "-c", CLI, "rollback", "--home", site.device],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert child.returncode == 1, child.stderr
    (line,) = child.stderr.strip().splitlines()
    assert f"rollback failed: the update directory {site.update_dir} cannot be written" in line
    assert _tree(site.update_dir) == before
    assert site.update_events()[-1].payload["action"] == "rollback"
