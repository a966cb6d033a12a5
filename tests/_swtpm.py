"""A software TPM 2.0 for tests and benchmarks: ``swtpm`` with a tpm2-pkcs11 token on it.

:class:`SoftwareTpm` starts its own ``swtpm socket --tpm2`` on free ports with a state
directory of its own (flags ``not-need-init,startup-clear``), makes a tpm2-pkcs11 store
beside it (``tpm2_ptool init``) and one token, and gives the environment that points
tpm2-pkcs11 at them (``TPM2_PKCS11_TCTI``, ``TPM2_PKCS11_STORE``; ``TSS2_LOG=all+NONE``).
:meth:`SoftwareTpm.stop` ends the process.

The token is made with ``C_InitToken`` through PyKCS11 rather than ``tpm2_ptool
addtoken``: without a resource manager (swtpm has none) the tool loads more objects at
once than the TPM holds ("out of memory for object contexts"), while the library flushes
what it loads.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so"
TOOLS = ("swtpm", "tpm2_ptool", "tpm2_flushcontext")


def missing() -> str | None:
    """What is not installed for a software TPM, or ``None``."""
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: swtpm, tpm2-tools, tpm2-pkcs11)"
    if not Path(MODULE).is_file():
        return f"{MODULE} is not installed (Debian: libtpm2-pkcs11-1)"
    return None


def _free_ports() -> tuple[int, int]:
    """Two free TCP ports ``N, N + 1``: the swtpm TCTI takes the control channel at N + 1."""
    for _ in range(100):
        with socket.socket() as one, socket.socket() as two:
            one.bind(("127.0.0.1", 0))
            port = int(one.getsockname()[1])
            try:
                two.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port, port + 1
    raise RuntimeError("found no two consecutive free ports for swtpm")


_INIT_TOKEN = """
import sys, PyKCS11
lib = PyKCS11.PyKCS11Lib()
lib.load(sys.argv[1])
slot = lib.getSlotList(tokenPresent=True)[0]
lib.initToken(slot, sys.argv[3], sys.argv[2].ljust(32))
(slot,) = [s for s in lib.getSlotList() if lib.getTokenInfo(s).label.strip() == sys.argv[2]]
session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
session.login(sys.argv[3], user_type=PyKCS11.CKU_SO)
session.initPin(sys.argv[4])
session.logout()
session.closeSession()
"""


class SoftwareTpm:
    """A running ``swtpm`` and a tpm2-pkcs11 store under ``root`` holding one token."""

    def __init__(self, root: Path, *, token: str, pin: str, so_pin: str) -> None:
        (root / "state").mkdir(parents=True)
        (root / "store").mkdir()
        self.port, control = _free_ports()
        self.process = subprocess.Popen(
            [
                *("swtpm", "socket", "--tpm2", "--tpmstate", f"dir={root / 'state'}"),
                *("--server", f"type=tcp,port={self.port}"),
                *("--ctrl", f"type=tcp,port={control}"),
                *("--flags", "not-need-init,startup-clear"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        tcti = f"swtpm:port={self.port}"
        self.env = {
            "TPM2_PKCS11_TCTI": tcti,
            "TPM2TOOLS_TCTI": tcti,
            "TPM2_PKCS11_STORE": str(root / "store"),
            "TSS2_LOG": "all+NONE",
        }
        try:
            self._wait_listening()
            self._run("tpm2_ptool", "init")
            # No resource manager: what tpm2_ptool's commands loaded stays in the TPM.
            self._run("tpm2_flushcontext", "-t")
            self._run(sys.executable, "-c", _INIT_TOKEN, MODULE, token, so_pin, pin)
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self) -> None:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                time.sleep(0.05)
            else:
                return
        raise RuntimeError(f"swtpm did not listen on port {self.port}")

    def _run(self, *command: str) -> None:
        done = subprocess.run(
            command, env=os.environ | self.env, check=False, capture_output=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {done.stderr.decode(errors='replace')}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
