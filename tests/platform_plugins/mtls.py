"""A host and a caller that speak mTLS with certificate identities, for the network-namespace test.

``python -m tests.platform_plugins.mtls host --listen ADDR --port P --pki DIR --admit ID[=TYPE,...]``
serves a host at ``https://ADDR:P`` with ``DIR/host.pem``, requiring client certificates
from ``DIR/ca.pem`` and admitting each ``--admit`` self id by its certificate (with the
service types after ``=``). It prints ``ready URL`` once serving and stops when stdin ends.

``python -m tests.platform_plugins.mtls call --host-url URL --pki DIR --self-id ID --type T``
joins the host with ``DIR/ID.pem``, waits until ``T`` can be discovered, makes routed unary
calls (``Put``, ``Get``, ``Get("whoami")``) and a routed stream (``Watch`` while it puts),
prints the results as one JSON line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from connectplugin import (
    CertificateIdentity,
    ConnectError,
    Health,
    HostConfig,
    HostLink,
    HTTPConfig,
    KeyPair,
    PluginHost,
    TLSConfig,
    Trust,
)
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KVServiceClient
from samples.platform import HANDSHAKE
from tests.helpers import wait_until
from tests.platform_plugins.provider import PLUGINS


def tls_config(pki: Path, name: str) -> TLSConfig:
    """``name``'s certificate from ``pki``, trusting the development CA there."""
    pair = KeyPair.from_files(pki / f"{name}.pem", pki / f"{name}-key.pem")
    return TLSConfig(key_pair=pair, trust=Trust.from_files(cas=pki / "ca.pem"))


def host(args: argparse.Namespace) -> None:
    admitted = []
    for spec in args.admit:
        self_id, _, types = spec.partition("=")
        admitted.append(CertificateIdentity(self_id, [t for t in types.split(",") if t]))
    config = HostConfig(
        http=HTTPConfig(host=args.listen, port=args.port, tls=tls_config(Path(args.pki), "host")),
        certificate_identities=admitted,
        heartbeat_timeout=args.heartbeat_timeout,
    )
    with PluginHost(HANDSHAKE, PLUGINS, config) as running:
        sys.stdout.write(f"ready {running.url}\n")
        sys.stdout.flush()
        while sys.stdin.readline():  # until the test closes our stdin
            pass


def call(args: argparse.Namespace) -> None:
    link = HostLink()
    link.attach(Health(), [], args.host_url, tls_config(Path(args.pki), args.self_id))

    def joined_and_found() -> bool:
        try:
            if not link.connected:
                link.connect(HANDSHAKE, args.self_id, "1.0.0", "")
            link.discover(args.type)
            return True
        except ConnectError:
            return False

    wait_until(joined_and_found, f"to join and discover {args.type}", timeout=args.timeout)
    kv = link.client(args.type, KVServiceClient, timeout=args.timeout)
    kv.put(kv_pb2.PutRequest(key="k", value=b"across namespaces"))
    value = kv.get(kv_pb2.GetRequest(key="k")).value
    whoami = kv.get(kv_pb2.GetRequest(key="whoami")).value
    stream = kv.watch(kv_pb2.WatchRequest(prefix="streamed/"))
    kv.put(kv_pb2.PutRequest(key="streamed/1", value=b"one"))
    event = next(iter(stream))
    stream.close()
    link.close()
    result = {"value": value.decode(), "whoami": whoami.decode(), "event": [event.key, event.value.decode()]}
    sys.stdout.write(json.dumps(result) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.platform_plugins.mtls", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serving = sub.add_parser("host")
    serving.add_argument("--listen", required=True)
    serving.add_argument("--port", type=int, default=0)
    serving.add_argument("--pki", required=True)
    serving.add_argument("--admit", action="append", default=[])
    serving.add_argument("--heartbeat-timeout", type=float, default=5.0)
    calling = sub.add_parser("call")
    calling.add_argument("--host-url", required=True)
    calling.add_argument("--pki", required=True)
    calling.add_argument("--self-id", required=True)
    calling.add_argument("--type", required=True)
    calling.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    host(args) if args.command == "host" else call(args)


if __name__ == "__main__":
    main()
