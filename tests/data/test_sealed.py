"""Sealed local files, and that an interrupted run leaves no plaintext behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insitu._sealed import read_sealed, write_sealed
from insitu.data import DataSchema, SiteDataset
from insitu.datasets import builtin_data, builtin_schema
from insitu.errors import SealedFileError

KEY = bytes(range(32))


def test_round_trip_and_mode(tmp_path):
    path = tmp_path / "cache.sealed"
    write_sealed(path, b"rows of a site", KEY, context="prepared-data")
    assert read_sealed(path, KEY, context="prepared-data") == b"rows of a site"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert b"rows of a site" not in path.read_bytes()


def test_wrong_site_key_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "cache.sealed"
    write_sealed(path, b"x", KEY, context="prepared-data")
    with pytest.raises(SealedFileError, match="sealed with another site key"):
        read_sealed(path, bytes(32), context="prepared-data")


def test_a_file_moved_into_another_role_is_refused(tmp_path):
    path = tmp_path / "cache.sealed"
    write_sealed(path, b"x", KEY, context="checkpoint")
    with pytest.raises(SealedFileError, match="holds 'checkpoint'"):
        read_sealed(path, KEY, context="prepared-data")


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_single_byte_change_of_a_sealed_file_is_refused(tmp_path, position, flip):
    path = tmp_path / "cache.sealed"
    write_sealed(path, b"0123456789" * 20, KEY, context="prepared-data")
    data = bytearray(path.read_bytes())
    data[position % len(data)] ^= flip
    path.write_bytes(bytes(data))
    with pytest.raises(SealedFileError):
        read_sealed(path, KEY, context="prepared-data")


def test_truncated_sealed_file_is_refused(tmp_path):
    path = tmp_path / "cache.sealed"
    write_sealed(path, b"0123456789" * 20, KEY, context="prepared-data")
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(SealedFileError, match="altered or truncated"):
        read_sealed(path, KEY, context="prepared-data")


def test_prepared_release_opens_only_in_its_workspace(workspace, tmp_path):
    from insitu.workspace import Workspace

    out = tmp_path / "release"
    SiteDataset.from_file(
        workspace, builtin_data(), DataSchema.load(builtin_schema()), suppress=True, out=out
    )
    assert SiteDataset.open(workspace, out).prepared.report.rows_out == 29459
    other, _ = Workspace.init(tmp_path / "other")
    with pytest.raises(SealedFileError, match="another site key"):
        SiteDataset.open(other, out)


@pytest.mark.slow
def test_sigkill_during_prepare_leaves_no_plaintext(workspace, tmp_path):
    out = workspace.home / "prepared" / "adult"
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from insitu.data import DataSchema, SiteDataset
        from insitu.datasets import builtin_data, builtin_schema
        from insitu.workspace import Workspace

        ws = Workspace.open({str(workspace.home)!r})
        schema = DataSchema.load(builtin_schema())
        while True:
            SiteDataset.from_file(ws, builtin_data(), schema, suppress=True, out=Path({str(out)!r}))
        """
    )
    rng = random.Random(3)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", script])
        time.sleep(rng.uniform(1.0, 2.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    files = [p for p in [*workspace.home.rglob("*"), *tmp_path.rglob("*")] if p.is_file()]
    for path in files:
        # Raw record ids look like adult-00001; none may be on disk in the clear.
        assert b"adult-0" not in path.read_bytes(), path
    # A later run cleans up partial ciphertext and leaves one complete release.
    SiteDataset.from_file(
        workspace, builtin_data(), DataSchema.load(builtin_schema()), suppress=True, out=out
    )
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "prepared.sealed"]
    assert SiteDataset.open(workspace, out).prepared.report.rows_out == 29459
