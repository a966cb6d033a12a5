"""The client protocol of the TUF conformance suite (tuf-conformance's CLIENT-CLI.md).

``insitu update tuf-client`` runs these, so the metadata workflow insitu relies on can be
checked by the public suite, not only by insitu's own tests. They are thin on purpose:
the workflow is python-tuf's ``ngclient.Updater``, the same one :class:`UpdateClient`
uses, with the trust anchor the suite's ``init`` provides.

* ``init``: copy the trusted root into the metadata directory; no network.
* ``refresh``: the TUF client workflow for the top-level roles.
* ``download``: refresh, then fetch each ``--target-name`` (the option repeats), in the
  order given and with one Updater, into the target directory, verified by length and
  hash, unless an up-to-date copy is already there (artifact caching). The first target
  the metadata does not list, or that fails to verify, stops the command (exit 1).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from tuf.ngclient import Updater

from insitu.errors import RepositoryError
from insitu.update._refusals import tuf_refusals

__all__ = ["tuf_download", "tuf_init", "tuf_refresh"]


def tuf_init(metadata_dir: Path, trusted_root: Path) -> None:
    """Trust ``trusted_root``: copy it to ``metadata_dir/root.json``."""
    metadata_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(trusted_root, metadata_dir / "root.json")


def _updater(
    metadata_dir: Path, metadata_url: str, target_dir: Path | None, target_url: str | None
) -> Updater:
    if not (metadata_dir / "root.json").exists():
        raise RepositoryError(f"no trusted root in {metadata_dir}; run 'init' first")
    # The suite's init stored the trust anchor in the metadata directory; using the cached
    # root (bootstrap=None) is exactly what the protocol asks for.
    return Updater(
        str(metadata_dir),
        metadata_url,
        str(target_dir) if target_dir else None,
        target_url,
        bootstrap=None,
    )


def tuf_refresh(metadata_dir: Path, metadata_url: str) -> None:
    """Refresh the top-level metadata."""
    with tuf_refusals("refresh"):
        _updater(metadata_dir, metadata_url, None, None).refresh()


def tuf_download(
    metadata_dir: Path,
    metadata_url: str,
    target_names: Sequence[str],
    target_url: str,
    target_dir: Path,
) -> list[Path]:
    """Download each of ``target_names``, in order, into ``target_dir`` (cached copies reused).

    One Updater serves them all: one refresh, then each target looked up in the same
    trusted metadata, as the protocol requires.
    """
    if not target_names:
        raise RepositoryError("no target to download; give --target-name (repeatable)")
    target_dir.mkdir(parents=True, exist_ok=True)
    updater = _updater(metadata_dir, metadata_url, target_dir, target_url)
    with tuf_refusals("refresh"):
        updater.refresh()
    paths: list[Path] = []
    for name in target_names:
        with tuf_refusals(f"download of {name}"):
            info = updater.get_targetinfo(name)
            if info is None:
                raise RepositoryError(f"target {name} is not in the repository's metadata")
            cached = updater.find_cached_target(info)
            paths.append(Path(cached or updater.download_target(info)))
    return paths
