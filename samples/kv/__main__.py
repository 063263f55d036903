"""Serve the sample KV store on its own: ``python -m samples.kv --port PORT``."""

from __future__ import annotations

import argparse
import logging

from connectplugin import App, HTTPConfig, HTTPServer
from samples.kv.store import KVStore


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m samples.kv", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = HTTPServer(App([KVStore()]), HTTPConfig(host=args.host, port=args.port, threads=args.threads))
    print(f"kv.v1.KVService listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()
