"""A WSGI app that starts its host and plugin at import, as people hand-embed them.

Under ``gunicorn --preload`` the master imports it and the workers inherit the host: the
workers must leave the master's plugin alone, and are refused its use.
"""

from __future__ import annotations

import json
import os

from connectplugin import ForkedProcessError, PluginHost, ProcessStrategy
from connectplugin.contrib import EMBEDDED_HOST
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.plugin import HANDSHAKE, PLUGINS
from tests.webapps import KV_COMMAND, KV_ENV

host = PluginHost(HANDSHAKE, PLUGINS, EMBEDDED_HOST).start()
plugin = host.launch(ProcessStrategy(KV_COMMAND, env=KV_ENV), "kv")


def app(environ, start_response):
    if environ["PATH_INFO"] == "/pids":
        body = {"pid": os.getpid(), "plugins": [plugin.running.pid], "host_url": host.url}
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(body).encode()]
    try:
        value = plugin.dispense("kv").get(kv_pb2.GetRequest(key="a")).value
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return [value]
    except ForkedProcessError as e:
        start_response("409 Conflict", [("Content-Type", "text/plain")])
        return [f"{e.owner_pid} {e.pid}".encode()]
