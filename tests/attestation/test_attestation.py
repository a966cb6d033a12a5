"""A site's measured build, quoted by its TPM (swtpm here) and checked by a verifier."""

from __future__ import annotations

import hashlib
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from insitu.attestation import (
    DEFAULT_PCR,
    AllowList,
    MeasuredState,
    Quote,
    Tpm,
    Verifier,
    ak_fingerprint,
    build_digest,
    expected_pcr,
    package_dir,
)
from insitu.cli import run
from insitu.errors import (
    AllowListError,
    MeasurementMismatchError,
    NonceLimitError,
    QuoteSignatureError,
    StaleQuoteError,
    TpmError,
    UnknownAttestationKeyError,
)
from insitu.workspace import Workspace

from .conftest import modified_build


def _allow_running_build() -> AllowList:
    return AllowList((MeasuredState("this build", {DEFAULT_PCR: expected_pcr(build_digest())}),))


def _checks(ws: Workspace) -> list[dict[str, object]]:
    with ws.ledger() as ledger:
        return [e.payload for e in ledger.entries(event_type="attestation.checked")]


def test_the_build_digest_is_deterministic_and_sees_one_byte(tmp_path: Path) -> None:
    copy = tmp_path / "copy" / "insitu"
    shutil.copytree(package_dir(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"run-time cache")
    assert build_digest(copy) == build_digest()  # where it lives and caches do not count
    assert build_digest(modified_build(tmp_path) / "insitu") != build_digest()
    assert expected_pcr("ab" * 32) == hashlib.sha256(bytes(32) + bytes([0xAB] * 32)).hexdigest()


def test_a_good_build_is_admitted_and_recorded(tcti: str, coordinator: Workspace) -> None:
    tpm = Tpm(tcti)
    ak = tpm.ak_public_pem()
    assert tpm.ak_public_pem() == ak  # persistent: the key the verifier enrolled
    verifier = Verifier(coordinator, _allow_running_build(), {"hospital-a": ak})
    tpm.measure(build_digest())
    challenge = verifier.challenge("hospital-a")
    assert challenge.pcrs == [23]
    quote = tpm.quote(challenge.nonce, challenge.pcrs)
    assert quote.pcr_values == {23: bytes.fromhex(expected_pcr(build_digest()))}  # the TPM agrees
    decision = verifier.check("hospital-a", quote)
    decision.raise_if_refused()
    assert decision.admitted
    (entry,) = _checks(coordinator)
    assert entry == {
        "subject": "hospital-a",
        "kind": "site",
        "decision": "admitted",
        "pcrs": [23],
        "reason": "measured state 'this build'",
        "ak_fingerprint": ak_fingerprint(ak),
    }


def test_a_refused_measurement_names_the_pcr(tcti: str, coordinator: Workspace) -> None:
    tpm = Tpm(tcti)
    verifier = Verifier(coordinator, _allow_running_build(), {"a": tpm.ak_public_pem()})
    tpm.measure("ab" * 32)  # another build's digest extended at start
    challenge = verifier.challenge("a")
    decision = verifier.check("a", tpm.quote(challenge.nonce, challenge.pcrs))
    with pytest.raises(MeasurementMismatchError, match=r"^site a refused: PCR 23 is [0-9a-f]{16}"):
        decision.raise_if_refused()
    assert decision.pcr == 23
    (entry,) = _checks(coordinator)
    assert entry["decision"] == "refused"
    assert entry["pcr"] == 23
    assert entry["measurement"] == expected_pcr("ab" * 32)


def test_attack_replayed_quote_is_refused(tcti: str, coordinator: Workspace) -> None:
    tpm = Tpm(tcti)
    verifier = Verifier(coordinator, _allow_running_build(), {"a": tpm.ak_public_pem()})
    tpm.measure(build_digest())
    challenge = verifier.challenge("a")
    recorded = tpm.quote(challenge.nonce, challenge.pcrs)  # an eavesdropper keeps it
    assert verifier.check("a", recorded).admitted
    # Later, the build changed: the old good quote is sent again, twice.
    tpm.measure("cd" * 32)
    assert not verifier.check("a", recorded).admitted  # no nonce outstanding
    verifier.challenge("a")
    replay = verifier.check("a", recorded)
    with pytest.raises(StaleQuoteError, match="not over this verifier's fresh nonce"):
        replay.raise_if_refused()
    # An expired nonce is refused too.
    late = Verifier(coordinator, _allow_running_build(), {"a": tpm.ak_public_pem()}, nonce_ttl=0)
    tpm.measure(build_digest())
    stale = late.challenge("a")
    assert not late.check("a", tpm.quote(stale.nonce, stale.pcrs)).admitted
    assert [e["decision"] for e in _checks(coordinator)] == [
        "admitted",
        "refused",
        "refused",
        "refused",
    ]


def test_attack_quote_from_another_tpm_is_refused(
    start_swtpm: Callable[[str], str], coordinator: Workspace
) -> None:
    enrolled, other = Tpm(start_swtpm("enrolled")), Tpm(start_swtpm("other"))
    verifier = Verifier(coordinator, _allow_running_build(), {"a": enrolled.ak_public_pem()})
    other.measure(build_digest())  # a good build, on a machine that is not site a
    challenge = verifier.challenge("a")
    decision = verifier.check("a", other.quote(challenge.nonce, challenge.pcrs))
    with pytest.raises(QuoteSignatureError, match="does not verify against its enrolled"):
        decision.raise_if_refused()
    # Nor is a good quote whose bytes were altered (the nonce it carries, say).
    enrolled.measure(build_digest())
    challenge = verifier.challenge("a")
    quote = enrolled.quote(challenge.nonce, challenge.pcrs)
    altered = Quote(
        quote.attest[:-1] + bytes([quote.attest[-1] ^ 1]), quote.signature, quote.pcr_values
    )
    assert not verifier.check("a", altered).admitted
    # And a subject with no enrolled AK is refused whatever it sends.
    with pytest.raises(UnknownAttestationKeyError, match="no attestation key is enrolled"):
        verifier.check("b", quote).raise_if_refused()
    assert {e["decision"] for e in _checks(coordinator)} == {"refused"}


def test_the_cli_refusal_is_one_line_exit_1(
    tcti: str, coordinator: Workspace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    allow = tmp_path / "allow.toml"
    ak = tmp_path / "site.ak.pem"
    assert run(["attest", "allow", "--out", str(allow), "--name", "release"]) == 0
    assert run(["attest", "key", "--tcti", tcti, "--out", str(ak)]) == 0
    home = ["--home", str(coordinator.home)]
    args = ["attest", "check", "--allow-list", str(allow), "--ak", str(ak), "--subject", "s"]
    assert run([*args, "--tcti", tcti, *home]) == 0
    capsys.readouterr()
    modified = modified_build(tmp_path) / "insitu"
    code = run([*args, "--tcti", tcti, *home, "--root", str(modified)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1, err
    assert "site s refused: PCR 23 is" in err
    assert [e["decision"] for e in _checks(coordinator)] == ["admitted", "refused"]


def test_a_bad_allow_list_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "allow.toml"
    path.write_text("[[state]]\nname = 'x'\npcrs = { 23 = 'not hex' }\n")
    with pytest.raises(AllowListError, match="not a PCR number and a SHA-256 value"):
        AllowList.load(path)
    path.write_text("nothing = 1\n")
    with pytest.raises(AllowListError, match=r"has no \[\[state\]\]"):
        AllowList.load(path)
    good = _allow_running_build()
    path.write_text(good.to_toml())
    assert AllowList.load(path).states == good.states


def test_no_tpm_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("INSITU_TPM_TCTI", raising=False)
    with pytest.raises(TpmError, match="no TPM given: set INSITU_TPM_TCTI"):
        Tpm()
    if shutil.which("tpm2_readpublic") is None:
        pytest.skip("tpm2-tools is not installed")
    with pytest.raises(TpmError, match="failed on the TPM at swtpm"):
        Tpm(f"swtpm:host=127.0.0.1,port={_closed_port()}").ak_public_pem()


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_second_challenge_does_not_evict_the_first(tcti: str, coordinator: Workspace) -> None:
    tpm = Tpm(tcti)
    verifier = Verifier(coordinator, _allow_running_build(), {"a": tpm.ak_public_pem()})
    tpm.measure(build_digest())
    first = verifier.challenge("a")
    verifier.challenge("a")  # a retry, or anyone else's request for a's nonce
    assert verifier.check("a", tpm.quote(first.nonce, first.pcrs)).admitted
    assert verifier.outstanding == 1  # the used one is gone, the other stays until it expires


def test_outstanding_nonces_are_bounded_and_expire(
    coordinator: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("insitu.attestation._verify._now", lambda: clock[0])
    verifier = Verifier(
        coordinator, _allow_running_build(), {}, nonce_ttl=60, max_per_subject=2, max_nonces=3
    )
    verifier.challenge("a")
    verifier.challenge("a")
    with pytest.raises(NonceLimitError, match="site a has 2 nonces outstanding"):
        verifier.challenge("a")  # refused: the two outstanding are kept, not evicted
    verifier.challenge("b")
    with pytest.raises(NonceLimitError, match="this verifier has 3 nonces outstanding"):
        verifier.challenge("c")
    assert verifier.outstanding == 3
    clock[0] += 61  # all expired: dropped at the next challenge
    verifier.challenge("c")
    assert verifier.outstanding == 1
