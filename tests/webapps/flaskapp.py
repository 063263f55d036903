"""A Flask application using the sample KV plugin through ``ConnectPlugin``.

``WEBAPP_HOST_URL`` set: the host's endpoints are served inside the app at that URL.
"""

from __future__ import annotations

import os

from flask import Flask, request

from connectplugin import ProcessStrategy
from connectplugin.contrib.flask import ConnectPlugin
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.plugin import HANDSHAKE, PLUGINS
from tests.webapps import KV_COMMAND, KV_ENV

app = Flask(__name__)
app.config.update(
    CONNECTPLUGIN_HANDSHAKE=HANDSHAKE,
    CONNECTPLUGIN_PLUGINS=PLUGINS,
    CONNECTPLUGIN_LAUNCH={"kv": ProcessStrategy(KV_COMMAND, env=KV_ENV)},
    CONNECTPLUGIN_URL=os.environ.get("WEBAPP_HOST_URL", ""),
)
plugins = ConnectPlugin(app)


@app.post("/kv/<key>")
def put(key: str) -> str:
    plugins.dispense("kv").put(kv_pb2.PutRequest(key=key, value=request.get_data()))
    return ""


@app.get("/kv/<key>")
def get(key: str) -> bytes:
    return plugins.dispense("kv").get(kv_pb2.GetRequest(key=key)).value


@app.get("/pids")
def pids() -> dict:
    launched = ConnectPlugin.plugins().launched()
    host = plugins.host() if launched else None
    reported = [host.reported_health(host.runtime_id(c)) for c in launched.values()] if host else []
    return {
        "pid": os.getpid(),
        "plugins": [c.running.pid for c in launched.values() if c.running],
        "host_url": host.url if host else "",
        "reported": [r.state.name if r else None for r in reported],
    }
