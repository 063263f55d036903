"""A KV provider for the platform tests: launched by a host, or joining one by itself.

``python -m tests.platform_plugins.provider --type T [--version V] [--host-url URL] [--port P]
[--listen ADDR] [--pki DIR]`` serves the sample KV store as service type ``T``. With
``--host-url`` it joins that host on its own (self-registering); without, a host must launch
it. With ``--pki`` it serves TLS with ``DIR/T.pem`` (and presents it to the host), trusting
``DIR/ca.pem``. Test hooks, all
reached through ordinary ``Get`` calls:

- ``Get("headers")`` answers the request headers the handler saw, as a JSON object.
- ``Get("whoami")`` answers the instance's label (its pid when run as a process).
- ``Get("crash")`` ends the process at once, in the middle of the call (exit status 3),
  after writing ``crashing as asked`` to stderr.
- ``Get("fail/<code>")`` fails with that Connect code (``fail/unavailable``).
- ``Get("sleep/<seconds>")`` answers after that long: a provider that hangs.
- ``Get("hold/<name>")`` answers only once its client has gone (``Context.is_active()``
  false); ``Get("held/<name>")`` says where that call is: ``holding``, ``released`` (it saw
  its client go) or ``unknown``.
- ``Get("watchers")`` answers how many Watch streams are open, as a decimal number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from connectplugin import (
    Code,
    ConnectError,
    Context,
    HTTPConfig,
    KeyPair,
    ServeConfig,
    ServiceDeclaration,
    TLSConfig,
    Trust,
    serve,
)
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KV_PLUGIN
from samples.kv.store import KVStore
from samples.platform import HANDSHAKE

PLUGINS = {"kv": KV_PLUGIN}


def declare(service_type: str, version: str = "1.0.0") -> ServiceDeclaration:
    """Providing ``service_type`` with the KV interface."""
    return ServiceDeclaration(service_type=service_type, version=version, path=KV_PLUGIN.service_path)


class Recorder(KVStore):
    """The sample store plus the hooks above."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label
        self.held: dict[str, str] = {}
        self._quiet = threading.Event()  # never set: what a held call waits on between looks

    def get(self, request: kv_pb2.GetRequest, ctx: Context) -> kv_pb2.GetResponse:
        if request.key == "headers":
            seen = {
                k: v if isinstance(v, str) else v.decode(errors="replace")
                for k, v in ctx.request_headers.items()
            }
            return kv_pb2.GetResponse(value=json.dumps(seen).encode(), found=True)
        if request.key == "whoami":
            return kv_pb2.GetResponse(value=self.label.encode(), found=True)
        if request.key == "crash":
            sys.stderr.write("crashing as asked\n")
            sys.stderr.flush()
            os._exit(3)
        if request.key.startswith("fail/"):
            raise ConnectError(Code(request.key.removeprefix("fail/")), "failing as asked")
        if request.key.startswith("hold/"):
            name = request.key.removeprefix("hold/")
            self.held[name] = "holding"
            while ctx.is_active():  # a handler can only ask: every 20 ms
                self._quiet.wait(0.02)
            self.held[name] = "released"
            return kv_pb2.GetResponse(value=b"released", found=True)
        if request.key.startswith("held/"):
            return kv_pb2.GetResponse(value=self.held.get(request.key.removeprefix("held/"), "unknown").encode())
        if request.key == "watchers":
            with self._lock:
                return kv_pb2.GetResponse(value=str(len(self._watchers)).encode(), found=True)
        if request.key.startswith("sleep/"):
            time.sleep(float(request.key.removeprefix("sleep/")))
            return kv_pb2.GetResponse(value=b"slept", found=True)
        return super().get(request, ctx)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.platform_plugins.provider", description=__doc__
    )
    parser.add_argument("--type", required=True, help="the service type to provide")
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--host-url", default="", help="join this host on its own")
    parser.add_argument("--port", type=int, default=0, help="listen on this port (0: any free one)")
    parser.add_argument("--listen", default="127.0.0.1", help="listen on this address")
    parser.add_argument("--pki", default="", help="serve TLS with TYPE.pem from this directory")
    args = parser.parse_args()
    tls = None
    if args.pki:
        pki = Path(args.pki)
        pair = KeyPair.from_files(pki / f"{args.type}.pem", pki / f"{args.type}-key.pem")
        tls = TLSConfig(key_pair=pair, trust=Trust.from_files(cas=pki / "ca.pem"))
    serve(
        PLUGINS,
        {"kv": Recorder(str(os.getpid()))},
        handshake=HANDSHAKE,
        config=ServeConfig(
            self_id=args.type,
            self_version=args.version,
            host_url=args.host_url,
            http=HTTPConfig(host=args.listen, port=args.port, tls=tls),
            grace_period=1.0,
            provides=[declare(args.type, args.version)],
        ),
    )


if __name__ == "__main__":
    main()
