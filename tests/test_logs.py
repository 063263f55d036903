"""What the host's log shows of its plugins (runtime/logs.py and the launcher's stderr
reader): records at their level, a handler's unexpected exception at ERROR with its
traceback, plain lines at INFO or their ``[LEVEL]``, the line bound kept. Real plugin
processes throughout; one host runs as a subprocess, with Python's default logging."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from connectplugin import ConnectError, HostConfig, PluginHost, ProcessStrategy
from connectplugin.rpc.errors import Code
from connectplugin.runtime import logs
from connectplugin.runtime.launcher import LaunchContext
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.plugin import HANDSHAKE, PLUGINS
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "plugins"
ENV = {"PYTHONPATH": str(ROOT)}
NAME = "connectplugin.plugin.kv"


@pytest.fixture
def host():
    host = PluginHost(HANDSHAKE, PLUGINS, HostConfig(stop_grace=1.0, handle_signals=False)).start()
    yield host
    host.close()


@pytest.fixture
def records(caplog) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="connectplugin.plugin")
    return caplog


def launch(host: PluginHost, *args: str) -> Any:
    strategy = ProcessStrategy([sys.executable, str(SCRIPTS / "logging_plugin.py"), *args], env=ENV)
    return host.launch(strategy, name="kv").dispense("kv")


def record(caplog: pytest.LogCaptureFixture, text: str) -> logging.LogRecord:
    """The host's record of the plugin's line containing ``text``, once it has arrived."""

    def find() -> logging.LogRecord | None:
        return next((r for r in list(caplog.records) if r.name == NAME and text in r.getMessage()), None)

    return wait_until(find, f"{text!r} in the host's log")


def test_a_handlers_unexpected_exception_is_an_error_with_its_traceback_on_the_host(host, records):
    kv = launch(host)

    with pytest.raises(ConnectError) as info:
        kv.get(kv_pb2.GetRequest(key="raise/the handler broke"))

    assert (info.value.code, info.value.message) == (Code.INTERNAL, "internal error")  # no traceback to the caller
    logged = record(records, "unhandled error in /kv.v1.KVService/Get")
    assert logged.levelno == logging.ERROR
    message = logged.getMessage()
    assert message.startswith("connectplugin.server: ")
    assert "Traceback (most recent call last):" in message
    assert message.endswith("RuntimeError: the handler broke")


def test_plugin_log_records_keep_their_level_on_the_host(host, records):
    kv = launch(host)
    for level in ("debug", "info", "warning", "error", "critical"):
        kv.put(kv_pb2.PutRequest(key=f"log/{level}", value=f"a {level} record".encode()))

    levels = {level: record(records, f"a {level} record").levelno for level in ("info", "warning", "error", "critical")}
    assert levels == {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}
    assert record(records, "kvtest: a info record")
    # The plugin logs from INFO up: its DEBUG record was never written.
    assert not any("a debug record" in r.getMessage() for r in records.records)


def test_plain_stderr_lines_are_info_unless_a_level_prefix_says_otherwise(host, records):
    kv = launch(host)
    for line in ("just a line", "[ERROR] prefixed error", "[WARN] prefixed warn", "[nonsense] still info", '{"not": "a record"}'):
        kv.put(kv_pb2.PutRequest(key="print/", value=line.encode()))

    assert record(records, "just a line").levelno == logging.INFO
    assert record(records, "[ERROR] prefixed error").levelno == logging.ERROR
    assert record(records, "[WARN] prefixed warn").levelno == logging.WARNING
    assert record(records, "[nonsense] still info").levelno == logging.INFO
    assert record(records, '{"not": "a record"}').levelno == logging.INFO


def test_a_plugin_that_configured_logging_itself_keeps_its_format_and_its_levels_by_prefix(host, records):
    kv = launch(host, "--own-logging")
    kv.put(kv_pb2.PutRequest(key="log/debug", value=b"own debug"))
    kv.put(kv_pb2.PutRequest(key="log/warning", value=b"own warning"))

    # Its own format, untouched (no JSON), and its DEBUG level kept.
    assert record(records, "[DEBUG] kvtest: own debug").levelno == logging.DEBUG
    assert record(records, "[WARNING] kvtest: own warning").levelno == logging.WARNING


def test_a_record_longer_than_the_line_limit_comes_in_info_pieces_never_held_whole(records):
    line = json.dumps({"@level": "error", "@message": "x" * 2500})
    program = (
        "import sys, time\n"
        "print('1|1|http://127.0.0.1:9', flush=True)\n"
        f"print({line!r}, file=sys.stderr, flush=True)\n"
        "print('[ERROR] after it', file=sys.stderr, flush=True)\n"
        "time.sleep(30)\n"
    )
    running = ProcessStrategy([sys.executable, "-c", program], line_limit=1000).start(LaunchContext("kv", HANDSHAKE, PLUGINS))
    try:
        after = record(records, "[ERROR] after it")
    finally:
        running.stop(0.5)

    pieces = [r for r in records.records if r.name == NAME and r is not after]
    assert [len(r.getMessage()) for r in pieces] == [1000, 1000, len(line) - 2000]
    assert {r.levelno for r in pieces} == {logging.INFO}
    assert after.levelno == logging.ERROR  # the line after the pieces is whole again


@pytest.mark.parametrize(
    "line",
    ["{", "{" + "[" * 100000, '{"@message": 5, "@level": "error"}', "[]", "[ERROR"],
)
def test_malformed_records_are_plain_info_lines(line):
    assert logs.parse(line) == (logging.INFO, line)


def test_a_record_with_an_unknown_level_is_info():
    assert logs.parse('{"@message": "m", "@level": ["error"]}') == (logging.INFO, "m")
    assert logs.parse('{"@message": "m", "@level": "loud", "@module": "x"}') == (logging.INFO, "x: m")


def test_a_host_with_pythons_default_logging_shows_a_handlers_traceback_and_warnings_not_info():
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "logging_host.py")], env=ENV, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout == "caller got: internal: internal error\n"
    assert "connectplugin.server: unhandled error in /kv.v1.KVService/Get\nTraceback (most recent call last):" in done.stderr
    assert "RuntimeError: the handler broke" in done.stderr
    assert "kvtest: a warning line" in done.stderr
    assert "an info line" not in done.stderr
