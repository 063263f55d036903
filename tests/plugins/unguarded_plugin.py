"""A plugin script without ``if __name__ == "__main__":``: importing it serves (or tries to)."""

from connectplugin import serve
from samples.kv.plugin import HANDSHAKE, PLUGINS
from samples.kv.store import KVStore


class Store(KVStore):
    pass


serve(PLUGINS, {"kv": Store()}, handshake=HANDSHAKE)
