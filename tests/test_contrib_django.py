"""The Django app under real servers: gunicorn (2 workers, with and without --preload),
waitress with the host included in urls.py or wrapped around the WSGI application,
runserver's autoreloader, and management commands that must launch nothing."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import pytest
import requests

from connectplugin import Client, ClientConfig, Code, ConnectError
from connectplugin.gen.connectplugin.v1 import lifecycle_pb2, registry_pb2
from connectplugin.gen.connectplugin.v1.lifecycle_connect import PluginLifecycleClient
from connectplugin.gen.connectplugin.v1.registry_connect import ServiceRegistryClient
from connectplugin.rpc._transport import WSGIAdapter
from tests.helpers import ROOT, free_port, wait_until
from tests.webapps import GUNICORN, KV_ENV, descendants, is_kv_plugin, running

SETTINGS = "tests.webapps.djangoproject.settings"
DJANGO = [sys.executable, "-m", "django"]
WSGI = "tests.webapps.djangoproject.wsgi:application"
ENV = {"DJANGO_SETTINGS_MODULE": SETTINGS}


def manage(tmp_path, *args: str, launch_log: str = "") -> subprocess.CompletedProcess[str]:
    """``manage.py args`` in a subprocess, its plugins noting their launches in ``launch_log``."""
    env = {
        **os.environ,
        **KV_ENV,
        **ENV,
        "WEBAPP_DB": str(tmp_path / "db.sqlite3"),
        "WEBAPP_LAUNCH_LOG": launch_log,
    }
    return subprocess.run(
        [*DJANGO, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


# --- gunicorn ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preload", [False, True], ids=["forked-then-imported", "preload"])
def test_gunicorn_workers_each_launch_one_plugin_on_first_use_and_stop_it_within_5_s(
    webserver, preload
):
    server = webserver([*GUNICORN, *(["--preload"] if preload else []), WSGI], env=ENV)

    launched = server.one_plugin_per_worker()
    server.stop(signal.SIGTERM)
    assert not [pid for pid in launched if running(pid)]


# --- waitress, the host's endpoints inside the project ----------------------------------------


@pytest.mark.parametrize("mount", ["urls", "wsgi"])
def test_waitress_serves_the_hosts_endpoints_on_the_projects_own_port(webserver, mount):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = webserver(
        [sys.executable, "-m", "waitress", "--listen=127.0.0.1:{port}", WSGI],
        env={**ENV, "WEBAPP_MOUNT": mount, "WEBAPP_HOST_URL": url + "/_plugins"},
        port=port,
    )

    answer = server.use_mounted_host("/_plugins")  # through Django's middleware (CSRF) too

    assert server.listening_ports() == {port}  # the host has no server of its own
    [plugin] = answer["plugins"]
    server.stop(signal.SIGTERM)  # waitress exits at once; the plugin sees its stdin close
    wait_until(lambda: not running(plugin), "the plugin to exit after its host", 5.0)


# --- runserver and management commands --------------------------------------------------------


def test_runserver_launches_once_in_the_serving_process_and_stops_on_ctrl_c(webserver):
    server = webserver([*DJANGO, "runserver", "127.0.0.1:{port}"], env=ENV)

    server.put("a", b"1")
    answer = server.pids()

    assert server.get("a") == b"1"
    assert answer["pid"] != server.proc.pid  # served by the autoreloader's child
    assert server.launches() == answer["plugins"] and len(answer["plugins"]) == 1
    server.stop(signal.SIGINT, group=True)
    assert not running(answer["plugins"][0])


@pytest.mark.parametrize(
    "command",
    [["check"], ["migrate", "--no-input"], ["shell", "-c", "print('ok')"]],
    ids=lambda c: c[0],
)
def test_management_commands_launch_no_plugin(tmp_path, command):
    launches = tmp_path / "launches"
    launches.touch()

    done = manage(tmp_path, *command, launch_log=str(launches))

    assert done.returncode == 0, done.stderr
    assert launches.read_text() == ""


# --- manage.py plugins (in this process: the command's own work needs no server) ------------


@pytest.fixture(scope="module")
def django_project():
    """The test project's settings loaded in this process, for ``call_command``."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", SETTINGS)
    import django

    django.setup()


def plugins_command(*args: str) -> str:
    from django.core.management import call_command

    out = io.StringIO()
    call_command("plugins", *args, stdout=out)
    return out.getvalue()


def kv_plugins_running() -> set[int]:
    return {pid for pid in descendants(os.getpid()) if is_kv_plugin(pid)}


def test_plugins_list_names_each_plugin_its_service_and_command(django_project):
    name, service, command = plugins_command("list").strip().split("\t")

    assert (name, service) == ("kv", "kv.v1.KVService") and command.endswith("-m tests.webapps.kv")


def test_plugins_health_and_call_launch_the_plugin_then_stop_it(django_project):
    health = plugins_command("health")
    assert not kv_plugins_running()
    call = plugins_command("call", "kv", "Get", '{"key": "nothing"}')

    assert health.split() == ["kv", "SERVING", "HEALTHY"]
    assert json.loads(call) == {}  # not found: every field at its default
    assert not kv_plugins_running()


@pytest.mark.parametrize(
    "args",
    [
        ["kv", "Fetch", "{}"],
        ["kv", "Get", "{not json"],
        ["kv", "Get", '{"nokey": 1}'],
        ["nope", "Get"],
    ],
    ids=["unknown-method", "bad-json", "unknown-field", "unknown-plugin"],
)
def test_plugins_call_refuses_a_bad_call_with_a_command_error_before_launching(
    django_project, args
):
    from django.core.management import CommandError

    with pytest.raises(CommandError):
        plugins_command("call", *args)
    assert not kv_plugins_running()


# --- the host's endpoints through Django's own stack (in this process) -----------------------


@pytest.fixture
def through_django(django_project):
    """A Connect client whose calls go through the project's WSGI application, middleware and
    ``urls.py`` include, to this process's host (a requests adapter instead of a socket)."""
    from django.core.wsgi import get_wsgi_application

    from connectplugin.contrib import django as connectplugin

    session = requests.Session()
    session.mount("http://127.0.0.1", WSGIAdapter(get_wsgi_application()))
    clients: list[Client] = []

    def make(headers: dict[str, str] | None = None) -> Client:
        client = Client(
            "http://127.0.0.1/_plugins",
            ClientConfig(timeout=5, headers=headers or {}),
            session=session,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
    connectplugin.plugins().close()


def test_a_call_without_credentials_gets_the_hosts_connect_error_not_a_csrf_page(through_django):
    lifecycle = PluginLifecycleClient(through_django())

    with pytest.raises(ConnectError) as refused:
        lifecycle.report_health(lifecycle_pb2.ReportHealthRequest())

    # The host's own answer to a call without a runtime id (Go's code for it).
    assert refused.value.code is Code.INVALID_ARGUMENT
    assert "X-Plugin-Runtime-ID" in refused.value.message


def test_a_server_stream_passes_through_the_include_message_by_message(through_django):
    from connectplugin.contrib import django as connectplugin

    caller = connectplugin.host().identities.issue("test-caller", "1.0.0")
    credentials = {
        "X-Plugin-Runtime-ID": caller.runtime_id,
        "Authorization": f"Bearer {caller.token}",
    }
    registry = ServiceRegistryClient(through_django(credentials))

    stream = registry.watch_service(registry_pb2.WatchServiceRequest(service_type="kv"))
    try:
        first = next(iter(stream))  # the current state, while the stream stays open
    finally:
        stream.close()

    assert first.service_type == "kv"
