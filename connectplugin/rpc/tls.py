"""TLS settings: who we are (a certificate and its key) and whom we accept (CAs, pinned certificates).

Loaded from PEM files or bytes, or made here (a development CA, certificates it signs, the
short-lived self-signed pairs of automatic mTLS), and turned into the contexts the TLS server
(pyOpenSSL under cheroot) and the clients (the ``ssl`` module under urllib3 and http.client)
use. Keys stay in memory: pyOpenSSL takes key objects, and the ``ssl`` module, which only
reads keys from files, reads them from an anonymous in-memory file (Linux ``memfd``) or,
elsewhere, from a temporary file holding the key encrypted under a one-time password.

``cryptography`` and pyOpenSSL are imported by the functions that use them, never by
importing this module: a plaintext plugin or host loads neither (they cost ~30 ms).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime
import hashlib
import ipaddress
import os
import re
import secrets
import ssl
import sys
import tempfile
import threading
from collections.abc import Collection, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

DEV_LIFETIME = datetime.timedelta(days=30)
"""How long the certificates of ``make_dev_pki`` are valid."""
CLOCK_SKEW = datetime.timedelta(minutes=5)
"""Certificates made here are valid from this long before they were made."""
AUTO_LIFETIME = datetime.timedelta(days=3650)
"""How long the self-signed certificates of automatic mTLS are valid: longer than any launch,
as go-plugin's (30 years). They are pins, not claims a third party checks: each side accepts
exactly the other's certificate, made for this launch, and nothing else. What limits a key's
use is the launch: it lives only in the two processes' memory, dies with them, and the next
launch (a restart included) makes new pairs. An expiry within a launch would protect nothing
(whoever could read one key from memory could read its successor) and would break every call
of a plugin that runs longer, or whose machine's clock jumps ahead."""
URI_SCHEME = "connectplugin"
"""A plugin certificate's SAN URI names its self id: ``connectplugin://plugin/<self id>``."""


def fingerprint(certificate: x509.Certificate) -> str:
    """The SHA-256 fingerprint of a certificate's DER bytes, as lower-case hex."""
    from cryptography.hazmat.primitives import hashes

    return certificate.fingerprint(hashes.SHA256()).hex()


def revocation_prints(certificate: x509.Certificate) -> frozenset[str]:
    """The fingerprints a revocation of ``certificate`` may be listed under: its own and,
    when an ECDSA key signed it, its twins'. An ECDSA signature (r, s) is as valid as
    (r, n - s), n the order of the signer's curve, so whoever holds a certificate can make
    another, equally valid, that differs only there, and so in fingerprint: a revocation
    of one is a revocation of both. The signer's curve is not known from the certificate
    alone: one twin per curve of :data:`_ECDSA_ORDERS` whose order exceeds r and s."""
    from cryptography.hazmat.primitives.asymmetric.utils import (
        decode_dss_signature,
        encode_dss_signature,
    )
    from cryptography.hazmat.primitives.serialization import Encoding

    der = certificate.public_bytes(Encoding.DER)
    prints = {hashlib.sha256(der).hexdigest()}
    if not certificate.signature_algorithm_oid.dotted_string.startswith(_ECDSA_SIGNATURES):
        return frozenset(prints)
    try:
        r, s = decode_dss_signature(certificate.signature)
        start = _der_element(der, 0)[0]
        signed_and_algorithm = der[start:_der_element(der, _der_element(der, start)[1])[1]]
    except (ValueError, IndexError):  # not an ECDSA signature after all: no twin
        return frozenset(prints)
    for order in _ECDSA_ORDERS:
        if 0 < r < order and 0 < s < order:
            signature = b"\0" + encode_dss_signature(r, order - s)
            body = signed_and_algorithm + b"\x03" + _der_length(len(signature)) + signature
            prints.add(hashlib.sha256(b"\x30" + _der_length(len(body)) + body).hexdigest())
    return frozenset(prints)


def is_revoked(certificate: x509.Certificate, revoked: Container[str]) -> bool:
    """Whether ``revoked`` (fingerprints) lists ``certificate``, or a twin of it (see
    :func:`revocation_prints`)."""
    return any(print_ in revoked for print_ in revocation_prints(certificate))


_ECDSA_SIGNATURES = "1.2.840.10045.4."
"""The OID arc of the ECDSA signature algorithms (ecdsa-with-SHA1, -SHA224 ... -SHA512)."""
_ECDSA_ORDERS = (
    0xFFFFFFFFFFFFFFFFFFFFFFFFFFFF16A2E0B8F03E13DD29455C5C2A3D,
    0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973,
    0x01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409,
    0xA9FB57DBA1EEA9BC3E660A909D838D718C397AA3B561A6F7901E0E82974856A7,
    0x8CB91E82A3386D280F5D6F7E50E641DF152F7109ED5456B31F166E6CAC0425A7CF3AB6AF6B7FC3103B883202E9046565,
    0xAADD9DB8DBE9C48B3FD4E6AE33C9FC07CB308DB3B3C9D20ED6639CCA70330870553E5C414CA92619418661197FAC10471DB1D381085DDADDB58796829CA90069,
)
"""The orders of the curves certificate authorities sign with: NIST P-224, P-256, P-384,
P-521 and Brainpool P256r1, P384r1, P512r1 (``openssl ecparam -name C -param_enc explicit``)."""


def _der_element(der: bytes, at: int) -> tuple[int, int]:
    """Where the content of the DER element at ``at`` starts and where the element ends."""
    length, start = der[at + 1], at + 2
    if length & 0x80:
        start += length & 0x7F
        length = int.from_bytes(der[at + 2:start], "big")
    return start, start + length


def _der_length(size: int) -> bytes:
    """A DER length: one octet below 128, else the fewest octets after one saying how many."""
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([size]) if size < 0x80 else bytes([0x80 | len(octets)]) + octets


def load_certificates(pem: bytes | str) -> tuple[x509.Certificate, ...]:
    """Every certificate in a PEM text; ValueError when there is none."""
    from cryptography import x509

    data = pem.encode() if isinstance(pem, str) else pem
    certificates = tuple(x509.load_pem_x509_certificates(data))
    if not certificates:
        raise ValueError("no PEM certificate found")
    return certificates


def certificates_pem(certificates: Iterable[x509.Certificate]) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


@dataclass(frozen=True)
class KeyPair:
    """A certificate (with the intermediates that lead to its CA) and its private key."""

    certificate: x509.Certificate
    private_key: CertificateIssuerPrivateKeyTypes = field(repr=False)
    chain: tuple[x509.Certificate, ...] = ()
    """Intermediate certificates sent after ``certificate``; not the root."""

    @classmethod
    def from_pem(cls, certificate: bytes | str, private_key: bytes | str, password: bytes | None = None) -> KeyPair:
        """From PEM text: the certificate first, then any intermediates; the key, maybe encrypted."""
        from cryptography.hazmat.primitives import serialization

        leaf, *chain = load_certificates(certificate)
        key_data = private_key.encode() if isinstance(private_key, str) else private_key
        key = serialization.load_pem_private_key(key_data, password)
        return cls(leaf, key, tuple(chain))  # type: ignore[arg-type]  # any signing key type

    @classmethod
    def from_files(cls, certificate: str | os.PathLike, private_key: str | os.PathLike,
                   password: bytes | None = None) -> KeyPair:
        return cls.from_pem(Path(certificate).read_bytes(), Path(private_key).read_bytes(), password)

    def certificate_pem(self) -> bytes:
        """The certificate, then the chain, as PEM."""
        return certificates_pem((self.certificate, *self.chain))

    def private_key_pem(self, password: bytes | None = None) -> bytes:
        from cryptography.hazmat.primitives import serialization

        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        )
        return self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)


class _Fingerprints:
    """A set of certificate fingerprints changed while serving and read from any thread:
    ``in``, iteration (sorted, a copy) and ``len`` under ``_lock``, over ``_prints``."""

    _lock: threading.Lock
    _prints: Collection[str]

    def __contains__(self, print_: object) -> bool:
        with self._lock:
            return print_ in self._prints

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(sorted(self._prints))

    def __len__(self) -> int:
        with self._lock:
            return len(self._prints)


class RevocationList(_Fingerprints):
    """Fingerprints of certificates refused from now on, changed while serving (a CRL kept
    in memory). A server whose ``Trust.revoked`` is one refuses a certificate at the next
    handshake that presents it; a host also refuses it on the calls of connections already
    open. A certificate revoked as itself (not only by its fingerprint) is refused with the
    TLS alert ``certificate_revoked``, so its holder is told why. Safe from any thread;
    ``_lock`` guards ``_prints`` and ``_version``."""

    def __init__(self, revoked: Iterable[str | x509.Certificate] = ()) -> None:
        self._lock = threading.Lock()
        self._prints: dict[str, x509.Certificate | None] = {}
        self._version = 0
        self.add(*revoked)

    def add(self, *revoked: str | x509.Certificate) -> None:
        """Revoke certificates, given as certificates or SHA-256 fingerprints."""
        entries = [(_print_of(r), None if isinstance(r, str) else r) for r in revoked]
        with self._lock:
            for print_, certificate in entries:
                if certificate is not None or print_ not in self._prints:
                    self._prints[print_] = certificate
            self._version += 1

    def discard(self, *revoked: str | x509.Certificate) -> None:
        """Accept these certificates again (a revocation made by mistake); identities already
        revoked for them stay revoked (their plugins join again)."""
        prints = {_print_of(r) for r in revoked}
        with self._lock:
            for print_ in prints:
                self._prints.pop(print_, None)
            self._version += 1

    @property
    def version(self) -> int:
        """A number that changes with every change (read without the lock: an int)."""
        return self._version

    def certificates(self) -> tuple[int, tuple[x509.Certificate, ...]]:
        """A version number that changes with every change, and the certificates revoked as
        themselves (not those known only by their fingerprint)."""
        with self._lock:
            return self._version, tuple(c for c in self._prints.values() if c is not None)



class PinList(_Fingerprints):
    """Fingerprints of client certificates accepted for as long as they are listed, whoever
    issued them (self-signed ones too): added and removed while serving. A host puts here
    the automatic-mTLS certificate of each plugin it launched, while that plugin runs, so
    that the plugin can call it back although the host requires certificates from a CA.
    A server whose ``Trust.live_pins`` is one accepts a listed certificate at the next
    handshake and refuses it once removed (a host also refuses the calls made with the
    plugin's identity on connections already open, the identity being revoked with it).
    Safe from any thread; ``_lock`` guards ``_prints``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._prints: set[str] = set()

    def add(self, *certificates: str | x509.Certificate) -> None:
        """Accept these (certificates or SHA-256 fingerprints) from the next handshake on."""
        prints = {_print_of(c) for c in certificates}
        with self._lock:
            self._prints |= prints

    def discard(self, *certificates: str | x509.Certificate) -> None:
        """Accept these no more (absent ones are ignored)."""
        prints = {_print_of(c) for c in certificates}
        with self._lock:
            self._prints -= prints


def _print_of(certificate: str | x509.Certificate) -> str:
    return parse_fingerprint(certificate) if isinstance(certificate, str) else fingerprint(certificate)


def parse_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as :func:`fingerprint` writes it (64 lower-case hex digits), from
    that or from what ``openssl x509 -fingerprint -sha256`` prints (colons, upper case, with
    or without its ``sha256 Fingerprint=``). ValueError for anything else: a revocation or
    a pin that silently matches nothing would be worse than an error."""
    print_ = text.rpartition("=")[2].replace(":", "").strip().lower()
    if not _FINGERPRINT.fullmatch(print_):
        raise ValueError(f"not a SHA-256 fingerprint (64 hex digits, colons allowed): {text[:80]!r}")
    return print_


_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Trust:
    """Whom one side accepts: a peer whose chain leads to one of ``cas`` or ``pinned``, and,
    when only ``pinned`` is given, whose certificate is one of them. ``revoked`` lists the
    SHA-256 fingerprints (see :func:`fingerprint`) of certificates refused all the same: a
    fixed set, or a :class:`RevocationList` that grows while serving. A server also accepts
    a client certificate listed in ``live_pins`` while it is listed, whatever its chain."""

    cas: tuple[x509.Certificate, ...] = ()
    pinned: tuple[x509.Certificate, ...] = ()
    revoked: frozenset[str] | RevocationList = frozenset()
    live_pins: PinList | None = None
    """Server: client certificates accepted as they are while listed (a host's launched
    plugins'); still refused when revoked or outside their validity."""

    def __post_init__(self) -> None:
        if not self.cas and not self.pinned:
            raise ValueError("a Trust needs at least one CA or pinned certificate")
        if not isinstance(self.revoked, RevocationList):  # as fingerprint() writes them, or ValueError
            object.__setattr__(self, "revoked", frozenset(parse_fingerprint(p) for p in self.revoked))

    @classmethod
    def from_pem(cls, cas: bytes | str = b"", pinned: bytes | str = b"") -> Trust:
        return cls(load_certificates(cas) if cas else (), load_certificates(pinned) if pinned else ())

    @classmethod
    def from_files(cls, cas: str | os.PathLike | None = None, pinned: str | os.PathLike | None = None) -> Trust:
        return cls.from_pem(Path(cas).read_bytes() if cas else b"", Path(pinned).read_bytes() if pinned else b"")

    @property
    def pins_only(self) -> bool:
        return not self.cas

    def anchors(self) -> tuple[x509.Certificate, ...]:
        return self.cas + self.pinned

    def accepts_leaf(self, certificate: x509.Certificate) -> bool:
        """The checks beyond the chain: pinned (when pins only) or a live pin, and not revoked."""
        if is_revoked(certificate, self.revoked):
            return False
        pinned = {fingerprint(c) for c in self.pinned}
        return not self.pins_only or fingerprint(certificate) in pinned or self.live_pinned(certificate)

    def live_pinned(self, certificate: x509.Certificate) -> bool:
        """Whether ``certificate`` is in ``live_pins`` now, and not revoked."""
        return (
            self.live_pins is not None and fingerprint(certificate) in self.live_pins
            and not is_revoked(certificate, self.revoked)
        )


@dataclass(frozen=True)
class TLSConfig:
    """One side's TLS. A server needs ``key_pair``; with ``trust`` it requires a client
    certificate that trust accepts. A client presents ``key_pair`` when the server asks and
    verifies the server against ``trust`` (None: the system's CAs)."""

    key_pair: KeyPair | None = None
    trust: Trust | None = None
    server_name: str | None = None
    """Client: the name the server's certificate must carry, when not the URL's host. Not
    checked against pinned certificates, which are the identity themselves."""
    plugin_id: str | None = None
    """Client: the plugin self id the server's certificate must name, and no other (see
    :func:`certificate_ids`): another plugin's certificate from the same CA, valid for the
    same address, is refused. The host's router sets it for plugins joined by certificate."""
    minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    stop_poll_interval: float = 0.1
    """Server: how often cheroot's connection loop wakes to notice ``close()`` (it has no
    wake-up pipe), so the longest a close waits on it."""


# --- making certificates ----------------------------------------------------------------------


def generate_key_pair(
    common_name: str,
    *,
    issuer: KeyPair | None = None,
    is_ca: bool = False,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    uris: Sequence[str] = (),
    lifetime: datetime.timedelta = DEV_LIFETIME,
    not_before: datetime.datetime | None = None,
) -> KeyPair:
    """A fresh P-256 key and a certificate for it, signed by ``issuer`` (self-signed without).

    A self-signed certificate is a CA (it anchors its own chain, as a pinned certificate
    must). ``not_before`` defaults to now less :data:`CLOCK_SKEW`; tests pass a past time
    to make an expired certificate.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or datetime.datetime.now(datetime.timezone.utc) - CLOCK_SKEW
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    self_signed = issuer is None
    ca = is_ca or self_signed
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if issuer is None else issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    signer = key if issuer is None else issuer.private_key
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.certificate.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    certificate = builder.sign(signer, hashes.SHA256())
    return KeyPair(certificate, key, issuer.chain if issuer and issuer.chain else ())


def plugin_uri(self_id: str) -> str:
    """The SAN URI a plugin certificate carries for its self id."""
    return f"{URI_SCHEME}://plugin/{self_id}"


def certificate_ids(certificate: x509.Certificate) -> list[str]:
    """The self ids a certificate names: its SAN URIs ``connectplugin://plugin/<id>`` (scheme
    and host in any case, as URIs compare them), in order.

    Never its common name, nor any other URI: a CA may also issue certificates for other uses
    (a server called ``kv``, a SPIFFE workload), and those name no plugin. A host admits a
    certificate naming exactly one id (:class:`~connectplugin.host.admission.CertificateIdentity`).
    """
    from cryptography import x509

    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    ids = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        scheme, separator, rest = uri.partition("://")
        host, slash, self_id = rest.partition("/")
        if separator and slash and self_id and scheme.lower() == URI_SCHEME and host.lower() == "plugin":
            ids.append(self_id)
    return ids


def check_names_plugin(der: bytes, self_id: str) -> None:
    """A server certificate (DER) must name plugin ``self_id`` and no other;
    ``ssl.SSLCertVerificationError`` otherwise."""
    from cryptography import x509

    named = certificate_ids(x509.load_der_x509_certificate(der))
    if named != [self_id]:
        raise ssl.SSLCertVerificationError(
            f"the server's certificate names plugins {named}, not only {self_id!r}"
        )


LOOPBACK_NAMES = ("localhost",)
LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")


# --- automatic mTLS between a host and the plugin it launches ---------------------------------


def auto_key_pair(lifetime: datetime.timedelta = AUTO_LIFETIME) -> KeyPair:
    """A fresh self-signed pair for one side of a launch; the other side pins its certificate."""
    return generate_key_pair(
        "connectplugin auto-mTLS", dns_names=LOOPBACK_NAMES, ip_addresses=LOOPBACK_ADDRESSES, lifetime=lifetime
    )


def pinned_to(own: KeyPair, peer: x509.Certificate) -> TLSConfig:
    """Present ``own`` and accept exactly ``peer``: either side of automatic mTLS."""
    return TLSConfig(key_pair=own, trust=Trust(pinned=(peer,)))


def encode_certificate(certificate: x509.Certificate) -> str:
    """A certificate as one token for a line of text (base64 of its DER, no ``|``)."""
    from cryptography.hazmat.primitives import serialization

    return base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()


def decode_certificate(text: str) -> x509.Certificate:
    """The certificate :func:`encode_certificate` made; ValueError for anything else."""
    from cryptography import x509

    try:
        return x509.load_der_x509_certificate(base64.b64decode(text.strip(), validate=True))
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not a base64 DER certificate: {e}") from None


@dataclass(frozen=True)
class DevPKI:
    """A development CA, a host certificate and one certificate per plugin, all signed by it."""

    ca: KeyPair
    host: KeyPair
    plugins: dict[str, KeyPair]

    def write(self, directory: str | os.PathLike) -> list[Path]:
        """Write ``ca.pem``, ``ca-key.pem``, ``host.pem``, ``host-key.pem`` and ``<plugin>.pem``,
        ``<plugin>-key.pem``; keys readable by the owner only. Returns the paths written."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, pair in [("ca", self.ca), ("host", self.host), *self.plugins.items()]:
            cert_path, key_path = out / f"{name}.pem", out / f"{name}-key.pem"
            cert_path.write_bytes(pair.certificate_pem())
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pair.private_key_pem())
            written += [cert_path, key_path]
        return written


def make_dev_pki(
    plugins: Sequence[str] = (),
    *,
    host_names: Sequence[str] = LOOPBACK_NAMES,
    host_addresses: Sequence[str] = LOOPBACK_ADDRESSES,
    lifetime: datetime.timedelta = DEV_LIFETIME,
) -> DevPKI:
    """A development CA and certificates it signs, for demos and tests: never for production.

    Every certificate (host and plugins) is good for serving at ``host_names`` /
    ``host_addresses`` and as a client certificate; a plugin's names its self id
    (``connectplugin://plugin/<name>``) and has the name as CN.
    """
    ca = generate_key_pair("connectplugin development CA", is_ca=True, lifetime=lifetime)
    host = generate_key_pair(
        "connectplugin host", issuer=ca, dns_names=host_names, ip_addresses=host_addresses, lifetime=lifetime
    )
    pairs = {
        name: generate_key_pair(
            name, issuer=ca, dns_names=host_names, ip_addresses=host_addresses, uris=[plugin_uri(name)],
            lifetime=lifetime,
        )
        for name in plugins
    }
    return DevPKI(ca, host, pairs)


# --- contexts ---------------------------------------------------------------------------------


def client_context(config: TLSConfig) -> ssl.SSLContext:
    """The ``ssl`` context a client uses for ``config``: verifies the server, presents our pair."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = config.minimum_version
    trust = config.trust
    if trust is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.load_verify_locations(cadata=certificates_pem(trust.anchors()).decode())
        # A pinned certificate is the server's identity; its names do not matter, and it
        # anchors a chain by itself even when a CA issued it.
        context.check_hostname = not trust.pins_only
        if trust.pinned:
            context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if config.key_pair is not None:
        load_key_pair(context, config.key_pair)
    return context


def load_key_pair(context: ssl.SSLContext, pair: KeyPair) -> None:
    """``context.load_cert_chain`` for a pair held in memory, without the key touching a disk."""
    pem = pair.certificate_pem()
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("connectplugin-tls", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(fd, pem + pair.private_key_pem())
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    # No anonymous files here: the key goes to a private temporary file encrypted under a
    # password that lives only in this frame, and the file is removed once read.
    password = secrets.token_bytes(32)
    with tempfile.NamedTemporaryFile(suffix=".pem", delete=False) as f:
        f.write(pem + pair.private_key_pem(password))
    try:
        context.load_cert_chain(f.name, password=password)
    finally:
        os.unlink(f.name)


def pin_fingerprint(trust: Trust | None) -> str | None:
    """urllib3's ``assert_fingerprint`` for a client pinned to one certificate."""
    if trust is None or not trust.pins_only:
        return None
    if len(trust.pinned) != 1:
        raise ValueError("a client pins exactly one server certificate")
    return fingerprint(trust.pinned[0])


def server_context(config: TLSConfig) -> Any:
    """The pyOpenSSL context the TLS server uses: our pair from memory, and when ``trust`` is
    set, a client certificate that trust accepts is required."""
    from OpenSSL import SSL, crypto

    if config.key_pair is None:
        raise ValueError("a TLS server needs a key pair")
    pair = config.key_pair
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    versions = {ssl.TLSVersion.TLSv1_2: SSL.TLS1_2_VERSION, ssl.TLSVersion.TLSv1_3: SSL.TLS1_3_VERSION}
    context.set_min_proto_version(versions[config.minimum_version])
    context.use_certificate(pair.certificate)
    context.use_privatekey(pair.private_key)  # type: ignore[arg-type]  # pyOpenSSL takes cryptography keys
    for extra in pair.chain:
        context.add_extra_chain_cert(crypto.X509.from_cryptography(extra))  # takes no other type yet
    context.check_privatekey()
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET)
    # No session resumption: every connection's certificate is checked afresh (a revoked one
    # is refused, not resumed), and OpenSSL answers a resumption attempt with a full handshake
    # instead of an internal-error alert (it has no session id context to resume in).
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    trust = config.trust
    if trust is not None:
        store = context.get_cert_store()
        assert store is not None
        for anchor in trust.anchors():
            store.add_cert(crypto.X509.from_cryptography(anchor))
        if trust.pinned:  # a pinned certificate anchors a chain by itself even when a CA issued it
            store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
        if isinstance(trust.revoked, RevocationList):
            version, certificates = trust.revoked.certificates()
            _list_revoked(store, certificates)
            context.set_app_data(_Made(config, trust.revoked, version))

        def verify(conn: Any, certificate: Any, errno: int, depth: int, ok: int) -> bool:
            if errno in _CRL_TROUBLE:
                return True  # our own CRLs (see _list_revoked): they decide nothing
            if errno == _CERT_REVOKED:  # in our CRL, so most likely revoked: the list decides
                return not is_revoked(certificate.to_cryptography(), trust.revoked)
            if not ok:
                # A live pin anchors itself: OpenSSL's only complaint allowed is that the
                # client's own certificate leads to no anchor in the store. Any other (expired,
                # not yet valid, wrong purpose, a bad certificate above it) still refuses it.
                return depth == 0 and errno in _NO_ANCHOR and trust.live_pinned(certificate.to_cryptography())
            return depth > 0 or trust.accepts_leaf(certificate.to_cryptography())

        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
    return context


def current_context(context: Any) -> Any:
    """The context for the next handshake in place of ``context`` (a :func:`server_context`):
    itself, or a new one when its ``RevocationList`` changed since it was made, so that what
    it tells revoked certificates is up to date. Cheap when nothing changed. A context's CRLs
    never change (OpenSSL's store cannot drop one): a new context each change keeps one per
    issuer, not one per change, and the old is freed with its last connection."""
    made = context.get_app_data()
    if made is None or made.revoked.version == made.version:
        return context
    return server_context(made.config)


@dataclass(frozen=True)
class _Made:
    """What a server context was made from: its config, and the version of the revocation
    list its CRLs say."""

    config: TLSConfig
    revoked: RevocationList
    version: int


_NO_ANCHOR = frozenset({18, 20, 21})
"""OpenSSL's verify errors that only say a client certificate leads to no anchor in the
store: X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT, _UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
_UNABLE_TO_VERIFY_LEAF_SIGNATURE."""
_CERT_REVOKED = 23
"""OpenSSL's X509_V_ERR_CERT_REVOKED: a certificate listed in a CRL (alert certificate_revoked)."""
_CRL_TROUBLE = frozenset({3, 5, 8, 11, 12, 15, 16, 33, 35, 36, 44, 54})
"""OpenSSL's verification errors that only checking CRLs raises (X509_V_ERR_UNABLE_TO_GET_CRL,
_UNABLE_TO_DECRYPT_CRL_SIGNATURE, _CRL_SIGNATURE_FAILURE, _CRL_NOT_YET_VALID, _CRL_HAS_EXPIRED,
_ERROR_IN_CRL_LAST_UPDATE_FIELD, _ERROR_IN_CRL_NEXT_UPDATE_FIELD, _UNABLE_TO_GET_CRL_ISSUER,
_KEYUSAGE_NO_CRL_SIGN, _UNHANDLED_CRITICAL_CRL_EXTENSION, _DIFFERENT_CRL_SCOPE,
_CRL_PATH_VALIDATION_ERROR)."""


def _list_revoked(store: Any, certificates: Sequence[x509.Certificate]) -> None:
    """Make a TLS server refuse these revoked certificates with the alert ``certificate_revoked``.

    pyOpenSSL's verify callback can refuse a certificate but not say why: OpenSSL then sends
    ``internal_error``, and the client is left guessing. OpenSSL says "revoked" only for a
    certificate its own CRL check finds in a CRL, and a CRL must be signed by the issuing
    CA's key, which a server rarely holds. So the server's store gets CRLs of its own, one
    per issuer, signed by a throwaway key, listing the revoked certificates it knows by
    issuer and serial; the check finds their signature wrong, the verify callback accepts
    every error that only CRLs raise (``_CRL_TROUBLE``), and what remains is OpenSSL's
    "revoked" for a listed serial, which the callback confirms against the fingerprints.
    The fingerprints decide, as without CRLs: a CRL only chooses the alert. A certificate
    revoked by its fingerprint alone has no serial to list, nor has one whose serial a CRL
    cannot hold (zero, negative, over 20 octets): they get ``internal_error`` still.
    The CRLs' dates are fixed and long past and far ahead: no clock makes them stale."""
    if not certificates:
        return
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from OpenSSL import crypto

    key = ec.generate_private_key(ec.SECP256R1())
    by_issuer: dict[x509.Name, list[int]] = {}
    for certificate in certificates:
        if 0 < certificate.serial_number < 2**159:  # what a CRL can list (RFC 5280: positive, 20 octets)
            by_issuer.setdefault(certificate.issuer, []).append(certificate.serial_number)
    if not by_issuer:
        return
    for issuer, serials in by_issuer.items():
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer)
            .last_update(_CRL_DATES[0])
            .next_update(_CRL_DATES[1])
        )
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(_CRL_DATES[0]).build()
            )
        store.add_crl(builder.sign(key, hashes.SHA256()))
    store.set_flags(crypto.X509StoreFlags.CRL_CHECK)


_CRL_DATES = (
    datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc),
    datetime.datetime(9999, 1, 1, tzinfo=datetime.timezone.utc),
)
"""The ``lastUpdate`` and ``nextUpdate`` of the CRLs of :func:`_list_revoked`."""


def peer_certificate(environ: dict) -> x509.Certificate | None:
    """The verified client certificate of the connection a TLS-served request came on."""
    get = environ.get(PEER_CERTIFICATE_KEY)
    return get() if get is not None else None


PEER_CERTIFICATE_KEY = "connectplugin.peer_certificate"
"""WSGI environ key of the TLS server: a callable returning the client's certificate (or None)."""


# --- the command ------------------------------------------------------------------------------


# --- a failed handshake, in words --------------------------------------------------------------

_ALERTS = {
    # What a server's alert says about the client's certificate (RFC 8446 6.2; TLS 1.2 names).
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust the CA that issued the client certificate",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the server has revoked the client certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server finds the client certificate expired or not yet valid",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server refused the client certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the server refused the client certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the server refused the client certificate",
    # Our server's verify callback can refuse but not say why (see _list_revoked).
    "TLSV1_ALERT_INTERNAL_ERROR": "the server refused the handshake, as it refuses a client certificate "
    "it revoked by fingerprint or does not accept",
}
_VERIFY_ERRORS = {
    # OpenSSL's X509_V_ERR_* codes for the server's certificate, as the client checked it.
    9: "the server's certificate is not valid yet (or this machine's clock is behind)",
    10: "the server's certificate has expired (or this machine's clock is ahead)",
    18: "the server's certificate is self-signed, and the client trusts no such certificate",
    19: "the server's certificate is not from a CA (or a pinned certificate) the client trusts",
    20: "the server's certificate is not from a CA (or a pinned certificate) the client trusts",
    21: "the server's certificate is not from a CA (or a pinned certificate) the client trusts",
    62: "the server's certificate does not name the host of the URL",
    64: "the server's certificate does not name the address of the URL",
}


def explain(error: BaseException) -> str:
    """A TLS failure's error message, led by what it means in plain words when that is known
    (``ssl``'s messages quote OpenSSL: "tlsv13 alert certificate required")."""
    meaning = ""  # an ssl error of our own making has no verify_code or reason
    if isinstance(error, ssl.SSLCertVerificationError):
        meaning = _VERIFY_ERRORS.get(getattr(error, "verify_code", 0), "")
    elif isinstance(error, ssl.SSLEOFError):
        meaning = "the server closed the connection (as a TLS server may when it requires a client certificate)"
    elif isinstance(error, ssl.SSLError):
        meaning = _ALERTS.get(getattr(error, "reason", None) or "", "")
    text = str(error) or type(error).__name__
    return f"{meaning}: {text}" if meaning else text


def main(argv: Sequence[str] | None = None) -> int:
    """``connectplugin-devpki --out DIR [--plugin NAME ...]``: a development PKI."""
    parser = argparse.ArgumentParser(
        prog="connectplugin-devpki",
        description="Write a development CA, a host certificate and plugin certificates (PEM), "
        "for demos and tests. Not for production.",
    )
    parser.add_argument("--out", required=True, help="directory to write the PEM files to")
    parser.add_argument("--plugin", action="append", default=[], help="a plugin self id (repeat)")
    parser.add_argument("--host-name", action="append", default=None, help="a DNS name to serve at (repeat)")
    parser.add_argument("--host-address", action="append", default=None, help="an IP address to serve at (repeat)")
    parser.add_argument("--days", type=int, default=DEV_LIFETIME.days, help="validity in days")
    args = parser.parse_args(argv)
    pki = make_dev_pki(
        args.plugin,
        host_names=args.host_name or LOOPBACK_NAMES,
        host_addresses=args.host_address or LOOPBACK_ADDRESSES,
        lifetime=datetime.timedelta(days=args.days),
    )
    for path in pki.write(args.out):
        sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
