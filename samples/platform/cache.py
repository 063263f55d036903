"""A cache plugin: provides ``cache`` (a KV store) and logs every write through the ``logger`` service.

The logger is another plugin, reached only through the host (registry + router).
"""

from __future__ import annotations

import logging

from connectplugin import Context, HostLink, Requirement, ServeConfig, ServiceDeclaration, serve
from connectplugin.gen.capability.logger.v1 import logger_pb2
from connectplugin.gen.capability.logger.v1.logger_connect import LoggerClient
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KV_PLUGIN
from samples.kv.store import KVStore
from samples.platform import HANDSHAKE


class Cache(KVStore):
    """A KV store that tells the logger plugin about each write."""

    def __init__(self, link: HostLink) -> None:
        super().__init__()
        self.link = link

    def put(self, request: kv_pb2.PutRequest, ctx: Context) -> kv_pb2.PutResponse:
        response = super().put(request, ctx)
        logger = self.link.client("logger", LoggerClient, timeout=5)
        logger.log(logger_pb2.LogRequest(level="info", message="cache put", fields={"key": request.key}))
        return response


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    link = HostLink()
    config = ServeConfig(
        self_id="cache",
        self_version="1.0.0",
        provides=[ServiceDeclaration(service_type="cache", version="1.0.0", path=KV_PLUGIN.service_path)],
        requires=[Requirement(service_type="logger", min_version="1.0.0", required_for_startup=True)],
    )
    serve({"cache": KV_PLUGIN}, {"cache": Cache(link)}, handshake=HANDSHAKE, config=config, link=link)


if __name__ == "__main__":
    main()
