"""The sample KV store with hooks the runtime tests drive through ordinary calls.

Not a plugin by itself: the scripts beside it serve it. Scripts run with this directory
first on ``sys.path`` and the repository root on ``PYTHONPATH`` (the tests set it).

- ``Get`` of ``sleep/<seconds>`` prints ``sleeping <seconds>`` on stdout, sleeps, then
  answers ``slept``: an in-flight call a shutdown must let finish.
- ``Put`` of ``health`` sets the plugin's health to the state named by the value
  (``HEALTHY``, ``DEGRADED`` or ``UNHEALTHY``) with reason ``set by test``.
"""

from __future__ import annotations

import sys
import time

from connectplugin import Context, Health, HealthState
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.plugin import HANDSHAKE, PLUGINS
from samples.kv.store import KVStore

__all__ = ["HANDSHAKE", "PLUGINS", "InstrumentedStore"]


class InstrumentedStore(KVStore):
    def __init__(self, health: Health) -> None:
        super().__init__()
        self.health = health

    def get(self, request: kv_pb2.GetRequest, ctx: Context) -> kv_pb2.GetResponse:
        if request.key.startswith("sleep/"):
            seconds = float(request.key.removeprefix("sleep/"))
            print(f"sleeping {seconds:g}", flush=True)
            time.sleep(seconds)
            return kv_pb2.GetResponse(value=b"slept", found=True)
        return super().get(request, ctx)

    def put(self, request: kv_pb2.PutRequest, ctx: Context) -> kv_pb2.PutResponse:
        if request.key == "health":
            self.health.set(HealthState[request.value.decode()], reason="set by test")
            print(f"health set to {request.value.decode()}", file=sys.stderr, flush=True)
        return super().put(request, ctx)
