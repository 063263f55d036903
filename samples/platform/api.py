"""An API plugin in front of ``storage``: validates keys, then stores through the host's router.

Self-registering like storage: ``python -m samples.platform.api --host-url URL``. It
provides ``api`` (the KV interface) and keeps nothing itself.
"""

from __future__ import annotations

import argparse
import logging

from connectplugin import (
    Code,
    ConnectError,
    Context,
    HostLink,
    HTTPConfig,
    Requirement,
    ServeConfig,
    ServiceDeclaration,
    serve,
)
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KV_PLUGIN, KVServiceClient, KVServiceHandler
from samples.platform import HANDSHAKE


class Api(KVServiceHandler):
    """Keys must look like ``<collection>/<id>``; storage does the rest."""

    def __init__(self, link: HostLink) -> None:
        self.link = link

    def _storage(self) -> KVServiceClient:
        return self.link.client("storage", KVServiceClient, timeout=5)

    def get(self, request: kv_pb2.GetRequest, ctx: Context) -> kv_pb2.GetResponse:
        _check(request.key)
        return self._storage().get(request)

    def put(self, request: kv_pb2.PutRequest, ctx: Context) -> kv_pb2.PutResponse:
        _check(request.key)
        return self._storage().put(request)

    def delete(self, request: kv_pb2.DeleteRequest, ctx: Context) -> kv_pb2.DeleteResponse:
        _check(request.key)
        return self._storage().delete(request)


def _check(key: str) -> None:
    collection, _, item = key.partition("/")
    if not collection or not item:
        raise ConnectError(Code.INVALID_ARGUMENT, f"key {key!r} must look like <collection>/<id>")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m samples.platform.api", description=__doc__)
    parser.add_argument("--host-url", required=True, help="the host to join")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    link = HostLink()
    serve(
        {"api": KV_PLUGIN},
        {"api": Api(link)},
        handshake=HANDSHAKE,
        link=link,
        config=ServeConfig(
            http=HTTPConfig(port=args.port),
            host_url=args.host_url,
            self_id="api",
            self_version="1.0.0",
            provides=[ServiceDeclaration(service_type="api", version="1.0.0", path=KV_PLUGIN.service_path)],
            requires=[Requirement(service_type="storage", min_version="1.0.0", required_for_startup=True)],
        ),
    )


if __name__ == "__main__":
    main()
