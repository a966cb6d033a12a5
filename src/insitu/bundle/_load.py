"""Load a bundle into an ONNX Runtime session, the model decrypted in memory only.

ONNX Runtime takes a model as ``bytes`` or as a path. ``bytes`` would cost a full copy
of the decrypted model (Python's ``bytes`` cannot be written in place), and ONNX Runtime
builds a session from a file faster than from bytes. On Linux the model is therefore
decrypted straight into an anonymous memory file (``memfd_create``: RAM only, never on a
file system, reachable only through this process's ``/proc/self/fd``), the session is
created from that path, and the file is closed as soon as the session exists. Segments are
decrypted into a few recycled 1 MiB buffers and written into that file (no buffer of the
whole model is allocated), and hashed in a second thread meanwhile. A bundle given as a
path is mapped (``mmap``) rather than read. Elsewhere the model is copied into ``bytes``.

Invariant: the session is created only after the signature, the key unwrapping and the
model digest have all been checked (:meth:`BundleVerifier.open_to`); a failed check
closes the memory file unused.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

from insitu._ort import create_session
from insitu.bundle._format import Bundle
from insitu.bundle._stream import DeviceKey
from insitu.bundle._verify import BundleVerifier
from insitu.errors import MalformedBundleError

__all__ = ["load_session"]


def _source(path: Path) -> Any:
    try:
        with path.open("rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return b""
            # The mapping keeps its own reference to the file; it is unmapped when the
            # last view of it is dropped, at the end of load_session.
            return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise MalformedBundleError(f"cannot read bundle {path} ({exc.strerror or exc})") from exc


def load_session(
    source: Path | bytes | bytearray | memoryview,
    verifier: BundleVerifier,
    device_key: DeviceKey | None,
    *,
    intra_op_threads: int | None = None,
    spinning: bool = True,
) -> tuple[Bundle, Any]:
    """Verify and decrypt a bundle (a file or its bytes); return it and a session.

    The returned :class:`Bundle` carries the verified header only (no payload).
    ``intra_op_threads`` and ``spinning`` are passed to
    :func:`~insitu.runtime.create_session`.
    """
    data = _source(source) if isinstance(source, Path) else source
    bundle = Bundle.parse(data)
    # The signature first: the model length below sizes a buffer, so it must be signed.
    verifier.verify(bundle, check_payload=False)
    header = Bundle.parse(bundle.header_bytes)
    length = int(bundle.signed["files"]["model.onnx"]["length"])
    if not hasattr(os, "memfd_create") or length == 0:
        opened = verifier.open(bundle, device_key, check_payload=False)
        return header, create_session(
            bytes(opened.model), intra_op_threads=intra_op_threads, spinning=spinning
        )
    fd = os.memfd_create("insitu-model", os.MFD_CLOEXEC)

    def write(segment: memoryview) -> None:
        # write(2) into the memory file: one kernel copy per segment from a small,
        # cache-hot buffer (faster here than faulting in a mapping of the whole model).
        while segment:
            segment = segment[os.write(fd, segment) :]

    try:
        verifier.open_to(bundle, device_key, write, check_payload=False)
        return header, create_session(
            f"/proc/self/fd/{fd}", intra_op_threads=intra_op_threads, spinning=spinning
        )
    finally:
        os.close(fd)
