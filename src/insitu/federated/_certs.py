"""The certificates and keys of a federation: TLS for the SuperLink, auth keys for sites.

``insitu federate certs`` writes, into one directory::

    ca.pem                 the federation's CA (EC P-384, self-signed); every site gets it
    ca.key                 its private key (0600; keep it offline once certificates are made)
    server.pem             the SuperLink's certificate, signed by the CA; SAN 127.0.0.1,
                           localhost and any --host given
    server.key             its private key (0600)
    sites/<name>.key       a site's SuperNode authentication key (EC P-384, OpenSSH, 0600)
    sites/<name>.pub       its public key in OpenSSH format, as Flower registers it

Invariants:

* Every file is written atomically; private keys are created 0600 from the start.
* Nothing is written unless the whole set can be: names and hosts are checked first, and
  an existing file is never overwritten (a CA that changes under running sites would lock
  them out), unless ``force``.
* An operator may bring their own CA and server certificate: :func:`check_server_pair`
  is what the server checks either way (key matches certificate, certificate signed by
  the CA, SAN covers the address sites dial).

Flower (1.41) authenticates SuperNodes with NIST-curve EC keys whose public half the
SuperLink holds in its registry (``--enable-supernode-auth``); TLS is server-side only
(sites verify the SuperLink against ``ca.pem``; they authenticate with their key).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from insitu._atomic import atomic_write_bytes, refuse_symlink
from insitu.errors import CertificateError, UsageError

__all__ = [
    "FederationCerts",
    "LoopbackIdentity",
    "check_server_pair",
    "load_site_public_key",
    "make_certs",
    "make_loopback_identity",
    "site_name_ok",
]

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_CURVE = ec.SECP384R1()
_PRIVATE = 0o600


def site_name_ok(name: str) -> bool:
    """A site name usable as a file name and in logs."""
    return bool(_SITE_NAME.match(name))


@dataclass(frozen=True)
class FederationCerts:
    """Where the files of a federation's certificate directory are."""

    directory: Path

    @property
    def ca(self) -> Path:
        """The CA certificate (PEM)."""
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """The CA's private key (PEM)."""
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        """The SuperLink's certificate (PEM)."""
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        """The SuperLink's private key (PEM)."""
        return self.directory / "server.key"

    def site_key(self, site: str) -> Path:
        """A site's private authentication key (OpenSSH)."""
        return self.directory / "sites" / f"{site}.key"

    def site_public(self, site: str) -> Path:
        """A site's public authentication key (OpenSSH)."""
        return self.directory / "sites" / f"{site}.pub"

    def site_publics(self) -> dict[str, Path]:
        """Every site public key in the directory, by site name."""
        folder = self.directory / "sites"
        if not folder.is_dir():
            return {}
        return {p.stem: p for p in sorted(folder.glob("*.pub"))}


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "insitu federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey,
    name: x509.Name,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """A self-signed CA that signs certificates only (no intermediate below it)."""
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    name: x509.Name,
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    hosts: list[str],
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """A TLS server certificate for ``hosts``, signed by the CA."""
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )


def make_certs(
    directory: Path,
    *,
    sites: list[str],
    hosts: tuple[str, ...] = (),
    days: int = 365,
    force: bool = False,
) -> FederationCerts:
    """Create a CA, a server certificate and one authentication key per site.

    Raises:
        UsageError: a bad site name or host, or files that exist already (without
            ``force``).

    """
    if not sites:
        raise UsageError("give at least one site name (--site NAME, repeatable)")
    for site in sites:
        if not site_name_ok(site):
            raise UsageError(
                f"site name {site!r}: use letters, digits, '-', '_' or '.' (at most 64)"
            )
    if len(set(sites)) != len(sites):
        raise UsageError("site names must be different")
    all_hosts = [
        "127.0.0.1",
        "localhost",
        *[h for h in hosts if h not in ("127.0.0.1", "localhost")],
    ]
    for host in all_hosts:
        if not re.match(r"^[A-Za-z0-9.:\-]+$", host):
            raise UsageError(f"--host {host!r}: give an IP address or a DNS name")
    if not 1 <= days <= 3650:
        raise UsageError(f"--days {days}: use 1 to 3650")
    certs = FederationCerts(directory)
    planned = [certs.ca, certs.ca_key, certs.server_cert, certs.server_key]
    planned += [p for s in sites for p in (certs.site_key(s), certs.site_public(s))]
    for path in planned:
        refuse_symlink(path)  # all at once: never half a set written before a refusal
    existing = [p for p in planned if p.exists()]
    if existing and not force:
        raise UsageError(
            f"{existing[0]} exists already; give another --out, or --force to replace "
            "the federation's certificates (registered sites must then get the new ca.pem)"
        )

    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key, server_key = ec.generate_private_key(_CURVE), ec.generate_private_key(_CURVE)
    ca_name = _name("insitu federation CA")
    ca_cert = _ca_certificate(ca_key, ca_name, not_before, not_after)
    server_cert = _server_certificate(
        server_key,
        _name("insitu superlink"),
        ca_key=ca_key,
        ca_name=ca_name,
        hosts=all_hosts,
        not_before=not_before,
        not_after=not_after,
    )
    site_keys = {s: ec.generate_private_key(_CURVE) for s in sites}

    (directory / "sites").mkdir(parents=True, exist_ok=True)
    # Keys first, certificates last: a crash in between leaves no usable-looking set.
    atomic_write_bytes(certs.ca_key, _pem_key(ca_key), mode=_PRIVATE)
    atomic_write_bytes(certs.server_key, _pem_key(server_key), mode=_PRIVATE)
    for site, key in site_keys.items():
        openssh = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        atomic_write_bytes(certs.site_key(site), openssh, mode=_PRIVATE)
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        atomic_write_bytes(certs.site_public(site), public + f" {site}\n".encode())
    atomic_write_bytes(certs.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    atomic_write_bytes(certs.ca, ca_cert.public_bytes(serialization.Encoding.PEM))
    return certs


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateError(
            f"cannot read the {what} {path}: {exc.strerror}; run 'insitu federate certs' "
            "or give the right path"
        ) from exc


def check_server_pair(ca: Path, cert: Path, key: Path, *, host: str | None) -> None:
    """Check a SuperLink certificate before serving it.

    Raises:
        CertificateError: unreadable files, a key that is not the certificate's, a
            certificate the CA did not sign, one that has expired, or whose SAN does
            not cover ``host`` (not checked when ``host`` is None: a server bound to all
            interfaces is dialled by names only the operator knows).

    """
    try:
        ca_cert = x509.load_pem_x509_certificate(_read(ca, "CA certificate"))
        server_cert = x509.load_pem_x509_certificate(_read(cert, "server certificate"))
        server_key = serialization.load_pem_private_key(_read(key, "server key"), None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(
            f"cannot parse the certificates in {cert.parent}: {exc}; give PEM files"
        ) from exc
    if server_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != server_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CertificateError(
            f"the server key {key} does not match the certificate {cert}; give the key "
            "the certificate was issued for"
        )
    try:
        server_cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateError(
            f"the server certificate {cert} is not signed by the CA {ca}; sites that "
            "trust that CA would refuse the server (give the matching ca.pem)"
        ) from exc
    now = dt.datetime.now(dt.UTC)
    if not server_cert.not_valid_before_utc <= now <= server_cert.not_valid_after_utc:
        raise CertificateError(
            f"the server certificate {cert} is valid from {server_cert.not_valid_before_utc} "
            f"to {server_cert.not_valid_after_utc}, not now; issue a new one"
        )
    if host is None:
        return
    try:
        san = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    try:
        covered = ipaddress.ip_address(host) in san.get_values_for_type(x509.IPAddress)
    except ValueError:
        covered = host in san.get_values_for_type(x509.DNSName)
    if not covered:
        raise CertificateError(
            f"the server certificate {cert} does not name {host} (subject alternative "
            "names); issue one with 'insitu federate certs --host " + host + "'"
        )


def load_site_public_key(path: Path) -> bytes:
    """A site's public key as Flower registers it (OpenSSH text, NIST EC curve).

    Raises:
        CertificateError: unreadable, or not a NIST-curve EC public key.

    """
    data = _read(path, "site public key")
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError) as exc:
        raise CertificateError(
            f"{path} is not an OpenSSH public key; give the .pub file written by "
            "'insitu federate certs'"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertificateError(f"{path} is not an EC public key; Flower needs a NIST EC key")
    return data


@dataclass(frozen=True)
class LoopbackIdentity:
    """The TLS identity of the SuperLink behind the gateway: valid for 127.0.0.1 only."""

    ca: Path
    cert: Path
    key: Path


def make_loopback_identity(directory: Path, *, days: int = 30) -> LoopbackIdentity:
    """A throw-away CA and a certificate for ``127.0.0.1``, for one SuperLink's lifetime.

    The SuperLink listens on loopback behind insitu's Fleet gateway; Flower's own
    processes on the server (SuperExec, ServerApp) and the gateway dial it there. Its
    identity is made anew at each start and never leaves ``directory`` (0700; key 0600):
    the federation's CA, which sites trust, signs nothing for it.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key, key = ec.generate_private_key(_CURVE), ec.generate_private_key(_CURVE)
    ca_name = _name("insitu loopback CA")
    ca_cert = _ca_certificate(ca_key, ca_name, not_before, not_after)
    cert = _server_certificate(
        key,
        _name("insitu superlink (loopback)"),
        ca_key=ca_key,
        ca_name=ca_name,
        hosts=["127.0.0.1"],
        not_before=not_before,
        not_after=not_after,
    )
    identity = LoopbackIdentity(
        ca=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key"
    )
    # The CA's key is not kept: nothing more is ever signed with it.
    atomic_write_bytes(identity.key, _pem_key(key), mode=_PRIVATE)
    atomic_write_bytes(identity.cert, cert.public_bytes(serialization.Encoding.PEM))
    atomic_write_bytes(identity.ca, ca_cert.public_bytes(serialization.Encoding.PEM))
    return identity
