"""The sample KV store.

Launched by a host, it is a plugin (``serve()``). Run by hand with ``--port`` it serves
``kv.v1.KVService`` on its own, for manual checks with any Connect client:
``python -m samples.kv --port 8080``.
"""

from __future__ import annotations

import argparse
import logging

from connectplugin import App, HTTPConfig, HTTPServer
from samples.kv import plugin
from samples.kv.store import KVStore


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m samples.kv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="serve standalone on this port (0 picks a free one)")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    if args.port is None:
        plugin.main()
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = HTTPServer(App([KVStore()]), HTTPConfig(host=args.host, port=args.port, threads=args.threads))
    print(f"kv.v1.KVService listening on {server.bind()}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()
