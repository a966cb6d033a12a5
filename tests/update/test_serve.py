"""The lab server: loopback by default, serves the public tree only."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from insitu.errors import RepositoryError
from insitu.update import init_directory_repository
from insitu.update._serve import DEFAULT_HOST, make_server
from tests.update._http import serving


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_serves_metadata_but_never_keys_or_listings(tmp_path):
    init_directory_repository(
        tmp_path / "repo", publishers=[Ed25519PrivateKey.generate().public_key()]
    )
    assert DEFAULT_HOST == "127.0.0.1"
    with serving(tmp_path / "repo") as url:
        assert _get(f"{url}/metadata/1.root.json") == 200
        assert _get(f"{url}/metadata/timestamp.json") == 200
        assert _get(f"{url}/metadata/") == 404  # no directory listing
        assert _get(f"{url}/keys/root-1.key") == 404
        assert _get(f"{url}/../keys/root-1.key") == 404


def test_no_repository_no_server(tmp_path):
    with pytest.raises(RepositoryError, match="insitu repo init"):
        make_server(tmp_path)


def test_init_refuses_an_existing_repository(tmp_path):
    publisher = Ed25519PrivateKey.generate().public_key()
    init_directory_repository(tmp_path / "repo", publishers=[publisher])
    with pytest.raises(RepositoryError, match="already holds"):
        init_directory_repository(tmp_path / "repo", publishers=[publisher])


def test_an_interrupted_init_leaves_nothing(tmp_path, monkeypatch):
    from insitu.update import UpdateRepository

    def fail(*args, **kwargs):
        raise RepositoryError("disk full")

    monkeypatch.setattr(UpdateRepository, "create", fail)
    with pytest.raises(RepositoryError, match="disk full"):
        init_directory_repository(
            tmp_path / "repo", publishers=[Ed25519PrivateKey.generate().public_key()]
        )
    assert list(tmp_path.iterdir()) == []
