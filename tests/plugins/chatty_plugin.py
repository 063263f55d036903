"""A KV plugin that talks on stdout and stderr before it serves."""

import sys

from instrumented import HANDSHAKE, PLUGINS, InstrumentedStore

from connectplugin import Health, serve

if __name__ == "__main__":
    print("chatty: hello on stdout", flush=True)
    print("chatty: hello on stderr", file=sys.stderr, flush=True)
    health = Health()
    serve(PLUGINS, {"kv": InstrumentedStore(health)}, handshake=HANDSHAKE, health=health)
