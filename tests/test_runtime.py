"""The plugin runtime end to end: real plugin processes, real sockets, real signals.

A host (``PluginHost``) launches the scripts in ``tests/plugins/`` with the interpreter
running the tests and talks to them over HTTP. Nothing is mocked: a crash is a SIGKILL, a
shutdown is a Shutdown call or a SIGTERM, and "the process is gone" is checked in /proc.
The scripts serve the sample KV store with two test hooks (see ``tests/plugins/instrumented.py``):
``Get("sleep/<s>")`` sleeps in the handler and ``Put("health", <STATE>)`` sets the plugin's health.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from werkzeug.test import EnvironBuilder

from connectplugin import (
    App,
    Call,
    Client,
    ClientConfig,
    Code,
    ConnectError,
    Health,
    HealthState,
    HostConfig,
    HostLink,
    HTTPConfig,
    InProcessStrategy,
    LaunchContext,
    LaunchError,
    LaunchFailure,
    NotLaunchedError,
    PluginClient,
    PluginClientConfig,
    PluginHost,
    PluginNotServedError,
    PluginServer,
    ProcessStrategy,
    ServeConfig,
    ServingStatus,
)
from connectplugin.gen.connectplugin.v1 import handshake_pb2, lifecycle_pb2
from connectplugin.gen.connectplugin.v1.handshake_connect import HandshakeServiceClient
from connectplugin.gen.connectplugin.v1.lifecycle_connect import (
    PluginControlClient,
    PluginLifecycleClient,
)
from connectplugin.runtime import handshake as hs
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KV_PLUGIN, KVServiceClient
from samples.kv.plugin import HANDSHAKE, PLUGINS
from samples.kv.store import KVStore
from tests.helpers import free_port, host_secret, port_is_free, wait_until
from tests.plugins.instrumented import InstrumentedStore
from tests.services import envelope, split_envelopes

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "plugins"
ENV = {"PYTHONPATH": str(ROOT)}
"""What every plugin script needs beyond the host's passed-through variables."""

SERVING, NOT_SERVING = ServingStatus.SERVING, ServingStatus.NOT_SERVING
HEALTHY, DEGRADED, UNHEALTHY = HealthState.HEALTHY, HealthState.DEGRADED, HealthState.UNHEALTHY

T = TypeVar("T")


# --- helpers --------------------------------------------------------------------------------


def script(name: str, **options: Any) -> ProcessStrategy:
    """Launch ``tests/plugins/<name>`` with this interpreter."""
    return ProcessStrategy([sys.executable, str(SCRIPTS / name)], env=ENV, **options)


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for its parent counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def next_within(stream: Iterator[T], timeout: float = 5.0) -> T:
    """``next(stream)``, failing the test (instead of hanging it) after ``timeout`` seconds."""
    result: list[Any] = []

    def read() -> None:
        try:
            result.append(("ok", next(stream)))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            result.append(("error", e))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not result:
        pytest.fail(f"no message within {timeout} s")
    kind, value = result[0]
    if kind == "error":
        raise value
    return value


def open_watch(kv: KVServiceClient, prefix: str) -> Any:
    """A Watch known to be registered: it has already delivered one ``<prefix>sync`` put.

    (Belt and braces: the store subscribes before headers go out; see test_watch_sees_a_put_made_once_its_headers_are_out.)
    """
    stream = kv.watch(kv_pb2.WatchRequest(prefix=prefix), timeout=10)
    first: list[kv_pb2.WatchEvent] = []
    reader = threading.Thread(target=lambda: first.append(next(stream)))
    reader.start()

    def heard() -> bool:
        kv.put(kv_pb2.PutRequest(key=prefix + "sync", value=b""))
        reader.join(0.05)
        return not reader.is_alive()

    wait_until(heard, f"the watch on {prefix!r} to deliver a sync put")
    reader.join()
    assert first and first[0].key == prefix + "sync"
    return stream


def events_after_sync(
    stream: Iterator[kv_pb2.WatchEvent], n: int, prefix: str
) -> list[tuple[str, str, bytes]]:
    """The next ``n`` events that are not ``<prefix>sync`` puts, as (type, key, value)."""
    got: list[tuple[str, str, bytes]] = []
    while len(got) < n:
        event = next_within(stream)
        if event.key != prefix + "sync":
            got.append((kv_pb2.EventType.Name(event.type), event.key, event.value))
    return got


def logged(caplog: pytest.LogCaptureFixture, logger: str, text: str) -> bool:
    return any(r.name == logger and text in r.getMessage() for r in list(caplog.records))


def host_handshake(
    host: PluginHost, config: hs.HandshakeConfig = HANDSHAKE, **fields: str
) -> handshake_pb2.HandshakeResponse:
    with Client(host.url, ClientConfig(timeout=5)) as client:
        return HandshakeServiceClient(client).handshake(hs.request_for(config, (), **fields))


def report_health(host: PluginHost, headers: dict[str, str]) -> None:
    with Client(host.url, ClientConfig(timeout=5)) as client:
        PluginLifecycleClient(client).report_health(
            lifecycle_pb2.ReportHealthRequest(state=DEGRADED.value, reason="disk nearly full"),
            headers=headers,
        )


def credentials(runtime_id: str, token: str) -> dict[str, str]:
    return {"X-Plugin-Runtime-ID": runtime_id, "Authorization": f"Bearer {token}"}


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def make_host() -> Iterator[Callable[..., PluginHost]]:
    """``make_host(versions=(1,), **HostConfig fields)``: a host offering those app versions,
    closed after the test."""
    hosts: list[PluginHost] = []

    def make(versions: tuple[int, ...] = (1,), stop_grace: float = 1.0, **fields: Any) -> PluginHost:
        handshake = dataclasses.replace(HANDSHAKE, app_protocol_versions=versions)
        fields.setdefault("dev_cookie_joins", True)
        config = HostConfig(stop_grace=stop_grace, handle_signals=False, **fields)
        host = PluginHost(handshake, PLUGINS, config).start()
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        host.close()


@pytest.fixture
def host(make_host) -> PluginHost:
    return make_host()


@pytest.fixture
def plugin(host) -> PluginClient:
    """The instrumented KV store running as a subprocess plugin."""
    return host.launch(script("kv_plugin.py"), name="kv")


@pytest.fixture
def kv(plugin) -> KVServiceClient:
    return plugin.dispense("kv")


@pytest.fixture(params=["process", "in-process"])
def launched(request, host) -> PluginClient:
    """The instrumented KV store launched each way; the tests using it must pass for both."""
    if request.param == "process":
        strategy: Any = script("kv_plugin.py")
    else:
        health = Health()
        strategy = InProcessStrategy({"kv": InstrumentedStore(health)}, health=health)
    return host.launch(strategy, name="kv")


@pytest.fixture
def plugin_logs(caplog) -> pytest.LogCaptureFixture:
    """Captures what launched plugins print (their lines are logged at INFO)."""
    caplog.set_level(logging.INFO, logger="connectplugin.plugin")
    return caplog


# --- launch, handshake, dispense, calls (both strategies) -----------------------------------


def test_handshake_agrees_on_core_1_and_lists_the_served_plugin(launched):
    response = launched.handshake()

    assert response.core_protocol_version == 1
    assert response.app_protocol_version == 1
    assert [(p.name, p.version, p.service_path) for p in response.plugins] == [
        ("kv", "1.0.0", "/kv.v1.KVService/")
    ]


def test_dispense_returns_the_typed_client(launched):
    assert isinstance(launched.dispense("kv"), KVServiceClient)
    assert launched.dispense("kv") is launched.dispense("kv")


def test_dispense_by_definition_returns_the_client_dispense_by_name_does(launched):
    assert launched.dispense(KV_PLUGIN) is launched.dispense("kv")


def test_dispense_of_a_definition_other_than_the_hosts_under_its_name_is_refused(launched):
    impostor = dataclasses.replace(KV_PLUGIN, client=HandshakeServiceClient)
    with pytest.raises(ValueError, match="not the definition"):
        launched.dispense(impostor)


def test_dispense_with_a_config_or_interceptors_gives_a_new_client_with_them(launched):
    seen: list[float | None] = []

    def record(call: Call, proceed: Callable[[Call], Any]) -> Any:
        seen.append(call.timeout)
        return proceed(call)

    kv = launched.dispense("kv", config=ClientConfig(timeout=2.5), interceptors=[record])
    kv.put(kv_pb2.PutRequest(key="k", value=b"v"))  # the host's secret went with it

    assert kv is not launched.dispense("kv")
    assert seen == [2.5]
    assert launched.dispense("kv").get(kv_pb2.GetRequest(key="k")).value == b"v"  # one plugin
    assert seen == [2.5]


def test_dispensed_clients_of_a_stopped_plugin_say_it_is_not_running(host, launched):
    tuned = launched.dispense("kv", config=ClientConfig(timeout=2.5))
    host.stop(launched, grace=0.5)

    with pytest.raises(ConnectError) as info:
        tuned.get(kv_pb2.GetRequest(key="k"))

    assert info.value.code is Code.UNAVAILABLE
    assert "not running" in info.value.message


def test_a_call_to_a_hung_plugin_ends_at_the_default_deadline(make_host):
    # The host's default for dispensed clients, shortened; out of the box it is DEFAULT_TIMEOUT.
    host = make_host(client=PluginClientConfig(rpc=ClientConfig(timeout=0.5)))
    plugin = host.launch(script("kv_plugin.py"), name="kv")

    with pytest.raises(ConnectError) as info:
        plugin.dispense("kv").get(kv_pb2.GetRequest(key="sleep/2"))

    assert info.value.code is Code.DEADLINE_EXCEEDED


def test_dispense_of_a_name_the_host_does_not_know_is_a_key_error(launched):
    with pytest.raises(KeyError, match="nope"):
        launched.dispense("nope")


def test_put_then_get_returns_the_value(launched):
    kv = launched.dispense("kv")
    kv.put(kv_pb2.PutRequest(key="fruit/apple", value=b"red"))

    got = kv.get(kv_pb2.GetRequest(key="fruit/apple"))

    assert (got.found, got.value) == (True, b"red")


def test_get_of_a_missing_key_is_not_found(launched):
    got = launched.dispense("kv").get(kv_pb2.GetRequest(key="absent"))

    assert (got.found, got.value) == (False, b"")


def test_delete_removes_the_key_and_says_whether_it_was_there(launched):
    kv = launched.dispense("kv")
    kv.put(kv_pb2.PutRequest(key="k", value=b"v"))

    assert kv.delete(kv_pb2.DeleteRequest(key="k")).found is True
    assert kv.delete(kv_pb2.DeleteRequest(key="k")).found is False
    assert kv.get(kv_pb2.GetRequest(key="k")).found is False


def test_handler_errors_cross_the_plugin_boundary_with_their_code(launched):
    with pytest.raises(ConnectError) as info:
        launched.dispense("kv").put(kv_pb2.PutRequest(key="", value=b"v"))

    assert info.value.code is Code.INVALID_ARGUMENT
    assert "key" in info.value.message


def test_watch_streams_changes_under_its_prefix_in_order(launched):
    kv = launched.dispense("kv")
    with open_watch(kv, "fruit/") as stream:
        kv.put(kv_pb2.PutRequest(key="fruit/apple", value=b"red"))
        kv.put(kv_pb2.PutRequest(key="veg/leek", value=b"green"))
        kv.put(kv_pb2.PutRequest(key="fruit/plum", value=b"purple"))
        kv.delete(kv_pb2.DeleteRequest(key="fruit/apple"))

        assert events_after_sync(stream, 3, "fruit/") == [
            ("EVENT_TYPE_PUT", "fruit/apple", b"red"),
            ("EVENT_TYPE_PUT", "fruit/plum", b"purple"),
            ("EVENT_TYPE_DELETE", "fruit/apple", b""),
        ]


def test_watch_sees_a_put_made_once_its_headers_are_out():
    # Driven at the WSGI level so the window is hit every time; over a socket it is hit
    # about once in a hundred watches.
    app = App([KVStore()])
    started: list[str] = []

    def start_response(status: str, headers: list, exc_info: Any = None) -> Callable[[bytes], None]:
        started.append(status)
        return lambda data: None

    watch = EnvironBuilder(
        path="/kv.v1.KVService/Watch",
        method="POST",
        content_type="application/connect+proto",
        data=envelope(kv_pb2.WatchRequest(prefix="k").SerializeToString()),
        headers={"Connect-Protocol-Version": "1", "Connect-Timeout-Ms": "300"},
    ).get_environ()
    body = iter(app(watch, start_response))
    next(body)  # a server has now sent the headers: the caller's watch() has returned
    assert started == ["200 OK"]
    put = EnvironBuilder(
        path="/kv.v1.KVService/Put",
        method="POST",
        content_type="application/proto",
        data=kv_pb2.PutRequest(key="k1", value=b"v").SerializeToString(),
        headers={"Connect-Protocol-Version": "1"},
    ).get_environ()
    b"".join(app(put, start_response))

    frames = split_envelopes(b"".join(body))  # the stream ends at its 300 ms deadline

    assert [kv_pb2.WatchEvent.FromString(data).key for flags, data in frames if not flags & 2] == [
        "k1"
    ]


# --- app protocol version negotiation -------------------------------------------------------


@pytest.mark.parametrize(
    ("host_versions", "agreed"),
    [((1, 2, 3), 3), ((1, 2), 2), ((3, 4), 3)],
)
def test_host_and_plugin_agree_on_the_highest_common_app_version(make_host, host_versions, agreed):
    host = make_host(versions=host_versions)
    client = host.launch(script("versions_plugin.py"), name="kv")  # the plugin speaks 2 and 3

    assert client.handshake().app_protocol_version == agreed
    assert client.app_protocol_version == agreed
    client.dispense("kv").put(kv_pb2.PutRequest(key="k", value=b"v"))


def test_no_common_app_version_fails_the_launch_naming_both_sides(make_host):
    host = make_host(versions=(1,))

    with pytest.raises(LaunchError) as info:
        host.launch(script("versions_plugin.py"), name="kv")

    error = info.value
    assert (error.reason, error.exit_code) == (LaunchFailure.EXITED, 1)
    assert "plugin supports [2, 3]" in error.stderr_tail[-1]
    assert "host supports [1]" in error.stderr_tail[-1]


def test_handshake_with_no_common_app_version_is_failed_precondition_naming_both_sides(make_host):
    host = make_host(versions=(2, 3))
    plugin = host.launch(script("versions_plugin.py"), name="kv")
    old_host = dataclasses.replace(HANDSHAKE, app_protocol_versions=(1,))

    client = PluginClient(plugin.url, PLUGINS, old_host, host_secret=host_secret(host, plugin))
    try:
        with pytest.raises(ConnectError) as info:
            client.handshake()
    finally:
        client.close()

    assert info.value.code is Code.FAILED_PRECONDITION
    assert "[2, 3]" in info.value.message and "[1]" in info.value.message


# --- cookie and requested plugins -----------------------------------------------------------


def test_plugin_run_by_hand_explains_itself_on_stderr_and_exits_nonzero():
    env = {"PATH": os.environ.get("PATH", ""), **ENV}

    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "kv_plugin.py")],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=15,
    )

    assert done.returncode != 0
    assert done.stdout == ""
    assert "This program is a connectplugin plugin" in done.stderr
    assert HANDSHAKE.magic_cookie_key in done.stderr
    assert "Traceback" not in done.stderr


def test_an_unguarded_plugin_script_imported_by_a_host_raises_instead_of_exiting(host):
    sys.modules.pop("tests.plugins.unguarded_plugin", None)
    with pytest.raises(NotLaunchedError) as info:
        importlib.import_module("tests.plugins.unguarded_plugin")  # as a host would, for InProcessStrategy

    assert info.value.module == "tests.plugins.unguarded_plugin"
    assert 'if __name__ == "__main__":' in str(info.value)
    assert host.launch(InProcessStrategy({"kv": KVStore()}), name="kv").handshake()  # the host runs on


def test_an_unguarded_plugin_script_run_by_hand_still_explains_itself_and_exits():
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "unguarded_plugin.py")],
        env={"PATH": os.environ.get("PATH", ""), **ENV},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=15,
    )

    assert done.returncode == 1
    assert "This program is a connectplugin plugin" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_plugin_a_host_started_with_another_cookie_says_so_not_run_the_host_instead():
    other = PluginHost(dataclasses.replace(HANDSHAKE, magic_cookie_value="another-app"), PLUGINS,
                       HostConfig(stop_grace=1.0, handle_signals=False)).start()
    try:
        with pytest.raises(LaunchError) as info:
            other.launch(script("kv_plugin.py"), name="kv")
    finally:
        other.close()

    tail = "\n".join(info.value.stderr_tail)
    assert "different magic cookie" in tail
    assert HANDSHAKE.magic_cookie_key in tail
    assert "Run the host instead" not in tail
    assert HANDSHAKE.magic_cookie_value not in tail and "another-app" not in tail


@pytest.mark.parametrize(
    "go_env",
    [{"PORT": "8080"}, {"HOST_URL": "http://127.0.0.1:9"}, {"PORT": "http", "HOST_URL": "http://127.0.0.1:9"}],
    ids=["port-alone", "host-url-alone", "bad-port"],
)
def test_plugin_without_the_cookie_or_the_whole_go_launch_environment_exits_nonzero(go_env):
    # Only PORT and HOST_URL together are the Go launcher's model (PORT alone is common).
    env = {"PATH": os.environ.get("PATH", ""), **ENV, **go_env}

    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "kv_plugin.py")],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=15,
    )

    assert done.returncode == 1
    assert done.stdout == ""
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "cookie",
    [
        {"magic_cookie_value": "not-the-cookie"},
        {"magic_cookie_key": "SOME_OTHER_APP"},
    ],
    ids=["wrong-value", "wrong-key"],
)
def test_handshake_with_the_wrong_cookie_is_invalid_argument(plugin, cookie):
    wrong = dataclasses.replace(HANDSHAKE, **cookie)

    with pytest.raises(ConnectError) as info:
        HandshakeServiceClient(plugin.rpc).handshake(hs.request_for(wrong, ["kv"]), timeout=5)

    assert info.value.code is Code.INVALID_ARGUMENT
    assert "cookie" in info.value.message
    assert HANDSHAKE.magic_cookie_value not in info.value.message


def test_a_client_expecting_a_plugin_the_server_does_not_serve_says_which(host, plugin):
    other = dataclasses.replace(KV_PLUGIN, name="cache")
    secret = host_secret(host, plugin)
    client = PluginClient(plugin.url, {"kv": KV_PLUGIN, "cache": other}, HANDSHAKE, host_secret=secret)
    try:
        with pytest.raises(PluginNotServedError) as info:
            client.handshake()
    finally:
        client.close()

    # The handshake succeeds (the plugin leaves "cache" out, as a Go plugin does); the
    # client names what it misses.
    assert (info.value.missing, info.value.served, info.value.url) == (("cache",), ("kv",), plugin.url)
    assert "cache" in str(info.value)


# --- start failures -------------------------------------------------------------------------


def test_plugin_that_exits_at_once_is_a_launch_error_carrying_its_last_stderr_lines(host):
    with pytest.raises(LaunchError) as info:
        host.launch(script("crash_on_start.py"), name="broken")

    error = info.value
    assert (error.plugin, error.reason, error.exit_code) == ("broken", LaunchFailure.EXITED, 1)
    assert "crash_on_start: cannot open /nonexistent/config.toml" in error.stderr_tail
    assert error.stderr_tail[-1] == "RuntimeError: plugin failed to initialise"


def test_missing_executable_is_a_launch_error(host):
    with pytest.raises(LaunchError) as info:
        host.launch(ProcessStrategy(["/nonexistent/no-such-plugin-binary"]), name="ghost")

    error = info.value
    assert (error.plugin, error.reason, error.exit_code) == ("ghost", LaunchFailure.NOT_EXECUTABLE, None)
    assert "no-such-plugin-binary" in error.detail


def test_plugin_that_never_reports_its_address_fails_within_start_timeout_and_is_killed(host):
    started = time.monotonic()
    with pytest.raises(LaunchError) as info:
        host.launch(script("silent.py", start_timeout=1.0), name="silent")
    elapsed = time.monotonic() - started

    assert 1.0 <= elapsed < 4.0
    assert (info.value.reason, info.value.exit_code) == (LaunchFailure.SILENT, None)
    pid = int(re.fullmatch(r"silent: pid (\d+)", info.value.stderr_tail[0])[1])
    wait_until(lambda: process_gone(pid), "the silent plugin to be killed", timeout=2)


def test_plugin_announcing_an_app_version_the_host_does_not_offer_fails_at_once(host):
    liar = ProcessStrategy(
        [sys.executable, "-c", "import time; print('1|9|http://127.0.0.1:9', flush=True); time.sleep(30)"],
        start_timeout=20.0,
    )
    started = time.monotonic()
    with pytest.raises(LaunchError) as info:
        host.launch(liar, name="liar")

    assert time.monotonic() - started < 5.0  # not the 20 s start timeout
    assert info.value.reason is LaunchFailure.REFUSED
    assert "app protocol 9" in info.value.detail


def test_endless_stdout_line_before_the_address_fails_the_launch_without_buffering_it(host):
    # The flood never ends and has no newline: the host must stop reading at line_limit.
    flood = ProcessStrategy(
        [sys.executable, "-c", "import sys\nwhile True: sys.stdout.write('x' * 65536)"], line_limit=4096
    )

    with pytest.raises(LaunchError) as info:
        host.launch(flood, name="flood")

    assert (info.value.plugin, info.value.reason) == ("flood", LaunchFailure.LINE_TOO_LONG)
    assert "4096" in info.value.detail


def test_plugin_reporting_an_address_where_nothing_listens_is_a_launch_error_naming_it(host):
    dead_url = f"http://127.0.0.1:{free_port()}"
    deaf = ProcessStrategy(
        [sys.executable, "-c", f"import time; print('1|1|{dead_url}', flush=True); time.sleep(30)"]
    )

    with pytest.raises(LaunchError) as info:
        host.launch(deaf, name="deaf")

    assert (info.value.plugin, info.value.reason) == ("deaf", LaunchFailure.UNREACHABLE)
    assert dead_url in info.value.detail
    assert isinstance(info.value.__cause__, ConnectError)
    assert info.value.__cause__.code is Code.UNAVAILABLE


# --- plugin output ----------------------------------------------------------------------------


def test_long_output_lines_after_the_address_are_logged_in_pieces_of_line_limit(host, plugin_logs):
    program = (
        "import sys, time\n"
        "print('1|1|http://127.0.0.1:9', flush=True)\n"
        "print('o' * 2500, flush=True)\n"
        "print('e' * 2500, file=sys.stderr, flush=True)\n"
        "time.sleep(30)\n"
    )
    strategy = ProcessStrategy([sys.executable, "-c", program], line_limit=1000)
    running = strategy.start(LaunchContext("long", HANDSHAKE, PLUGINS))
    try:
        name = "connectplugin.plugin.long"

        def pieces(letter: str) -> list[int]:
            return [
                len(r.getMessage()) for r in list(plugin_logs.records)
                if r.name == name and r.getMessage().startswith(letter)
            ]

        wait_until(lambda: sum(pieces("o")) == 2500 and sum(pieces("e")) == 2500, "both lines, whole")
    finally:
        running.stop(0.5)

    assert pieces("o") == pieces("e") == [1000, 1000, 500]


def test_plugin_stdout_and_stderr_lines_are_logged_under_its_name(host, plugin_logs):
    client = host.launch(script("chatty_plugin.py"), name="chatty")
    client.dispense("kv").get(kv_pb2.GetRequest(key="sleep/0"))  # prints "sleeping 0" while serving

    name = "connectplugin.plugin.chatty"
    for line in ("chatty: hello on stdout", "chatty: hello on stderr", "sleeping 0"):
        wait_until(lambda line=line: logged(plugin_logs, name, line), f"{line!r} in the log")
    assert not logged(plugin_logs, name, client.url)  # the address line is protocol, not output


# --- crashes ----------------------------------------------------------------------------------


@pytest.fixture
def crashed(host, plugin, kv) -> dict[str, Any]:
    """The plugin, SIGKILLed while a Watch is waiting: what the watcher saw, and how fast."""
    stream = open_watch(kv, "w/")
    pid = plugin.running.pid
    killer = threading.Timer(0.2, os.kill, (pid, signal.SIGKILL))
    killer.start()
    started = time.monotonic()
    try:
        with pytest.raises(ConnectError) as info:
            while True:
                next_within(stream, timeout=10)
    finally:
        killer.join()
        stream.close()
    return {"error": info.value, "after": time.monotonic() - started, "pid": pid}


def test_crash_mid_watch_fails_the_stream_with_unavailable_promptly(crashed):
    assert crashed["error"].code is Code.UNAVAILABLE
    assert crashed["after"] < 2.0


def test_calls_after_a_crash_are_unavailable(crashed, plugin, kv):
    wait_until(lambda: not plugin.running.alive(), "the crashed plugin to be gone")

    with pytest.raises(ConnectError) as info:
        kv.get(kv_pb2.GetRequest(key="k"))

    assert info.value.code is Code.UNAVAILABLE


def test_crash_records_exit_code_minus_9(crashed, plugin):
    wait_until(lambda: plugin.exit_code == -signal.SIGKILL, "exit code -9")


def test_crash_is_recorded_as_unhealthy_on_the_host(crashed, host, plugin):
    runtime_id = host.runtime_id(plugin)
    assert runtime_id

    wait_until(
        lambda: getattr(host.reported_health(runtime_id), "state", None) == UNHEALTHY,
        "an unhealthy report",
    )

    assert "-9" in host.reported_health(runtime_id).reason


def test_host_killed_with_sigkill_leaves_no_orphan_plugin():
    host = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "kv_host.py")],
        env={**os.environ, **ENV},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    plugin_pid = 0
    try:
        ready, _, _ = select.select([host.stdout], [], [], 15)
        assert ready, "the host script did not print the plugin pid"
        plugin_pid = int(host.stdout.readline())
        assert not process_gone(plugin_pid)

        host.kill()
        host.wait(timeout=5)

        wait_until(lambda: process_gone(plugin_pid), "the orphaned plugin to exit", timeout=3)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        host.stdout.close()
        if plugin_pid and not process_gone(plugin_pid):
            os.kill(plugin_pid, signal.SIGKILL)


# --- graceful shutdown ------------------------------------------------------------------------


def slow_call(kv: KVServiceClient, seconds: float) -> tuple[threading.Thread, list[Any]]:
    """Start ``Get("sleep/<seconds>")`` on a thread; the list receives its response or error."""
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append(kv.get(kv_pb2.GetRequest(key=f"sleep/{seconds:g}"), timeout=10))
        except ConnectError as e:
            outcome.append(e)

    caller = threading.Thread(target=call)
    caller.start()
    return caller, outcome


def test_stop_lets_an_in_flight_call_finish(host, plugin, kv, plugin_logs):
    caller, outcome = slow_call(kv, 1)
    wait_until(lambda: logged(plugin_logs, "connectplugin.plugin.kv", "sleeping 1"), "the call to start")

    host.stop(plugin, grace=3)
    caller.join(5)

    assert outcome and outcome[0] == kv_pb2.GetResponse(value=b"slept", found=True)
    wait_until(lambda: plugin.exit_code == 0, "exit code 0")


def test_stop_with_a_sub_second_grace_lets_a_shorter_call_finish(host, plugin, kv, plugin_logs):
    caller, outcome = slow_call(kv, 0.3)
    wait_until(lambda: logged(plugin_logs, "connectplugin.plugin.kv", "sleeping 0.3"), "the call to start")

    host.stop(plugin, grace=0.9)
    caller.join(5)

    assert outcome and outcome[0] == kv_pb2.GetResponse(value=b"slept", found=True)


def test_exit_code_is_known_when_stop_returns(host):
    client = host.launch(script("forking_plugin.py"), name="kv")

    host.stop(client, grace=1)

    assert client.exit_code == 0


def test_shutdown_call_is_acknowledged_and_the_plugin_exits_0(plugin):
    reply = PluginControlClient(plugin.rpc).shutdown(
        lifecycle_pb2.ShutdownRequest(grace_period_seconds=1, reason="test"), timeout=5
    )

    assert reply.acknowledged is True
    wait_until(lambda: plugin.exit_code == 0, "exit code 0")


def test_shutdown_with_zero_grace_still_answers(host):
    # The reply is lost about half the time; ten plugins make a lost one near certain.
    for _ in range(10):
        client = host.launch(script("kv_plugin.py"), name="kv")
        reply = PluginControlClient(client.rpc).shutdown(
            lifecycle_pb2.ShutdownRequest(), timeout=5
        )
        assert reply.acknowledged is True
        host.stop(client)


def test_shutdown_with_a_negative_grace_is_invalid_argument(plugin):
    with pytest.raises(ConnectError) as info:
        PluginControlClient(plugin.rpc).shutdown(
            lifecycle_pb2.ShutdownRequest(grace_period_seconds=-1), timeout=5
        )

    assert info.value.code is Code.INVALID_ARGUMENT
    assert plugin.running.alive()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_makes_the_plugin_exit_0(plugin, signum):
    os.kill(plugin.running.pid, signum)

    wait_until(lambda: plugin.exit_code == 0, "exit code 0")


def test_open_watch_ends_when_the_plugin_is_stopped(host, plugin, kv):
    stream = open_watch(kv, "w/")

    host.stop(plugin, grace=2)

    with pytest.raises(StopIteration):
        while True:
            next_within(stream)


def test_plugin_ignoring_sigterm_is_killed_after_the_grace_period(host):
    client = host.launch(script("stubborn_plugin.py"), name="stubborn")
    pid = client.running.pid

    started = time.monotonic()
    host.stop(client, grace=1)

    assert time.monotonic() - started >= 1.0
    wait_until(lambda: client.exit_code == -signal.SIGKILL, "exit code -9")
    assert process_gone(pid)


def test_closing_the_host_stops_every_plugin_it_launched():
    with PluginHost(HANDSHAKE, PLUGINS, HostConfig(stop_grace=1.0, handle_signals=False)) as host:
        processes = [host.launch(script("kv_plugin.py"), name=f"kv{i}") for i in range(2)]
        in_process = host.launch(InProcessStrategy({"kv": KVStore()}), name="kv")
        pids = [c.running.pid for c in processes]
        assert not any(process_gone(pid) for pid in pids)

    wait_until(lambda: all(process_gone(pid) for pid in pids), "every plugin process to exit", timeout=3)
    assert [c.exit_code for c in processes] == [0, 0]
    assert not in_process.running.alive()


# --- construction is inert; configs reach what they configure ------------------------------


RUN_PLUGIN_SECRET = "run-plugin-secret"


@pytest.fixture
def run_plugin() -> Iterator[Callable[..., PluginServer]]:
    """``run_plugin(config)``: the KV store served by a PluginServer on a thread until the test
    ends, taking calls that present ``RUN_PLUGIN_SECRET``."""
    running: list[tuple[PluginServer, threading.Thread]] = []

    def run(config: ServeConfig | None = None) -> PluginServer:
        server = PluginServer(PLUGINS, {"kv": KVStore()}, HANDSHAKE, config)
        server.link.expect_host(RUN_PLUGIN_SECRET)
        server.listen()
        runner = threading.Thread(target=server.run, name="plugin-under-test")
        runner.start()
        running.append((server, runner))
        return server

    yield run
    for server, runner in running:
        server.stop(grace=0)
        runner.join(10)


def test_building_a_plugin_server_binds_no_port_and_starts_no_thread():
    port = free_port()
    before = set(threading.enumerate())

    server = PluginServer(
        PLUGINS, {"kv": KVStore()}, HANDSHAKE, ServeConfig(http=HTTPConfig(port=port)), link=HostLink()
    )

    assert set(threading.enumerate()) == before
    assert port_is_free(port)
    server.link.close()


def test_serve_config_http_settings_reach_the_plugins_server(run_plugin):
    server = run_plugin(ServeConfig(http=HTTPConfig(max_request_body_size=1024)))

    reply = requests.post(
        server.listen() + "/kv.v1.KVService/Put",
        data=b"x" * 4096,
        headers={"Content-Type": "application/proto"},
        timeout=5,
    )

    assert reply.status_code == 413


def test_a_first_handshake_in_flight_does_not_hold_up_another(run_plugin):
    url = run_plugin().listen()
    first_in_flight, release = threading.Event(), threading.Event()

    def hold_the_first_handshake(call, proceed):
        if call.method.name == "Handshake" and not first_in_flight.is_set():
            first_in_flight.set()
            release.wait(10)
        return proceed(call)

    config = PluginClientConfig(rpc=ClientConfig(interceptors=(hold_the_first_handshake,)))
    client = PluginClient(url, PLUGINS, HANDSHAKE, config=config, host_secret=RUN_PLUGIN_SECRET)
    first = threading.Thread(target=client.handshake)
    first.start()
    answers: list[handshake_pb2.HandshakeResponse] = []
    try:
        assert first_in_flight.wait(5)
        second = threading.Thread(target=lambda: answers.append(client.handshake()))
        second.start()
        second.join(5)

        assert answers, "the second handshake waited for the first one's call"
    finally:
        release.set()
        first.join(10)
        client.close()
    assert client.handshake() is answers[0]  # the first answer to arrive is the one kept


# --- health -----------------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", "kv.v1.KVService"], ids=["plugin", "kv-service"])
def test_check_health_is_serving(launched, service):
    assert launched.check_health(service) == SERVING


def test_check_health_of_an_unknown_service_is_not_found(launched):
    with pytest.raises(ConnectError) as info:
        launched.check_health("nope.v1.Nothing")

    assert info.value.code is Code.NOT_FOUND


def test_get_health_is_healthy_at_start(launched):
    assert launched.get_health().state == HEALTHY


def test_get_health_returns_the_state_and_reason_the_plugin_set(launched):
    launched.dispense("kv").put(kv_pb2.PutRequest(key="health", value=b"DEGRADED"))

    health = launched.get_health()

    assert (health.state, health.reason) == (DEGRADED, "set by test")
    assert launched.check_health() == SERVING  # degraded still serves


def test_watch_health_sees_the_plugin_turn_unhealthy(launched):
    with launched.watch_health() as stream:
        assert next_within(stream).status == SERVING

        launched.dispense("kv").put(kv_pb2.PutRequest(key="health", value=b"UNHEALTHY"))

        assert next_within(stream).status == NOT_SERVING


def test_health_change_reaches_the_host_with_the_runtime_token(host, launched):
    runtime_id = host.runtime_id(launched)

    launched.dispense("kv").put(kv_pb2.PutRequest(key="health", value=b"UNHEALTHY"))

    wait_until(
        lambda: getattr(host.reported_health(runtime_id), "state", None) == UNHEALTHY,
        "an unhealthy report",
    )
    assert host.reported_health(runtime_id).reason == "set by test"


def test_report_health_with_an_issued_identity_reaches_the_host(host):
    issued = host_handshake(host, self_id="external", self_version="1.2.3")

    report_health(host, credentials(issued.runtime_id, issued.runtime_token))

    report = host.reported_health(issued.runtime_id)
    assert (report.state, report.reason) == (DEGRADED, "disk nearly full")


@pytest.mark.parametrize(
    "headers",
    [
        lambda rid, token: {},
        lambda rid, token: {"X-Plugin-Runtime-ID": rid},
        lambda rid, token: {"Authorization": f"Bearer {token}"},
        lambda rid, token: credentials(rid, token[:-1] + ("A" if token[-1] != "A" else "B")),
        lambda rid, token: credentials(rid + "x", token),
        lambda rid, token: {"X-Plugin-Runtime-ID": rid, "Authorization": f"Basic {token}"},
    ],
    ids=["none", "id-only", "token-only", "wrong-token", "unknown-id", "not-bearer"],
)
def test_report_health_without_valid_credentials_is_refused(host, headers):
    issued = host_handshake(host, self_id="external")
    sent = headers(issued.runtime_id, issued.runtime_token)

    with pytest.raises(ConnectError) as info:
        report_health(host, sent)

    # No runtime id at all is a malformed call (invalid_argument, as the Go host answers).
    expected = Code.UNAUTHENTICATED if "X-Plugin-Runtime-ID" in sent else Code.INVALID_ARGUMENT
    assert info.value.code is expected
    assert host.reported_health(issued.runtime_id) is None


def test_plugin_healthz_and_readyz_are_200_while_serving(plugin):
    assert requests.get(plugin.url + "/healthz", timeout=5).status_code == 200
    assert requests.get(plugin.url + "/readyz", timeout=5).status_code == 200


def test_plugin_readyz_is_503_when_unhealthy(kv, plugin):
    kv.put(kv_pb2.PutRequest(key="health", value=b"UNHEALTHY"))

    assert requests.get(plugin.url + "/readyz", timeout=5).status_code == 503
    assert requests.get(plugin.url + "/healthz", timeout=5).status_code == 200


def test_plugin_readyz_is_503_while_stopping(kv, plugin, plugin_logs):
    with requests.Session() as probe:
        assert probe.get(plugin.url + "/readyz", timeout=5).status_code == 200  # keeps a connection
        caller, outcome = slow_call(kv, 1)
        wait_until(lambda: logged(plugin_logs, "connectplugin.plugin.kv", "sleeping 1"), "the call to start")
        PluginControlClient(plugin.rpc).shutdown(
            lifecycle_pb2.ShutdownRequest(grace_period_seconds=5), timeout=5
        )

        draining = probe.get(plugin.url + "/readyz", timeout=5)

    caller.join(5)
    assert draining.status_code == 503
    assert outcome and outcome[0].value == b"slept"


# --- the host's side of the handshake (phase 2) -----------------------------------------------


def test_host_handshake_with_self_id_issues_a_runtime_identity(host):
    response = host_handshake(host, self_id="external", self_version="1.2.3")

    assert response.core_protocol_version == 1
    assert response.app_protocol_version == 1
    assert response.runtime_id
    assert len(response.runtime_token) >= 32


def test_host_handshake_issues_a_fresh_identity_every_time(host):
    first = host_handshake(host, self_id="external")
    second = host_handshake(host, self_id="external")

    assert first.runtime_id != second.runtime_id
    assert first.runtime_token != second.runtime_token


def test_host_handshake_with_the_wrong_cookie_is_invalid_argument(host):
    wrong = dataclasses.replace(HANDSHAKE, magic_cookie_value="not-the-cookie")

    with pytest.raises(ConnectError) as info:
        host_handshake(host, wrong, self_id="external")

    assert info.value.code is Code.INVALID_ARGUMENT
