"""The sample KV store.

Launched by a host, it is a plugin (``serve()``). Run by hand with ``--port`` and
``--insecure`` it serves ``kv.v1.KVService`` on its own, to anyone, for manual checks with
any Connect client: ``python -m samples.kv --port 8080 --insecure``. There is no host to
vouch for callers then, so the opt-out must be explicit, and it logs a warning.
"""

from __future__ import annotations

import argparse
import logging

from connectplugin import HTTPConfig, PluginServer, ServeConfig
from samples.kv import plugin
from samples.kv.store import KVStore


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m samples.kv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="serve standalone on this port (0 picks a free one)")
    parser.add_argument("--insecure", action="store_true",
                        help="with --port: serve every caller with no authentication (development only)")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    if args.port is None:
        plugin.main()
        return
    if not args.insecure:
        parser.error("--port serves with no host to authenticate callers; add --insecure to accept that")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = ServeConfig(
        http=HTTPConfig(host=args.host, port=args.port, threads=args.threads),
        self_id="kv-store",
        allow_unauthenticated=True,
    )
    server = PluginServer(plugin.PLUGINS, {"kv": KVStore()}, plugin.HANDSHAKE, config)
    print(f"kv.v1.KVService listening on {server.listen()}", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        server.stop(grace=0, reason="interrupted")


if __name__ == "__main__":
    main()
