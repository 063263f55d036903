"""The Flask extension under real servers: gunicorn (2 workers, with and without --preload),
waitress with the host mounted inside the app, and ``flask run``'s reloader."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import pytest
import requests
from flask import Flask

from connectplugin import Call, ClientConfig, ProcessStrategy
from connectplugin.contrib import AppPluginsConfig
from connectplugin.contrib.flask import ConnectPlugin
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.plugin import HANDSHAKE, PLUGINS
from tests.helpers import ROOT, free_port, in_forked_child, wait_until
from tests.webapps import GUNICORN, KV_COMMAND, KV_ENV, running

FLASK_RUN = [
    sys.executable,
    "-m",
    "flask",
    "--app",
    "tests.webapps.flaskapp",
    "run",
    "--reload",
    "-p",
    "{port}",
]


# --- gunicorn ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preload", [False, True], ids=["forked-then-imported", "preload"])
def test_gunicorn_workers_each_launch_one_plugin_on_first_use_and_stop_it_within_5_s(
    webserver, preload
):
    server = webserver(
        [*GUNICORN, *(["--preload"] if preload else []), "tests.webapps.flaskapp:app"]
    )

    launched = server.one_plugin_per_worker()
    server.stop(signal.SIGTERM)
    assert not [pid for pid in launched if running(pid)]


def test_a_host_started_at_import_under_preload_is_left_to_the_master_and_refused_to_workers(
    webserver,
):
    server = webserver([*GUNICORN, "--preload", "tests.webapps.handmade:app"])
    [plugin] = server.pids()["plugins"]

    refused = requests.get(server.url + "/kv", timeout=10)

    owner, worker = map(int, refused.text.split())
    assert refused.status_code == 409 and owner == server.proc.pid and worker != owner
    assert server.plugin_processes() == {plugin}
    server.stop(signal.SIGTERM)  # the issue: 30 s, with every worker stopping the master's plugin
    assert not running(plugin)


# --- waitress, the host mounted inside the app ------------------------------------------------


def test_waitress_serves_the_mounted_host_on_the_apps_own_port(webserver):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = webserver(
        [
            sys.executable,
            "-m",
            "waitress",
            "--listen=127.0.0.1:{port}",
            "tests.webapps.flaskapp:app",
        ],
        env={"WEBAPP_HOST_URL": url + "/_plugins"},
        port=port,
    )

    answer = server.use_mounted_host("/_plugins")

    assert requests.get(url + "/elsewhere", timeout=5).status_code == 404  # the app's own 404
    assert server.listening_ports() == {port}  # the host has no server of its own
    [plugin] = answer["plugins"]
    server.stop(signal.SIGTERM)  # waitress exits at once; the plugin sees its stdin close
    wait_until(lambda: not running(plugin), "the plugin to exit after its host", 5.0)


# --- the reloader -----------------------------------------------------------------------------


def test_flask_run_with_the_reloader_launches_once_in_the_serving_process_and_stops_on_ctrl_c(
    webserver,
):
    server = webserver(FLASK_RUN)

    server.put("a", b"1")
    answer = server.pids()

    assert server.get("a") == b"1"
    assert answer["pid"] != server.proc.pid  # served by the reloader's child, not its watcher
    assert server.launches() == answer["plugins"] and len(answer["plugins"]) == 1
    assert server.plugin_processes() == set(answer["plugins"])
    server.stop(signal.SIGINT, group=True)
    assert not running(answer["plugins"][0])


def test_a_reload_stops_the_old_serving_processs_plugin_and_the_new_one_launches_its_own(webserver):
    server = webserver(FLASK_RUN)
    server.put("a", b"1")
    [old] = server.pids()["plugins"]

    os.utime(ROOT / "tests" / "webapps" / "flaskapp.py")  # what saving the file does
    wait_until(lambda: not running(old), "the reloaded process's plugin to stop", 10.0)
    fresh = wait_until(
        lambda: _answer_from_a_new_process(server, old), "a new serving process", 10.0
    )
    server.put("b", b"2")

    [new] = server.pids()["plugins"]
    assert fresh["plugins"] == [] and new != old
    assert server.plugin_processes() == {new} and server.launches() == [old, new]
    server.stop(signal.SIGINT, group=True)
    assert not running(new)


def _answer_from_a_new_process(server, old_plugin: int) -> dict | None:
    try:
        answer = server.pids()
    except requests.ConnectionError:
        return None
    return answer if old_plugin not in answer["plugins"] else None


# --- the extension itself ---------------------------------------------------------------------


def test_init_app_starts_nothing_and_reads_its_settings_from_app_config():
    app = Flask(__name__)
    app.config.update(
        CONNECTPLUGIN_HANDSHAKE="samples.kv.plugin:HANDSHAKE",
        CONNECTPLUGIN_PLUGINS=PLUGINS,
        CONNECTPLUGIN_LAUNCH={"kv": KV_COMMAND},
        CONNECTPLUGIN_URL="http://127.0.0.1:8000/_plugins/",
    )
    extension = ConnectPlugin()
    extension.init_app(app)

    plugins = ConnectPlugin.plugins(app)
    assert plugins.config.handshake is HANDSHAKE
    assert plugins.config.launch == {"kv": ProcessStrategy(KV_COMMAND)}
    assert plugins.config.mount_path == "/_plugins"
    assert plugins.launched() == {}


@pytest.mark.parametrize(
    "settings",
    [
        {"plugins": PLUGINS},
        {"handshake": HANDSHAKE, "plugins": PLUGINS, "launch": {"other": KV_COMMAND}},
        {"handshake": HANDSHAKE, "plugins": PLUGINS, "launch": {"kv": "python -m samples.kv"}},
        {"handshake": HANDSHAKE, "plugins": PLUGINS, "url": "http://127.0.0.1:8000"},
        {"handshake": HANDSHAKE, "plugins": PLUGINS, "launchh": {}},
    ],
    ids=["no-handshake", "unknown-plugin", "command-as-string", "url-without-path", "typo"],
)
def test_bad_settings_are_refused_when_the_app_is_set_up(settings):
    with pytest.raises((ValueError, TypeError)):
        AppPluginsConfig.from_settings(settings)


def test_a_child_forked_after_first_use_launches_its_own_plugin_and_leaves_the_parents_alone():
    app = Flask(__name__)
    app.config.update(
        CONNECTPLUGIN_HANDSHAKE=HANDSHAKE,
        CONNECTPLUGIN_PLUGINS=PLUGINS,
        CONNECTPLUGIN_LAUNCH={"kv": ProcessStrategy(KV_COMMAND, env=KV_ENV)},
    )
    plugins = ConnectPlugin(app).plugins(app)
    try:
        parent = plugins.client("kv")
        parent.dispense("kv").put(kv_pb2.PutRequest(key="a", value=b"parent"))

        def child() -> dict:
            try:
                mine = plugins.client("kv")
                value = mine.dispense("kv").get(kv_pb2.GetRequest(key="a")).value
                return {
                    "plugin": mine.running.pid,
                    "value": value.decode(),
                    "host": plugins.host().url,
                }
            finally:
                plugins.close()

        report = in_forked_child(child)

        assert report["plugin"] != parent.running.pid and report["value"] == ""
        assert report["host"] != plugins.host().url and not running(report["plugin"])
        assert parent.dispense("kv").get(kv_pb2.GetRequest(key="a")).value == b"parent"
    finally:
        plugins.close()


def test_dispense_passes_a_client_config_and_interceptors_through():
    app = Flask(__name__)
    app.config.update(
        CONNECTPLUGIN_HANDSHAKE=HANDSHAKE,
        CONNECTPLUGIN_PLUGINS=PLUGINS,
        CONNECTPLUGIN_LAUNCH={"kv": ProcessStrategy(KV_COMMAND, env=KV_ENV)},
    )
    extension = ConnectPlugin(app)
    timeouts: list[float | None] = []

    def record(call: Call, proceed: Callable[[Call], Any]) -> Any:
        timeouts.append(call.timeout)
        return proceed(call)

    try:
        with app.app_context():
            kv = extension.dispense("kv", config=ClientConfig(timeout=2.5), interceptors=[record])
            kv.put(kv_pb2.PutRequest(key="a", value=b"v"))
    finally:
        extension.plugins(app).close()

    assert timeouts == [2.5]
