"""TLS and mTLS with real certificates and real handshakes: who is accepted, who is refused,
and that a refusal is a clear error while the server keeps serving."""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from connectplugin import (
    App,
    CertificateIdentity,
    Client,
    ClientConfig,
    Code,
    ConnectError,
    HostConfig,
    HostLink,
    HTTPConfig,
    HTTPServer,
    InProcessStrategy,
    LaunchError,
    LaunchFailure,
    PluginHost,
    PluginServer,
    ProcessStrategy,
    RestartPolicy,
    RetryConfig,
    ServeConfig,
    ServingStatus,
)
from connectplugin.gen.connectplugin.v1 import registry_pb2
from connectplugin.gen.connectplugin.v1.handshake_connect import HandshakeServiceClient
from connectplugin.gen.connectplugin.v1.registry_connect import ServiceRegistryClient
from connectplugin.rpc import httpserver, tls
from connectplugin.rpc._transport import ConnectionPool
from connectplugin.rpc.httpserver import PlaintextRefusedError
from connectplugin.runtime import handshake as hs
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KV_PLUGIN, KVServiceClient
from samples.platform import HANDSHAKE
from tests.helpers import ENV, ROOT, in_process, module, port_is_free, provider_process, wait_until
from tests.platform_plugins.provider import PLUGINS, Recorder, declare
from tests.services import ScriptedKV

A_YEAR_AGO = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=365)


@pytest.fixture
def kv() -> Iterator[ScriptedKV]:
    handler = ScriptedKV()
    yield handler
    handler.released.set()


@pytest.fixture
def mtls_server(pki, kv) -> Iterator[HTTPServer]:
    """A TLS server that requires a client certificate from the development CA."""
    config = tls.TLSConfig(key_pair=pki.host, trust=tls.Trust(cas=(pki.ca.certificate,)))
    server = HTTPServer(App([kv]), HTTPConfig(threads=2, tls=config)).start()
    yield server
    server.close(grace=1.0)


@pytest.fixture
def plain_server(kv) -> Iterator[HTTPServer]:
    server = HTTPServer(App([kv]), HTTPConfig(threads=2)).start()
    yield server
    server.close(grace=1.0)


def put(url: str, config: tls.TLSConfig | None, connect_timeout: float = 5.0) -> kv_pb2.PutResponse:
    with Client(url, ClientConfig(tls=config, timeout=10, connect_timeout=connect_timeout)) as client:
        return KVServiceClient(client).put(kv_pb2.PutRequest(key="a", value=b"1"))


def as_plugin(pki: tls.DevPKI, name: str = "kv") -> tls.TLSConfig:
    return tls.TLSConfig(key_pair=pki.plugins[name], trust=tls.Trust(cas=(pki.ca.certificate,)))


# --- accepted ---------------------------------------------------------------------------------


def test_a_client_with_a_certificate_from_the_ca_calls_an_mtls_server(mtls_server, pki, kv):
    put(mtls_server.url, as_plugin(pki))

    assert kv.last.request.key == "a"


def test_a_client_pinned_to_the_server_certificate_needs_no_ca(mtls_server, pki):
    pinned = tls.TLSConfig(key_pair=pki.plugins["kv"], trust=tls.Trust(pinned=(pki.host.certificate,)))

    put(mtls_server.url, pinned)


def test_the_handler_sees_the_client_certificate(mtls_server, pki, kv):
    seen = []

    def get(request, ctx):
        seen.append(tls.peer_certificate(ctx.environ))
        return kv_pb2.GetResponse()

    kv.script("get", get)
    with Client(mtls_server.url, ClientConfig(tls=as_plugin(pki, "other"))) as client:
        KVServiceClient(client).get(kv_pb2.GetRequest(key="a"))

    assert seen == [pki.plugins["other"].certificate]
    assert tls.certificate_ids(seen[0]) == ["other"]


def test_the_router_pool_verifies_and_presents_certificates(mtls_server, pki):
    pool = ConnectionPool(mtls_server.url, size=2, tls=as_plugin(pki))
    try:
        response = pool.send("GET", "/readyz-missing", {}, None, 5.0, 5.0)
        response.read(1024)
        response.close()
    finally:
        pool.close()

    assert response.status == 404  # reached the app over mTLS


def test_requests_sent_back_to_back_on_one_tls_connection_are_both_answered(mtls_server, pki):
    """The server's TLS reader keeps what it read past one request for the next."""
    context = tls.client_context(as_plugin(pki))
    request = b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n" + b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((mtls_server.host, mtls_server.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as conn:
            conn.sendall(request)
            received = b""
            while received.count(b"no procedure at") < 2:
                data = conn.recv(65536)
                assert data, f"the server closed after {received!r}"
                received += data

    assert b"/first" in received and b"/second" in received


# --- refused, clearly, and the server keeps serving -------------------------------------------


def refused_configs(pki: tls.DevPKI) -> dict[str, tls.TLSConfig | None]:
    other = tls.make_dev_pki(["kv"])
    ca = tls.Trust(cas=(pki.ca.certificate,))
    expired = tls.generate_key_pair(
        "kv", issuer=pki.ca, uris=[tls.plugin_uri("kv")], not_before=A_YEAR_AGO, lifetime=datetime.timedelta(days=1)
    )
    return {
        "no client certificate": tls.TLSConfig(trust=ca),
        "client certificate from another CA": tls.TLSConfig(key_pair=other.plugins["kv"], trust=ca),
        "expired client certificate": tls.TLSConfig(key_pair=expired, trust=ca),
        "server checked against another CA": tls.TLSConfig(
            key_pair=pki.plugins["kv"], trust=tls.Trust(cas=(other.ca.certificate,))
        ),
        "server pinned to another certificate": tls.TLSConfig(
            key_pair=pki.plugins["kv"], trust=tls.Trust(pinned=(other.host.certificate,))
        ),
        "system CAs only": tls.TLSConfig(key_pair=pki.plugins["kv"]),
    }


@pytest.mark.parametrize(
    "case",
    [
        "no client certificate",
        "client certificate from another CA",
        "expired client certificate",
        "server checked against another CA",
        "server pinned to another certificate",
        "system CAs only",
    ],
)
def test_a_refused_handshake_is_unavailable_and_the_server_keeps_serving(mtls_server, pki, case):
    config = refused_configs(pki)[case]

    with pytest.raises(ConnectError) as refused:
        put(mtls_server.url, config)

    assert refused.value.code is Code.UNAVAILABLE
    assert "SSL" in refused.value.message or "EOF" in refused.value.message
    # What it means leads the message (or, for a refused client, the server hung up on it).
    assert MEANINGS[case] in refused.value.message or (
        "client" in case and "the server closed the connection" in refused.value.message
    ), refused.value.message
    put(mtls_server.url, as_plugin(pki))


MEANINGS = {
    "no client certificate": ": the server requires a client certificate: [SSL: ",
    "client certificate from another CA": ": the server does not trust the CA that issued the client certificate: [",
    "expired client certificate": ": the server finds the client certificate expired or not yet valid: [",
    "server checked against another CA": "certificate is not from a CA (or a pinned certificate) the client trusts: [",
    "server pinned to another certificate": "certificate is not from a CA (or a pinned certificate) the client trusts",
    "system CAs only": "certificate is not from a CA (or a pinned certificate) the client trusts",
}


def test_a_revoked_client_certificate_is_refused(pki, kv):
    revoked = tls.Trust(cas=(pki.ca.certificate,), revoked=frozenset({pki.plugins["kv"].fingerprint}))
    config = tls.TLSConfig(key_pair=pki.host, trust=revoked)
    with HTTPServer(App([kv]), HTTPConfig(threads=2, tls=config)) as server:
        with pytest.raises(ConnectError) as refused:
            put(server.url, as_plugin(pki, "kv"))
        put(server.url, as_plugin(pki, "other"))

    assert refused.value.code is Code.UNAVAILABLE


def test_a_client_whose_certificate_is_revoked_is_told_so_and_accepted_again_once_unrevoked(pki, kv):
    revoked = tls.RevocationList()
    config = tls.TLSConfig(key_pair=pki.host, trust=tls.Trust(cas=(pki.ca.certificate,), revoked=revoked))
    with HTTPServer(App([kv]), HTTPConfig(threads=2, tls=config)) as server:
        put(server.url, as_plugin(pki, "kv"))
        revoked.add(pki.plugins["kv"].certificate)

        with pytest.raises(ConnectError) as refused:
            put(server.url, as_plugin(pki, "kv"))
        put(server.url, as_plugin(pki, "other"))  # same CA, not revoked
        revoked.discard(pki.plugins["kv"].certificate)
        put(server.url, as_plugin(pki, "kv"))

    assert refused.value.code is Code.UNAVAILABLE
    assert "certificate revoked" in refused.value.message


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_pythons_ssl_reads_the_alert_certificate_revoked(pki, kv, version):
    revoked = tls.RevocationList([pki.plugins["kv"].certificate, pki.plugins["other"].fingerprint])
    config = tls.TLSConfig(key_pair=pki.host, trust=tls.Trust(cas=(pki.ca.certificate,), revoked=revoked))
    with HTTPServer(App([kv]), HTTPConfig(threads=2, tls=config)) as server:
        context = tls.client_context(as_plugin(pki, "kv"))
        context.maximum_version = version
        with socket.create_connection((server.host, server.port), timeout=10) as raw:
            with pytest.raises(ssl.SSLError) as refused:
                with context.wrap_socket(raw, server_hostname="localhost") as sock:
                    sock.recv(1)  # TLS 1.3: the client's handshake ends before the server's check

    assert "certificate revoked" in str(refused.value)


# The orders of P-256 (the development CA's curve) and P-521 (``openssl ecparam -param_enc explicit``).
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
P521_ORDER = int(
    "01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF"
    "FA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409", 16
)


def ecdsa_twin(pair: tls.KeyPair, order: int = P256_ORDER) -> tls.KeyPair:
    """``pair`` with its certificate's ECDSA signature (r, s) made (r, n - s): as valid (the CA
    signed it, as far as anyone can tell), another DER, another fingerprint. Anyone holding a
    certificate can make it."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.utils import (
        decode_dss_signature,
        encode_dss_signature,
    )
    from cryptography.hazmat.primitives.serialization import Encoding

    def element(data: bytes, at: int) -> tuple[int, int]:  # a DER element's content start and end
        length, start = data[at + 1], at + 2
        if length & 0x80:
            start += length & 0x7F
            length = int.from_bytes(data[at + 2:start], "big")
        return start, start + length

    def length_of(size: int) -> bytes:
        octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
        return bytes([size]) if size < 0x80 else bytes([0x80 | len(octets)]) + octets

    der = pair.certificate.public_bytes(Encoding.DER)
    start, _ = element(der, 0)
    algorithm_end = element(der, element(der, start)[1])[1]  # after the signed part and the algorithm
    r, s = decode_dss_signature(pair.certificate.signature)
    signature = b"\0" + encode_dss_signature(r, order - s)
    body = der[start:algorithm_end] + b"\x03" + length_of(len(signature)) + signature
    twin = x509.load_der_x509_certificate(b"\x30" + length_of(len(body)) + body)
    return tls.KeyPair(twin, pair.private_key, pair.chain)


def test_a_revocation_list_changed_again_and_again_keeps_the_servers_memory_flat(pki, kv):
    """Each change of the list used to add CRLs listing every revoked certificate to the
    server's store for good (~45 kB per change with 200 revoked here)."""
    revoked = tls.RevocationList(tls.generate_key_pair(f"p{i}", issuer=pki.ca).certificate for i in range(200))
    config = tls.TLSConfig(key_pair=pki.host, trust=tls.Trust(cas=(pki.ca.certificate,), revoked=revoked))
    context = tls.server_context(config)
    flipped = pki.plugins["kv"].certificate

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    for n in range(200):
        (revoked.discard if n % 2 else revoked.add)(flipped)
        context = tls.current_context(context)
    grown = rss() - before

    assert grown < 4 * 2**20, f"{grown / 2**20:.1f} MiB more after 200 changes"
    with HTTPServer(App([kv]), HTTPConfig(threads=2, tls=config)) as server:  # still right
        put(server.url, as_plugin(pki, "kv"))
        revoked.add(flipped)
        with pytest.raises(ConnectError) as refused:
            put(server.url, as_plugin(pki, "kv"))
    assert "certificate revoked" in refused.value.message


def test_a_fingerprint_as_openssl_prints_it_revokes_and_a_malformed_one_is_an_error(pki, make_host):
    kv = pki.plugins["kv"]
    openssl = "sha256 Fingerprint=" + ":".join(kv.fingerprint[i:i + 2] for i in range(0, 64, 2)).upper()

    assert kv.fingerprint in tls.RevocationList([openssl])
    assert not tls.Trust(cas=(pki.ca.certificate,), revoked=frozenset({openssl})).accepts_leaf(kv.certificate)
    for malformed in ("", kv.fingerprint[:-1], "AB:CD", "sha1 Fingerprint=" + "ab" * 20, kv.fingerprint + "0"):
        with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
            tls.RevocationList([malformed])
        with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
            tls.PinList().add(malformed)
        with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
            tls.Trust(cas=(pki.ca.certificate,), revoked=frozenset({malformed}))
    host = make_host()
    with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
        host.revoke_certificate("AB:CD")
    host.revoke_certificate(openssl)
    assert kv.fingerprint in host.revoked


def test_revoking_a_certificate_whose_serial_no_crl_can_list_leaves_the_server_accepting(pki, kv):
    """Serial 0 (a broken CA's, or a forged certificate the operator revokes all the same): a
    CRL cannot list it, and making the CRLs failed at every accept, so nobody got in."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    original = pki.plugins["other"].certificate
    der = bytearray(original.public_bytes(Encoding.DER))
    serial = original.serial_number.to_bytes((original.serial_number.bit_length() + 8) // 8, "big")
    at = der.index(b"\x02" + bytes([len(serial)]) + serial)
    der[at:at + 2 + len(serial)] = b"\x02\x01\x00"
    for length_at in (2, 6):  # the certificate's and its signed part's two-octet lengths
        der[length_at:length_at + 2] = (int.from_bytes(der[length_at:length_at + 2], "big") + 1 - len(serial)).to_bytes(2, "big")
    zero = x509.load_der_x509_certificate(bytes(der))
    assert zero.serial_number == 0
    revoked = tls.RevocationList()
    config = tls.TLSConfig(key_pair=pki.host, trust=tls.Trust(cas=(pki.ca.certificate,), revoked=revoked))
    with HTTPServer(App([kv]), HTTPConfig(threads=2, tls=config)) as server:
        revoked.add(zero, pki.plugins["kv"].certificate)

        put(server.url, as_plugin(pki, "other"), connect_timeout=10)
        with pytest.raises(ConnectError) as refused:
            put(server.url, as_plugin(pki, "kv"))
    assert "certificate revoked" in refused.value.message


def test_a_twin_of_a_certificate_signed_on_another_curve_is_revoked_with_it():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key = ec.generate_private_key(ec.SECP521R1())
    ca = tls.KeyPair(tls.generate_key_pair("P-521 CA", is_ca=True).certificate, ca_key)  # signs with ca_key
    leaf = tls.generate_key_pair("leaf", issuer=ca)
    twin = ecdsa_twin(leaf, P521_ORDER).certificate
    ca_key.public_key().verify(twin.signature, twin.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))  # valid

    assert tls.is_revoked(twin, {leaf.fingerprint})
    assert tls.is_revoked(leaf.certificate, {tls.fingerprint(twin)})
    assert not tls.is_revoked(twin, {tls.generate_key_pair("other", issuer=ca).fingerprint})


@pytest.mark.parametrize("how", ["as a certificate", "by its fingerprint", "in a fixed set"])
def test_a_revoked_certificates_ecdsa_twin_is_refused_too(pki, kv, how):
    original = pki.plugins["kv"]
    twin = ecdsa_twin(original)
    assert twin.fingerprint != original.fingerprint
    twin.certificate.verify_directly_issued_by(pki.ca.certificate)  # as valid as the original
    revoked = {
        "as a certificate": tls.RevocationList([original.certificate]),
        "by its fingerprint": tls.RevocationList([original.fingerprint]),
        "in a fixed set": frozenset({original.fingerprint}),
    }[how]
    config = tls.TLSConfig(key_pair=pki.host, trust=tls.Trust(cas=(pki.ca.certificate,), revoked=revoked))
    with HTTPServer(App([kv]), HTTPConfig(threads=2, tls=config)) as server:
        with pytest.raises(ConnectError) as refused:
            put(server.url, presenting(pki, twin))
        put(server.url, as_plugin(pki, "other"))

    assert refused.value.code is Code.UNAVAILABLE
    if how == "as a certificate":
        assert "certificate revoked" in refused.value.message


def test_a_plaintext_client_at_a_tls_port_is_told_to_use_https(mtls_server, pki):
    plain_url = mtls_server.url.replace("https://", "http://")

    with pytest.raises(ConnectError) as refused:
        put(plain_url, None)

    assert "HTTPS" in refused.value.message
    put(mtls_server.url, as_plugin(pki))


def test_a_tls_client_at_a_plaintext_port_fails_and_the_server_keeps_serving(plain_server, pki):
    tls_url = plain_server.url.replace("http://", "https://")

    # waitress waits for a request line that never comes: the handshake's connect timeout
    # ends the wait (short here, to keep the test fast).
    with pytest.raises(ConnectError) as refused:
        put(tls_url, as_plugin(pki), connect_timeout=0.3)

    assert refused.value.code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)
    put(plain_server.url, None)


def test_tls_settings_with_an_http_url_are_refused_at_once():
    with pytest.raises(ValueError):
        Client("http://127.0.0.1:1", ClientConfig(tls=tls.TLSConfig()))


# --- configuration helpers --------------------------------------------------------------------


def test_key_pairs_and_trust_load_from_pem_bytes_and_files(pki, tmp_path):
    pki.write(tmp_path)

    from_files = tls.KeyPair.from_files(tmp_path / "kv.pem", tmp_path / "kv-key.pem")
    from_bytes = tls.KeyPair.from_pem(pki.plugins["kv"].certificate_pem(), pki.plugins["kv"].private_key_pem())
    trust = tls.Trust.from_files(cas=tmp_path / "ca.pem")

    assert from_files.certificate == from_bytes.certificate == pki.plugins["kv"].certificate
    assert trust.cas == (pki.ca.certificate,)


def test_an_encrypted_key_loads_with_its_password(pki):
    pair = pki.plugins["kv"]

    loaded = tls.KeyPair.from_pem(pair.certificate_pem(), pair.private_key_pem(b"secret"), password=b"secret")

    assert loaded.fingerprint == pair.fingerprint


def test_the_devpki_command_writes_a_ca_host_and_plugins_with_private_keys(tmp_path):
    assert tls.main(["--out", str(tmp_path), "--plugin", "kv", "--plugin", "logger"]) == 0

    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        f"{n}{suffix}.pem" for n in ("ca", "host", "kv", "logger") for suffix in ("", "-key")
    )
    assert stat.S_IMODE(os.stat(tmp_path / "kv-key.pem").st_mode) == 0o600
    kv_cert = tls.KeyPair.from_files(tmp_path / "kv.pem", tmp_path / "kv-key.pem").certificate
    assert tls.certificate_ids(kv_cert) == ["kv"]


def test_a_trust_without_anchors_is_refused():
    with pytest.raises(ValueError):
        tls.Trust()


# --- automatic mTLS for launched plugins -----------------------------------------------------


@pytest.fixture
def mtls_host(make_host):
    return make_host(auto_mtls=True)


def test_a_launched_plugin_serves_mtls_and_dispense_works_unchanged(mtls_host):
    plugin = mtls_host.launch(provider_process("svc"), name="p")

    assert plugin.url.startswith("https://")
    kv = plugin.dispense("kv")
    kv.put(kv_pb2.PutRequest(key="k", value=b"v"))
    assert kv.get(kv_pb2.GetRequest(key="k")).value == b"v"
    assert plugin.check_health() is ServingStatus.SERVING


def test_the_router_reaches_a_launched_plugin_over_mtls(mtls_host, peer):
    mtls_host.launch(provider_process("svc"), name="p")
    caller = peer(mtls_host, "caller")
    kv = caller.kv(caller.discover("svc"))

    kv.put(kv_pb2.PutRequest(key="k", value=b"routed"))
    assert kv.get(kv_pb2.GetRequest(key="k")).value == b"routed"


def test_a_launched_plugin_refuses_a_client_without_the_hosts_certificate(mtls_host, pki):
    plugin = mtls_host.launch(provider_process("svc"), name="p")
    assert plugin.running is not None and plugin.running.tls is not None
    plugin_certificate = plugin.running.tls.trust.pinned[0]  # type: ignore[union-attr]
    strangers = {
        "no client certificate": tls.TLSConfig(trust=tls.Trust(pinned=(plugin_certificate,))),
        "another certificate": tls.pinned_to(tls.auto_key_pair(), plugin_certificate),
        "a CA-signed certificate": tls.pinned_to(pki.plugins["kv"], plugin_certificate),
    }

    for name, config in strangers.items():
        with pytest.raises(ConnectError) as refused:
            put(plugin.url, config)
        assert refused.value.code is Code.UNAVAILABLE, name
    assert plugin.check_health() is ServingStatus.SERVING


def test_a_launched_plugin_refuses_plaintext(mtls_host):
    plugin = mtls_host.launch(provider_process("svc"), name="p")

    with pytest.raises(ConnectError):
        put(plugin.url.replace("https://", "http://"), None)
    assert plugin.check_health() is ServingStatus.SERVING


def test_the_host_refuses_a_plugin_that_does_not_announce_a_certificate(mtls_host):
    liar = ProcessStrategy(
        [sys.executable, "-c", "import sys, time; sys.stdin.readline(); print('1|1|https://127.0.0.1:9', flush=True); time.sleep(30)"],
        start_timeout=10,
    )

    with pytest.raises(LaunchError) as failed:
        mtls_host.launch(liar, name="liar")

    assert failed.value.reason is LaunchFailure.REFUSED


# --- a host serving TLS launches plugins -------------------------------------------------------


@pytest.mark.parametrize(
    ("auto_mtls", "client_certificates"), [(False, False), (True, False), (False, True)],
    ids=["tls", "tls+auto_mtls", "mtls"],
)
def test_plugins_a_tls_host_launches_call_it_back_over_tls(make_host, pki, auto_mtls, client_certificates):
    trust = tls.Trust(cas=(pki.ca.certificate,)) if client_certificates else None
    host = make_host(http=HTTPConfig(threads=8, tls=tls.TLSConfig(key_pair=pki.host, trust=trust)), auto_mtls=auto_mtls)
    assert host.url.startswith("https://")

    # launch() returns once the subprocess registered "svc" with the host's registry, over TLS.
    provider = host.launch(provider_process("svc"), name="provider")
    link = HostLink()
    host.launch(in_process("caller", link=link), name="caller")
    found = link.discover("svc")
    kv = link.client("svc", KVServiceClient)
    kv.put(kv_pb2.PutRequest(key="k", value=b"over tls"))

    assert found.endpoint.provider_id == host.discover("svc").provider_id
    assert kv.get(kv_pb2.GetRequest(key="k")).value == b"over tls"
    assert provider.check_health() is ServingStatus.SERVING


# --- a host requiring client certificates launches plugins -------------------------------------


@pytest.fixture
def pins() -> tls.PinList:
    return tls.PinList()


@pytest.fixture
def revoked() -> tls.RevocationList:
    return tls.RevocationList()


@pytest.fixture
def pinning_server(pki, kv, pins, revoked) -> Iterator[HTTPServer]:
    """A TLS server requiring a client certificate from the development CA or in ``pins``."""
    trust = tls.Trust(cas=(pki.ca.certificate,), revoked=revoked, live_pins=pins)
    server = HTTPServer(App([kv]), HTTPConfig(threads=2, tls=tls.TLSConfig(key_pair=pki.host, trust=trust))).start()
    yield server
    server.close(grace=1.0)


def presenting(pki: tls.DevPKI, pair: tls.KeyPair | None) -> tls.TLSConfig:
    """A client presenting ``pair`` (None: no certificate) to a server of the development CA."""
    return tls.TLSConfig(key_pair=pair, trust=tls.Trust(cas=(pki.ca.certificate,)))


def test_a_live_pin_is_accepted_while_listed_whoever_issued_it(pinning_server, pki, pins):
    own, foreign = tls.auto_key_pair(), tls.make_dev_pki(["kv"]).plugins["kv"]  # self-signed; another CA's
    pins.add(own.certificate, foreign.certificate)

    put(pinning_server.url, presenting(pki, own))
    put(pinning_server.url, presenting(pki, foreign))
    put(pinning_server.url, as_plugin(pki))  # the CA's certificates still are

    pins.discard(own.certificate)
    with pytest.raises(ConnectError) as refused:
        put(pinning_server.url, presenting(pki, own))
    assert refused.value.code is Code.UNAVAILABLE
    put(pinning_server.url, presenting(pki, foreign))


def _signed_by(issuer: tls.KeyPair) -> tls.KeyPair:
    """A certificate ``issuer`` signed, sent with ``issuer``'s certificate as its chain."""
    leaf = tls.generate_key_pair("signed by a pin", issuer=issuer)
    return tls.KeyPair(leaf.certificate, leaf.private_key, (issuer.certificate,))


@pytest.mark.parametrize(
    "case",
    ["no certificate", "not pinned", "pinned then removed", "pinned but expired", "pinned but not yet valid",
     "pinned but revoked", "signed by a pinned certificate"],
)
def test_nothing_but_a_listed_valid_live_pin_slips_in(pinning_server, pki, pins, revoked, case):
    pinned = tls.auto_key_pair()
    pins.add(pinned.certificate)
    expired = tls.generate_key_pair("x", not_before=A_YEAR_AGO, lifetime=datetime.timedelta(days=1))
    future = tls.generate_key_pair("x", not_before=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1))
    presented = {
        "no certificate": None,
        "not pinned": tls.auto_key_pair(),
        "pinned then removed": pinned,
        "pinned but expired": expired,
        "pinned but not yet valid": future,
        "pinned but revoked": pinned,
        "signed by a pinned certificate": _signed_by(pinned),
    }[case]
    pins.add(expired.certificate, future.certificate)
    if case == "pinned then removed":
        pins.discard(pinned.certificate)
    if case == "pinned but revoked":
        revoked.add(pinned.certificate)

    with pytest.raises(ConnectError) as refused:
        put(pinning_server.url, presenting(pki, presented))

    assert refused.value.code is Code.UNAVAILABLE
    put(pinning_server.url, as_plugin(pki))


def requiring_certificates(pki: tls.DevPKI) -> HTTPConfig:
    """A host's server requiring client certificates from the development CA."""
    server_tls = tls.TLSConfig(key_pair=pki.host, trust=tls.Trust(cas=(pki.ca.certificate,)))
    return HTTPConfig(threads=8, max_streams=8, tls=server_tls)


@pytest.fixture
def ca_host(make_host, pki) -> PluginHost:
    """A host requiring client certificates, admitting no joiners; ``auto_mtls`` left off."""
    return make_host(http=requiring_certificates(pki), dev_cookie_joins=False)


def holding(name: str, pair: tls.KeyPair, link: HostLink, *provides: str) -> InProcessStrategy:
    """An in-process plugin configured with ``pair``, which it presents calling its host:
    the test holds the key a subprocess keeps to itself."""
    config = ServeConfig(
        self_id=name, self_version="1.0.0", provides=[declare(t) for t in provides],
        http=HTTPConfig(tls=tls.TLSConfig(key_pair=pair)),
    )
    return InProcessStrategy({"kv": Recorder(name)}, config, link=link)


def host_answer(host: PluginHost, pki: tls.DevPKI, pair: tls.KeyPair | None, credentials: dict[str, str]) -> Code | None:
    """What a Discover of the host presenting ``pair`` and ``credentials`` gets: None when it
    is answered; ``unavailable`` when the TLS handshake refuses the certificate."""
    config = tls.TLSConfig(key_pair=pair, trust=tls.Trust(pinned=(pki.host.certificate,)))
    try:
        with Client(host.url, ClientConfig(tls=config, headers=credentials, timeout=5)) as client:
            discover(client)
    except ConnectError as e:
        return e.code
    return None


def test_plugins_a_host_requiring_client_certificates_launches_register_discover_and_call_each_other(
    make_host, pki, caplog
):
    caplog.set_level(logging.INFO, logger="connectplugin.plugin.logger")
    ca_host = make_host(plugins={"cache": KV_PLUGIN}, http=requiring_certificates(pki), dev_cookie_joins=False)
    ca_host.launch(module("samples.platform.logger"), name="logger")
    # The cache discovers the logger before it serves, registers, and logs each write
    # through the host's router: every one a call back to the host over mTLS.
    cache = ca_host.launch(module("samples.platform.cache"), name="cache")

    cache.dispense("cache").put(kv_pb2.PutRequest(key="greeting", value=b"hi"))

    cache_id = ca_host.runtime_id(cache)
    wait_until(
        lambda: any(f"[{cache_id}] cache put key=greeting" in r.getMessage() for r in caplog.records),
        "the logger to log the cache's write, routed through the host",
    )
    assert cache.running is not None and cache.running.client_certificate is not None  # auto mTLS, though off
    certificate = tls.fingerprint(cache.running.client_certificate)
    assert certificate in ca_host.pins and len(ca_host.pins) == 2
    assert ca_host.identities.get(cache_id).certificate == certificate


def test_a_launched_plugins_certificate_is_accepted_while_it_runs_and_a_restart_brings_a_new_one(ca_host):
    first = ca_host.launch(provider_process("svc"), name="p", restart=RestartPolicy(RetryConfig(initial_backoff=0.0, jitter=0.0)))
    assert first.running is not None and first.running.client_certificate is not None
    old = tls.fingerprint(first.running.client_certificate)
    assert list(ca_host.pins) == [old]

    os.kill(first.running.pid, signal.SIGKILL)
    wait_until(lambda: ca_host.current(first) is not first, "the crashed plugin's successor", timeout=30)

    successor = ca_host.current(first)
    assert successor.running is not None and successor.running.client_certificate is not None
    new = tls.fingerprint(successor.running.client_certificate)
    assert list(ca_host.pins) == [new] and new != old
    assert successor.check_health() is ServingStatus.SERVING  # it registered again, over mTLS
    ca_host.stop(successor)
    assert list(ca_host.pins) == []


def test_the_host_refuses_a_stopped_plugins_certificate_a_stranger_and_no_certificate(ca_host, pki):
    own, link = tls.auto_key_pair(), HostLink()
    plugin = ca_host.launch(holding("p", own, link, "svc"), name="p")  # it registered: a call back
    assert host_answer(ca_host, pki, own, link.headers()) is None

    ca_host.stop(plugin)

    assert host_answer(ca_host, pki, own, {}) is Code.UNAVAILABLE
    assert host_answer(ca_host, pki, tls.auto_key_pair(), {}) is Code.UNAVAILABLE
    assert host_answer(ca_host, pki, None, {}) is Code.UNAVAILABLE
    assert host_answer(ca_host, pki, pki.plugins["kv"], {}) is Code.INVALID_ARGUMENT  # its handshake passed


def test_a_launched_plugins_token_over_another_launched_plugins_certificate_is_unauthenticated(ca_host, pki):
    pairs, links = {n: tls.auto_key_pair() for n in "ab"}, {n: HostLink() for n in "ab"}
    ca_host.launch(holding("a", pairs["a"], links["a"], "svc"), name="a")
    ca_host.launch(holding("b", pairs["b"], links["b"]), name="b")

    assert host_answer(ca_host, pki, pairs["b"], links["a"].headers()) is Code.UNAUTHENTICATED
    assert host_answer(ca_host, pki, pki.plugins["kv"], links["a"].headers()) is Code.UNAUTHENTICATED
    assert host_answer(ca_host, pki, pairs["a"], links["a"].headers()) is None


def test_a_launched_plugins_certificate_admits_no_join_by_itself(ca_host, pki):
    own = tls.auto_key_pair()
    ca_host.launch(holding("p", own, HostLink()), name="p")
    config = tls.TLSConfig(key_pair=own, trust=tls.Trust(pinned=(pki.host.certificate,)))

    with pytest.raises(ConnectError) as refused, Client(ca_host.url, ClientConfig(tls=config, timeout=5)) as client:
        HandshakeServiceClient(client).handshake(hs.request_for(HANDSHAKE, (), self_id="p", self_version="1.0.0"))

    assert refused.value.code is Code.PERMISSION_DENIED  # it names no plugin, and no join token admits it


# --- a client speaking the other protocol than a PluginHost -------------------------------------


def test_a_plaintext_client_at_a_tls_host_is_told_to_use_https_and_the_host_keeps_serving(make_host, pki):
    host = make_host(http=HTTPConfig(threads=8, tls=tls.TLSConfig(key_pair=pki.host)))
    plugin = host.launch(provider_process("svc"), name="p")
    registry_url = host.url.replace("https://", "http://")

    with pytest.raises(ConnectError) as refused:
        with Client(registry_url, ClientConfig(timeout=10)) as client:
            ServiceRegistryClient(client).discover_service(registry_pb2.DiscoverServiceRequest(service_type="svc"))

    assert "HTTPS" in refused.value.message
    assert plugin.check_health() is ServingStatus.SERVING
    assert host.discover("svc").provider_id


def test_a_tls_client_at_a_plaintext_host_is_told_it_may_not_serve_tls_and_the_host_keeps_serving(make_host, pki):
    host = make_host()
    plugin = host.launch(provider_process("svc"), name="p")
    trusting = tls.TLSConfig(trust=tls.Trust(cas=(pki.ca.certificate,)))

    # The host waits for a request line the handshake never sends: the connect timeout ends it.
    with pytest.raises(ConnectError) as refused:
        put(host.url.replace("http://", "https://"), trusting, connect_timeout=0.3)

    assert refused.value.code is Code.UNAVAILABLE
    assert "plain HTTP" in refused.value.message, refused.value.message
    assert plugin.check_health() is ServingStatus.SERVING
    assert plugin.dispense("kv").get(kv_pb2.GetRequest(key="whoami")).found


# --- plaintext off loopback ---------------------------------------------------------------------


def non_loopback_address() -> str:
    """An IPv4 address of this machine's own interfaces other than loopback; the test only
    binds it (traffic, if any, stays on this machine)."""
    import fcntl
    import socket
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on it
            address = socket.inet_ntoa(packed[20:24])
            if not address.startswith("127."):
                return address
    pytest.skip("this machine has no non-loopback IPv4 address")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "example.internal"])
def test_plaintext_on_a_non_loopback_address_is_refused(kv, host):
    server = HTTPServer(App([kv]), HTTPConfig(host=host))

    with pytest.raises(PlaintextRefusedError) as refused:
        server.bind()

    assert refused.value.host == host
    server.close()


def test_plaintext_behind_a_tls_proxy_serves_and_warns_once(kv, caplog, monkeypatch):
    monkeypatch.setattr(httpserver, "_proxy_warned", threading.Event())
    address = non_loopback_address()
    config = HTTPConfig(host=address, behind_tls_proxy=True)

    with HTTPServer(App([kv]), config), HTTPServer(App([kv]), config):
        pass

    warnings = [r for r in caplog.records if "behind_tls_proxy" in r.getMessage()]
    assert len(warnings) == 1


def test_tls_on_a_non_loopback_address_needs_no_proxy_setting(kv, pki):
    address = non_loopback_address()
    config = HTTPConfig(host=address, tls=tls.TLSConfig(key_pair=pki.host))

    with HTTPServer(App([kv]), config) as server:
        assert server.url.startswith("https://")


def test_a_bearer_token_to_a_remote_plaintext_url_warns_once(caplog):
    headers = {"Authorization": "Bearer t"}
    url = "http://plugins.example:8080"  # the clients are built, never called

    Client(url, ClientConfig(headers=headers)).close()
    Client(url, ClientConfig(headers=headers)).close()
    Client("http://127.0.0.1:8080", ClientConfig(headers=headers)).close()

    warnings = [r for r in caplog.records if "bearer token" in r.getMessage()]
    assert len(warnings) == 1


# --- certificates as identity: self-registering plugins across machines (model B with a CA) ---


class WallClock:
    """The host's certificate clock, moved by the test."""

    def __init__(self) -> None:
        self.now = datetime.datetime.now(datetime.timezone.utc)

    def __call__(self) -> datetime.datetime:
        return self.now


@pytest.fixture
def wall_clock() -> WallClock:
    return WallClock()


@pytest.fixture
def cert_host(make_host, pki, wall_clock) -> PluginHost:
    """A host serving mTLS with the development CA that admits ``kv`` (providing ``svc``)
    and ``other`` (a caller only) by their certificates, and nobody else."""
    server_tls = tls.TLSConfig(key_pair=pki.host, trust=tls.Trust(cas=(pki.ca.certificate,)))
    return make_host(
        http=HTTPConfig(threads=8, max_streams=8, tls=server_tls),
        certificate_identities=[CertificateIdentity("kv", ["svc"]), CertificateIdentity("other")],
        dev_cookie_joins=False,
        wall_clock=wall_clock,
    )


@pytest.fixture
def join(pki) -> Iterator[Callable[..., PluginServer]]:
    """``join(host, self_id, provides=(), pair=None)``: a plugin on its own TLS server (the
    certificate of ``self_id`` by default, verifying the host against the CA) that joins
    ``host`` by its handshake, presenting that certificate."""
    servers: list[tuple[PluginServer, threading.Thread]] = []

    def make(
        host: PluginHost, self_id: str, provides: tuple[str, ...] = (), pair: tls.KeyPair | None = None
    ) -> PluginServer:
        own = tls.TLSConfig(key_pair=pair or pki.plugins[self_id], trust=tls.Trust(cas=(pki.ca.certificate,)))
        config = ServeConfig(
            self_id=self_id, self_version="1.0.0", host_url=host.url, provides=[declare(t) for t in provides],
            http=HTTPConfig(threads=4, tls=own),
        )
        server = PluginServer(PLUGINS, {"kv": Recorder(self_id)}, HANDSHAKE, config)
        url = server.listen()
        thread = threading.Thread(target=server.run, name=f"joiner:{self_id}")
        thread.start()
        servers.append((server, thread))
        server.link.connect(HANDSHAKE, self_id, "1.0.0", url)
        return server

    yield make
    for server, thread in servers:
        server.stop(grace=0)
        thread.join(timeout=10)


def host_api(host: PluginHost, pki: tls.DevPKI, pair: tls.KeyPair, credentials: dict[str, str]) -> Client:
    """A client of the host's API presenting ``pair`` and ``credentials``."""
    config = tls.TLSConfig(key_pair=pair, trust=tls.Trust(cas=(pki.ca.certificate,)))
    return Client(host.url, ClientConfig(tls=config, headers=credentials, timeout=5))


def discover(client: Client, service_type: str = "svc") -> registry_pb2.DiscoverServiceResponse:
    return ServiceRegistryClient(client).discover_service(registry_pb2.DiscoverServiceRequest(service_type=service_type))


def test_a_plugin_joins_with_its_certificate_alone_and_is_called_through_the_router(cert_host, join):
    provider = join(cert_host, "kv", provides=("svc",))
    caller = join(cert_host, "other")

    kv = caller.link.client("svc", KVServiceClient)
    kv.put(kv_pb2.PutRequest(key="k", value=b"over mTLS"))

    assert kv.get(kv_pb2.GetRequest(key="k")).value == b"over mTLS"
    assert kv.get(kv_pb2.GetRequest(key="whoami")).value == b"kv"
    assert cert_host.identities.get(provider.link.runtime_id).certificate == provider.config.http.tls.key_pair.fingerprint


def test_a_certificate_admits_only_the_service_types_listed_for_its_self_id(cert_host, join):
    with pytest.raises(ConnectError) as refused:
        join(cert_host, "other", provides=("svc",))

    assert refused.value.code is Code.PERMISSION_DENIED


def test_a_certificate_for_another_self_id_is_refused_at_the_handshake(cert_host, join, pki):
    with pytest.raises(ConnectError) as refused:
        join(cert_host, "kv", provides=("svc",), pair=pki.plugins["other"])

    assert refused.value.code is Code.PERMISSION_DENIED
    assert "'other'" in refused.value.message
    join(cert_host, "kv", provides=("svc",))  # the host keeps serving


def test_a_certificate_naming_an_unlisted_self_id_needs_a_join_token(cert_host, join, pki):
    stranger = tls.generate_key_pair(
        "stranger", issuer=pki.ca, dns_names=tls.LOOPBACK_NAMES, ip_addresses=tls.LOOPBACK_ADDRESSES,
        uris=[tls.plugin_uri("stranger")],
    )

    with pytest.raises(ConnectError) as refused:
        join(cert_host, "stranger", pair=stranger)

    assert refused.value.code is Code.UNAUTHENTICATED
    assert "certificate_identities" in refused.value.message


@pytest.mark.parametrize("thief", ["other", "kv"])
def test_a_runtime_token_fails_on_a_connection_with_another_certificate(cert_host, join, pki, thief):
    joined = {name: join(cert_host, name, provides=("svc",) if name == "kv" else ()) for name in ("kv", "other")}
    victim = "kv" if thief == "other" else "other"

    with host_api(cert_host, pki, pki.plugins[thief], joined[victim].link.headers()) as stolen:
        with pytest.raises(ConnectError) as refused:
            discover(stolen)

    assert refused.value.code is Code.UNAUTHENTICATED
    with host_api(cert_host, pki, pki.plugins[victim], joined[victim].link.headers()) as own:
        discover(own)


@pytest.mark.parametrize(
    "joined_with, revoked",
    [("the certificate", "as a certificate"), ("its ECDSA twin", "as a certificate"), ("its ECDSA twin", "by its fingerprint")],
)
def test_a_revoked_certificate_loses_its_identity_and_is_refused_at_the_next_handshake(
    cert_host, join, pki, joined_with, revoked
):
    original = pki.plugins["kv"]
    provider = join(cert_host, "kv", provides=("svc",), pair=original if joined_with == "the certificate" else ecdsa_twin(original))
    caller = join(cert_host, "other")
    cert_host.discover("svc")

    cert_host.revoke_certificate(original.certificate if revoked == "as a certificate" else original.fingerprint)

    with pytest.raises(ConnectError) as gone:
        cert_host.discover("svc")
    assert gone.value.code is Code.NOT_FOUND or gone.value.code is Code.UNAVAILABLE
    with pytest.raises(ConnectError) as unknown:
        provider.link.heartbeat()  # on the connection it kept open
    assert unknown.value.code is Code.UNAUTHENTICATED
    with pytest.raises(ConnectError) as handshake:
        provider.link.connect(HANDSHAKE, "kv", "1.0.0", "")
    assert handshake.value.code is Code.UNAVAILABLE  # the TLS handshake refuses the certificate
    if revoked == "as a certificate":
        assert "certificate revoked" in handshake.value.message
    caller.link.heartbeat()  # the host keeps serving others


def test_a_certificate_revoked_mid_session_fails_on_connections_already_open(cert_host, join, pki):
    provider = join(cert_host, "kv", provides=("svc",))
    provider.link.heartbeat()

    cert_host.revoked.add(pki.plugins["kv"].fingerprint)  # the list alone: the identity stays

    with pytest.raises(ConnectError) as refused:
        provider.link.heartbeat()
    assert refused.value.code is Code.UNAUTHENTICATED
    assert "revoked" in refused.value.message


def test_a_certificate_expiring_mid_session_fails_on_the_next_call(cert_host, join, pki, wall_clock):
    provider = join(cert_host, "kv", provides=("svc",))
    provider.link.heartbeat()

    wall_clock.now = pki.plugins["kv"].certificate.not_valid_after_utc + datetime.timedelta(seconds=1)

    with pytest.raises(ConnectError) as refused:
        provider.link.heartbeat()
    assert refused.value.code is Code.UNAUTHENTICATED
    assert "not valid now" in refused.value.message


@pytest.mark.parametrize("case", ["no client certificate", "client certificate from another CA", "expired client certificate"])
def test_a_joiner_refused_at_the_tls_handshake_gets_a_clear_error_and_the_host_keeps_serving(
    cert_host, join, pki, case
):
    config = refused_configs(pki)[case]

    with pytest.raises(ConnectError) as refused, Client(cert_host.url, ClientConfig(tls=config, timeout=5)) as client:
        HandshakeServiceClient(client).handshake(hs.request_for(HANDSHAKE, (), self_id="kv", self_version="1.0.0"))

    assert refused.value.code is Code.UNAVAILABLE
    join(cert_host, "kv", provides=("svc",))


def test_certificate_identities_need_a_tls_server_with_a_trust(pki):
    with pytest.raises(ValueError):
        HostConfig(certificate_identities=[CertificateIdentity("kv")])
    with pytest.raises(ValueError):
        HostConfig(http=HTTPConfig(tls=tls.TLSConfig(key_pair=pki.host)), certificate_identities=[CertificateIdentity("kv")])


def test_auto_mtls_certificates_outlive_any_launch(mtls_host):
    plugin = mtls_host.launch(provider_process("svc"), name="p")
    assert plugin.running is not None and plugin.running.tls is not None
    plugin_certificate = plugin.running.tls.trust.pinned[0]  # type: ignore[union-attr]
    host_certificate = plugin.running.tls.key_pair.certificate  # type: ignore[union-attr]
    in_five_years = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=5 * 365)

    assert plugin_certificate.not_valid_after_utc > in_five_years
    assert host_certificate.not_valid_after_utc > in_five_years


# --- lazy imports: plaintext never loads the TLS stack -----------------------------------------

PLAINTEXT_ONLY = """
import json, sys, threading
from connectplugin import HostConfig, HTTPConfig, PluginHost, PluginServer, ServeConfig
from samples.platform import HANDSHAKE
from tests.platform_plugins.provider import PLUGINS, Recorder, declare

with PluginHost(HANDSHAKE, PLUGINS, HostConfig(dev_cookie_joins=True)) as host:
    config = ServeConfig(self_id="svc", self_version="1.0.0", host_url=host.url, provides=[declare("svc")])
    plugin = PluginServer(PLUGINS, {"kv": Recorder("svc")}, HANDSHAKE, config)
    url = plugin.listen()
    serving = threading.Thread(target=plugin.run)
    serving.start()
    plugin.link.connect(HANDSHAKE, "svc", "1.0.0", url)
    host.discover("svc")
    plugin.stop(grace=0)
    serving.join()
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"cryptography", "OpenSSL", "cheroot"})
print(json.dumps(heavy))
"""


def test_a_plaintext_host_and_plugin_never_import_cryptography_openssl_or_cheroot():
    done = subprocess.run(
        [sys.executable, "-c", PLAINTEXT_ONLY], cwd=ROOT, env={**os.environ, **ENV},
        capture_output=True, text=True, timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


# --- what a certificate names (sec-review of certificates as identity) ------------------------


def _issued(pki: tls.DevPKI, common_name: str, uris: list[str]) -> tls.KeyPair:
    return tls.generate_key_pair(
        common_name, issuer=pki.ca, dns_names=tls.LOOPBACK_NAMES, ip_addresses=tls.LOOPBACK_ADDRESSES, uris=uris
    )


@pytest.mark.parametrize(
    "common_name, uris, self_id, code",
    [
        ("kv", [], "kv", Code.UNAUTHENTICATED),  # the CA issued it for something else: names no plugin
        ("kv", ["spiffe://corp/ns/web/sa/frontend"], "kv", Code.UNAUTHENTICATED),
        ("kv", ["CONNECTPLUGIN://Plugin/other"], "kv", Code.PERMISSION_DENIED),  # names other, in any case
        ("x", [tls.plugin_uri("other"), tls.plugin_uri("kv")], "kv", Code.PERMISSION_DENIED),
        ("x", [tls.plugin_uri("other"), tls.plugin_uri("kv")], "other", Code.PERMISSION_DENIED),
    ],
    ids=["common-name-only", "spiffe-uri", "scheme-in-upper-case", "two-ids-as-kv", "two-ids-as-other"],
)
def test_only_one_plugin_uri_names_a_certificates_self_id(cert_host, join, pki, common_name, uris, self_id, code):
    with pytest.raises(ConnectError) as refused:
        join(cert_host, self_id, pair=_issued(pki, common_name, uris))

    assert refused.value.code is code


def test_a_plugin_uri_is_read_in_any_case_and_a_common_name_never():
    pki = tls.make_dev_pki([])
    assert tls.certificate_ids(_issued(pki, "kv", ["CONNECTPLUGIN://PLUGIN/other"]).certificate) == ["other"]
    assert tls.certificate_ids(_issued(pki, "kv", []).certificate) == []


def test_the_router_refuses_another_plugin_serving_at_a_providers_address(cert_host, join, pki, tmp_path):
    provider = join(cert_host, "kv", provides=("svc",))
    caller = join(cert_host, "other")
    (registered,) = [p for p in cert_host.registry.providers() if p.service_type == "svc"]
    port = int(registered.base_url.rsplit(":", 1)[1])
    provider._http.close(grace=0)
    wait_until(lambda: port_is_free(port), "kv's port to be free")
    # Another plugin of the same CA at kv's address: a bare TLS server with other's certificate.
    (tmp_path / "cert.pem").write_bytes(pki.plugins["other"].certificate_pem())
    (tmp_path / "key.pem").write_bytes(pki.plugins["other"].private_key_pem())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    received: list[bytes] = []
    with socket.create_server(("127.0.0.1", port)) as listener:
        listener.settimeout(10)

        def impostor() -> None:
            with listener.accept()[0] as raw:
                raw.settimeout(10)
                try:
                    with context.wrap_socket(raw, server_side=True) as conn:
                        received.append(conn.recv(65536))
                except OSError:
                    pass  # the router hung up once it saw the certificate

        thread = threading.Thread(target=impostor, name="impostor")
        thread.start()
        with pytest.raises(ConnectError) as refused:
            caller.link.client("svc", KVServiceClient).get(kv_pb2.GetRequest(key="k"))
        thread.join(15)

    assert refused.value.code is Code.UNAVAILABLE
    assert not any(received)  # neither the call nor kv's host secret went to the impostor


def test_a_client_resuming_its_tls_session_gets_a_full_handshake_and_its_certificate_checked_again(cert_host, join, pki):
    join(cert_host, "kv", provides=("svc",))
    own = tls.TLSConfig(key_pair=pki.plugins["kv"], trust=tls.Trust(cas=(pki.ca.certificate,)))
    context = tls.client_context(own)
    host, port = cert_host.url.split("://")[1].rsplit(":", 1)

    def ask(session=None):
        raw = socket.create_connection((host, int(port)), timeout=5)
        with context.wrap_socket(raw, server_hostname=host, session=session) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            return sock.recv(65536), sock.session, sock.session_reused

    answer, session, _ = ask()
    # A client offering its last session (as Go's and curl's do) is answered, not failed with
    # an internal-error alert, after a full handshake: no revoked certificate is ever resumed.
    again, _, reused = ask(session)
    assert (answer[:9], again[:9], reused) == (b"HTTP/1.1 ", b"HTTP/1.1 ", False)
    cert_host.revoke_certificate(pki.plugins["kv"].certificate)

    with pytest.raises(OSError):  # the TLS server refuses it (its alert, or its end of the connection)
        ask(session)


def test_cheroots_own_messages_go_to_our_logger_and_a_client_hanging_up_is_only_debug(
    mtls_server, capfd, caplog
):
    # cheroot writes its messages straight to stderr; its pyOpenSSL writer reports a client
    # that hung up mid-answer as an unrecognised "socket.error" (seen as stray suite output).
    cheroot = mtls_server._server
    with caplog.at_level(logging.DEBUG, logger="connectplugin.httpserver"):
        cheroot.error_log("socket.error \"(32, 'EPIPE')\"", level=logging.WARNING, traceback=True)
        cheroot.error_log("Error in HTTPServer.serve", level=logging.ERROR)

    assert capfd.readouterr().err == ""
    levels = {r.getMessage(): r.levelno for r in caplog.records if r.name == "connectplugin.httpserver"}
    assert levels == {"socket.error \"(32, 'EPIPE')\"": logging.DEBUG, "Error in HTTPServer.serve": logging.ERROR}
