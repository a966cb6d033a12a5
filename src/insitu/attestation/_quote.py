"""The prover's side: a TPM 2.0 extends the build's digest into a PCR and quotes it.

Why tpm2-tools as subprocesses: the venv holds no Python TSS (``tpm2-pytss`` is not
installed and its wheels need the TSS headers at build time), and tpm2-tools is the
TPM2 Software Stack's own command line, packaged by every distribution beside swtpm.
Each operation is one short process (about 10 ms on swtpm); nothing is parsed from their
text output: keys come out as PEM, quotes as the TPM's own binary structures.

The TPM is reached through a TCTI string (``INSITU_TPM_TCTI``: ``swtpm:port=2321`` for
the software TPM, ``device:/dev/tpmrm0`` for a real one through the kernel's resource
manager). Without a resource manager (swtpm) every tool's transient objects are flushed
after it, so the TPM's three object slots never fill up.

The attestation key (AK) is a restricted ECDSA P-256 signing key created under the
endorsement key (``tpm2_createek``, ``tpm2_createak``) and made persistent at
:data:`DEFAULT_AK_HANDLE`, so that every later quote is signed by the key the verifier
enrolled. Its private part never leaves the TPM.

Trust model: the operator enrolls the AK public key a site or device printed (``insitu
attest key``), the way a site's Flower key is enrolled, and by default that AK is trusted
on first use. A hardware TPM carries an EK certificate from its manufacturer: a server
started with ``--ek-ca`` binds each site's AK to it (:meth:`Tpm.ek_certificate`,
:meth:`Tpm.ak_public_area` are sent, the nonce comes back as a credential that
:meth:`Tpm.activate` recovers; the verifier's side is :mod:`insitu.attestation._ek`).
A repository pinned with ``repo attest --require A --ek-ca CA.pem`` binds devices the
same way, out of band (a credential file). See docs/attestation.md.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from insitu.errors import TpmError

__all__ = [
    "DEFAULT_AK_HANDLE",
    "DEFAULT_PCR",
    "EK_CERTIFICATE_INDEX",
    "EK_HANDLE",
    "TCTI_ENV",
    "Quote",
    "Tpm",
]

logger = logging.getLogger(__name__)

#: The environment variable naming the TPM's TCTI.
TCTI_ENV = "INSITU_TPM_TCTI"
#: PCR 23, the PC Client profile's "application support" PCR (PCR 16 is for debug).
DEFAULT_PCR = 23
#: The persistent handle of insitu's attestation key (owner range 0x81000000-0x817FFFFF).
DEFAULT_AK_HANDLE = 0x81010023
#: The TCG's handle of the RSA 2048 EK, and the NV index of its certificate.
EK_HANDLE = 0x81010001
EK_CERTIFICATE_INDEX = 0x01C00002
_TOOL_TIMEOUT = 30.0


@dataclass(frozen=True)
class Quote:
    """A TPM quote as the prover sends it: the signed TPMS_ATTEST, its signature, PCRs.

    ``pcr_values`` are the SHA-256 values of the quoted PCRs, as the TPM read them; the
    verifier checks them against the digest inside the signed ``attest``.
    """

    attest: bytes
    signature: bytes
    pcr_values: dict[int, bytes]

    def to_json(self) -> dict[str, Any]:
        """A JSON form (base64 structures, hex PCR values)."""
        return {
            "attest": base64.b64encode(self.attest).decode("ascii"),
            "signature": base64.b64encode(self.signature).decode("ascii"),
            "pcrs": {str(k): v.hex() for k, v in sorted(self.pcr_values.items())},
        }

    @classmethod
    def from_json(cls, data: Any) -> Quote:
        """Read :meth:`to_json`'s form; a malformed one raises ``ValueError``."""
        if not isinstance(data, dict) or not isinstance(data.get("pcrs"), dict):
            raise ValueError("a quote is an object with attest, signature and pcrs")  # noqa: TRY004
        return cls(
            attest=base64.b64decode(str(data["attest"]), validate=True),
            signature=base64.b64decode(str(data["signature"]), validate=True),
            pcr_values={int(k): bytes.fromhex(str(v)) for k, v in data["pcrs"].items()},
        )


class Tpm:
    """A TPM reached through tpm2-tools: see the module docstring.

    Raises :class:`~insitu.errors.TpmError` (one line naming the tool and the TCTI)
    when tpm2-tools is missing or the TPM does not answer.
    """

    def __init__(self, tcti: str | None = None, *, ak_handle: int = DEFAULT_AK_HANDLE) -> None:
        tcti = tcti or os.environ.get(TCTI_ENV)
        if not tcti:
            raise TpmError(
                f"no TPM given: set {TCTI_ENV} (e.g. swtpm:port=2321 or device:/dev/tpmrm0)"
            )
        self.tcti = tcti
        self.ak_handle = ak_handle

    def _run(self, *args: str, cwd: Path | None = None) -> bytes:
        tool = shutil.which(args[0])
        if tool is None:
            raise TpmError(f"{args[0]} is not installed; install tpm2-tools")
        env = {**os.environ, "TPM2TOOLS_TCTI": self.tcti}
        try:
            done = subprocess.run(  # noqa: S603 -- a fixed tool, arguments built here
                [tool, *args[1:]],
                cwd=cwd,
                env=env,
                capture_output=True,
                timeout=_TOOL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TpmError(f"{args[0]}: no answer from the TPM at {self.tcti}") from exc
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            said = [line for line in lines if "Unable to run" not in line] or lines
            last = said[-1].strip() if said else f"exit {done.returncode}"
            raise TpmError(f"{args[0]} failed on the TPM at {self.tcti}: {last}")
        return done.stdout

    def _flush(self) -> None:
        self._run("tpm2_flushcontext", "-t")
        self._run("tpm2_flushcontext", "-s")

    def ak_public_pem(self) -> bytes:
        """The AK's public key (PEM), creating and persisting the AK on first use."""
        with tempfile.TemporaryDirectory(prefix="insitu-tpm-") as tmp:
            out = Path(tmp, "ak.pem")
            try:
                self._run("tpm2_readpublic", "-c", hex(self.ak_handle), "-f", "pem", "-o", str(out))
            except TpmError:
                self._create_ak(Path(tmp))
                self._run("tpm2_readpublic", "-c", hex(self.ak_handle), "-f", "pem", "-o", str(out))
            return out.read_bytes()

    def _create_ak(self, tmp: Path) -> None:
        logger.info("creating the attestation key at %s on %s", hex(self.ak_handle), self.tcti)
        self._run("tpm2_createek", "-c", "ek.ctx", "-G", "ecc", "-u", "ek.pub", cwd=tmp)
        self._flush()
        self._run(
            "tpm2_createak",
            *("-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256", "-s", "ecdsa"),
            *("-u", "ak.pub", "-f", "pem"),
            cwd=tmp,
        )
        self._flush()
        self._run("tpm2_evictcontrol", "-C", "o", "-c", "ak.ctx", hex(self.ak_handle), cwd=tmp)
        self._flush()

    def ek_certificate(self) -> bytes:
        """The RSA EK's certificate (DER) from its NV index, as the manufacturer wrote it."""
        with tempfile.TemporaryDirectory(prefix="insitu-tpm-") as tmp:
            out = Path(tmp, "ek.der")
            self._run("tpm2_nvread", hex(EK_CERTIFICATE_INDEX), "-o", str(out))
            return out.read_bytes()

    def ak_public_area(self) -> bytes:
        """The AK's public area (TPM2B_PUBLIC), what its TPM name is computed over."""
        self.ak_public_pem()  # made on first use
        with tempfile.TemporaryDirectory(prefix="insitu-tpm-") as tmp:
            out = Path(tmp, "ak.pub")
            self._run("tpm2_readpublic", "-c", hex(self.ak_handle), "-o", str(out))
            return out.read_bytes()

    def activate(self, credential: bytes) -> bytes:
        """Recover a credential's secret with the EK (``tpm2_activatecredential``).

        Only a TPM holding the EK's private key and the AK the credential names can: the
        EK's use needs a policy session satisfying the endorsement hierarchy's auth.
        """
        with tempfile.TemporaryDirectory(prefix="insitu-tpm-") as tmp:
            Path(tmp, "cred.blob").write_bytes(credential)
            self._run("tpm2_readpublic", "-c", hex(EK_HANDLE), cwd=Path(tmp))  # present?
            self._run("tpm2_startauthsession", "--policy-session", "-S", "s.ctx", cwd=Path(tmp))
            try:
                self._run("tpm2_policysecret", "-S", "s.ctx", "-c", "e", cwd=Path(tmp))
                self._run(
                    "tpm2_activatecredential",
                    *("-c", hex(self.ak_handle), "-C", hex(EK_HANDLE), "-i", "cred.blob"),
                    *("-o", "secret", "-P", "session:s.ctx"),
                    cwd=Path(tmp),
                )
            finally:
                self._run("tpm2_flushcontext", "s.ctx", cwd=Path(tmp))
                self._flush()
            return Path(tmp, "secret").read_bytes()

    def measure(self, digest: str, *, pcr: int = DEFAULT_PCR) -> None:
        """Reset ``pcr`` and extend ``digest`` (SHA-256 hex) into it, once.

        The reset makes the PCR's value a function of this one measurement (every start
        of the process measures again); PCRs 16 and 23 are resettable from locality 0.
        """
        bytes.fromhex(digest)  # a ValueError before the TPM is touched
        self._run("tpm2_pcrreset", str(pcr))
        self._run("tpm2_pcrextend", f"{pcr}:sha256={digest}")

    def quote(self, nonce: bytes, pcrs: Sequence[int] = (DEFAULT_PCR,)) -> Quote:
        """Quote ``pcrs`` (SHA-256 bank) over ``nonce`` with the persistent AK."""
        chosen = sorted(set(pcrs))
        self.ak_public_pem()  # made on first use
        with tempfile.TemporaryDirectory(prefix="insitu-tpm-") as tmp:
            self._run(
                "tpm2_quote",
                *("-c", hex(self.ak_handle), "-l", "sha256:" + ",".join(map(str, chosen))),
                *("-q", nonce.hex(), "-g", "sha256"),
                *("-m", "quote.msg", "-s", "quote.sig", "-o", "quote.pcrs", "-F", "values"),
                cwd=Path(tmp),
            )
            self._flush()
            values = Path(tmp, "quote.pcrs").read_bytes()
            attest = Path(tmp, "quote.msg").read_bytes()
            signature = Path(tmp, "quote.sig").read_bytes()
        if len(values) != 32 * len(chosen):
            raise TpmError(f"tpm2_quote returned {len(values)} bytes of PCR values, not 32 per PCR")
        return Quote(
            attest=attest,
            signature=signature,
            pcr_values={pcr: values[32 * i : 32 * (i + 1)] for i, pcr in enumerate(chosen)},
        )
