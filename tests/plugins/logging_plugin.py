"""A KV plugin whose calls log and fail, for the tests of what the host's log shows.

- ``Get`` of ``raise/<text>`` raises ``RuntimeError(text)``: an unexpected exception.
- ``Put`` of ``log/<level>`` logs its value at that level (logger ``kvtest``).
- ``Put`` of ``print/<anything>`` writes its value on stderr as a plain line.

With ``--own-logging`` the program configures logging itself first, as many do.
"""

import logging
import sys

from instrumented import HANDSHAKE, PLUGINS, InstrumentedStore

from connectplugin import Health, serve
from samples.kv.gen.kv.v1 import kv_pb2

log = logging.getLogger("kvtest")


class LoggingStore(InstrumentedStore):
    def get(self, request, ctx):
        if request.key.startswith("raise/"):
            raise RuntimeError(request.key.removeprefix("raise/"))
        return super().get(request, ctx)

    def put(self, request, ctx):
        if request.key.startswith("log/"):
            log.log(logging.getLevelName(request.key.removeprefix("log/").upper()), "%s", request.value.decode())
        elif request.key.startswith("print/"):
            print(request.value.decode(), file=sys.stderr, flush=True)
        return kv_pb2.PutResponse()


if __name__ == "__main__":
    if "--own-logging" in sys.argv:
        logging.basicConfig(level=logging.DEBUG, format="[%(levelname)s] %(name)s: %(message)s")
    health = Health()
    serve(PLUGINS, {"kv": LoggingStore(health)}, handshake=HANDSHAKE, health=health)
