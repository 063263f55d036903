"""A storage plugin that joins the host on its own (self-registering, like a container).

``python -m samples.platform.storage --host-url http://127.0.0.1:PORT`` provides ``storage``
(a KV store) and rejoins the host by itself if the host restarts.
"""

from __future__ import annotations

import argparse
import logging

from connectplugin import HTTPConfig, ServeConfig, ServiceDeclaration, serve
from samples.kv.gen.kv.v1.kv_connect import KV_PLUGIN
from samples.kv.store import KVStore
from samples.platform import HANDSHAKE


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m samples.platform.storage", description=__doc__)
    parser.add_argument("--host-url", required=True, help="the host to join")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    serve(
        {"storage": KV_PLUGIN},
        {"storage": KVStore()},
        handshake=HANDSHAKE,
        config=ServeConfig(
            http=HTTPConfig(port=args.port),
            host_url=args.host_url,
            self_id="storage",
            self_version="1.0.0",
            provides=[ServiceDeclaration(service_type="storage", version="1.0.0", path=KV_PLUGIN.service_path)],
        ),
    )


if __name__ == "__main__":
    main()
