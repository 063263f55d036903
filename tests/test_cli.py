"""The command line: the README's quick start as a new user runs it, and ``connectplugin``."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from connectplugin import (
    App,
    CertificateIdentity,
    Code,
    ConnectError,
    HandshakeConfig,
    Health,
    HealthState,
    HTTPConfig,
    HTTPServer,
    JoinToken,
    OperatorToken,
    ProcessStrategy,
    Rate,
    ServingStatus,
)
from connectplugin.cli import hostfile
from connectplugin.host.metrics import MetricsConfig
from connectplugin.rpc import tls
from connectplugin.runtime.health import HealthService
from samples.kv import plugin as kv_plugin
from samples.kv.gen.kv.v1 import kv_pb2
from tests.helpers import ENV, free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    """This venv's scripts first on PATH, nothing of the checkout on PYTHONPATH: the suite's
    venv has the checkout installed (``pip install -e``), which maps ``connectplugin`` only."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra}


# --- The README quick start, from an empty directory ------------------------------------------


def _quick_start(heading: str = "## Quick start") -> tuple[dict[str, str], list[str]]:
    """The files (path -> text) and shell commands of a README section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    files, commands = {}, []
    for lang, body in re.findall(r"^```(\w+)\n(.*?)^```$", section, re.MULTILINE | re.DOTALL):
        if lang == "sh":
            commands += [line for line in body.splitlines() if line.strip()]
        elif lang != "text":  # the first line names the file: "# greeter.py: ..." or "// proto/x.proto: ..."
            first = body.splitlines()[0]
            name = re.match(r"(?:#|//) ([\w./]+)", first)
            assert name, f"a {lang} block in the quick start names no file: {first!r}"
            files[name.group(1)] = body
    return files, commands


def test_readme_quick_start_runs_in_an_empty_directory(tmp_path):
    files, commands = _quick_start()
    assert set(files) == {"proto/greet/v1/greet.proto", "greeter.py", "host.py"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    outputs = []
    for command in commands:
        command, _, comment = command.partition("#")
        result = subprocess.run(
            command, shell=True, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}"
        expected = comment.strip().removeprefix("prints:").strip() if "prints:" in comment else None
        outputs.append((result.stdout.strip(), expected))
    assert [out for out, expected in outputs if expected] == [e for _, e in outputs if e]
    assert any(expected for _, expected in outputs), "the quick start shows no output to check"
    # The Flask section's app, beside the quick start's files, answers through the plugin.
    flask_files, _ = _quick_start("## Flask")
    (tmp_path / "app.py").write_text(flask_files["app.py"])
    served = subprocess.run(
        [sys.executable, "-c", "from app import app; print(app.test_client().get('/hello/world').text)"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert (served.returncode, served.stdout) == (0, "Hello, world!\n"), served.stderr
    # What ran came from the directory and the installed package, not from the checkout.
    probe = subprocess.run(
        [sys.executable, "-c", "import samples"], cwd=tmp_path, env=_env(), capture_output=True
    )
    assert probe.returncode != 0


def test_make_demo_runs_with_automatic_mtls_on():
    planned = subprocess.run(["make", "-n", "demo", "AUTO_MTLS=1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    done = subprocess.run(
        [sys.executable, "-m", "samples.demo", "--auto-mtls"], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=90,
    )

    assert "-m samples.demo --auto-mtls" in planned.stdout, planned.stdout + planned.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"launched kv plugin: pid \d+, serving at https://127\.0\.0\.1:\d+\n", done.stdout), done.stdout
    assert re.search(r"start: logger at https://\S+ -> cache at https://", done.stdout), done.stdout


def _until_it_does(command: str, cwd: Path, env: dict[str, str], expected: tuple[int, str | None, str]) -> None:
    """Run a shell command until it exits with the status, prints the stdout (None: any) and
    says the part of stderr ``expected`` names: what it does once the processes it asks are up."""
    got: list[Any] = []

    def done() -> bool:
        ran = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
        got[:] = [ran.returncode, ran.stdout.strip(), ran.stderr]
        status, out, error = expected
        return ran.returncode == status and out in (None, got[1]) and error in ran.stderr

    wait_until(done, lambda: f"{command!r} to do as the README says; got {got}", timeout=30)


def test_readme_model_b_walkthrough_runs_as_written(tmp_path):
    quick_files, quick_commands = _quick_start()
    files, commands = _quick_start("#### Trying Model B on one machine")
    section = (ROOT / "README.md").read_text().split("\n#### Trying Model B on one machine\n", 1)[1]
    table = re.search(r"^```text\n(.*?)^```$", section, re.MULTILINE | re.DOTALL).group(1)  # type: ignore[union-attr]
    assert set(files) == {"host.toml", "joiner.py"}
    port = str(free_port())  # the README's 8443 may be taken here
    for name, text in {**quick_files, **files}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text.replace("8443", port))
    [codegen] = [c for c in quick_commands if c.startswith("connectplugin codegen")]
    subprocess.run(codegen, shell=True, cwd=tmp_path, env=_env(), check=True, capture_output=True, timeout=60)
    env, background = _env(), []
    try:
        for line in commands:
            command, _, comment = line.replace("8443", port).partition("#")
            command, comment = command.strip(), comment.strip()
            if re.fullmatch(r'export \w+=.*|\w+="[^"]*"', command):  # a variable for the lines below
                shown = subprocess.run(
                    ["bash", "-c", f"set -a; {command}; env -0"], env=env, capture_output=True, text=True, timeout=60
                )
                env = dict(item.split("=", 1) for item in shown.stdout.split("\0") if item)
            elif command.endswith("&"):
                process = subprocess.Popen(
                    ["bash", "-c", f"exec {command[:-1]}"], cwd=tmp_path, env=env, text=True,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                )
                background.append((process, _Lines(process.stdout), _Lines(process.stderr)))
                if comment.startswith("prints:"):
                    background[-1][1].wait_for(comment.removeprefix("prints:").strip())
            else:
                # (exit status, stdout or None: any, a part of stderr) as the line's comment says
                expected: tuple[int, str | None, str] = (0, None, "")
                if comment.startswith("fails:"):
                    expected = (1, None, comment.removeprefix("fails:").strip())
                elif comment.startswith("prints:"):
                    expected = (0, comment.removeprefix("prints:").strip(), "")
                elif "connectplugin list" in command:
                    expected = (0, table.strip(), "")
                _until_it_does(command, tmp_path, env, expected)
    finally:
        for process, out, errors in background:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
            out.join()
            errors.join()
    host, joiner = background
    assert (host[0].returncode, host[1].lines[-1]) == (0, "host stopped\n"), "".join(host[2].lines)
    assert "through its client certificate (greet)" in "".join(host[2].lines)
    assert joiner[0].returncode == 0, "".join(joiner[2].lines)


# --- connectplugin call --------------------------------------------------------------------------

KV_MODULE = ["--module", "samples.kv.gen.kv.v1.kv_pb2"]


def connectplugin(*args: str, timeout: float = 60, **run: Any) -> subprocess.CompletedProcess[str]:
    """Run the installed ``connectplugin`` command in the checkout (where ``samples`` imports)."""
    run.setdefault("env", _env())
    return subprocess.run(["connectplugin", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, **run)


def test_call_sends_the_json_request_and_prints_the_json_answer(kv, url):
    put = connectplugin("call", url, "kv.v1.KVService/Put", '{"key": "a", "value": "MQ=="}', *KV_MODULE)
    got = connectplugin("call", url, "/kv.v1.KVService/Get", '{"key": "a"}', *KV_MODULE)

    assert (put.returncode, put.stdout, put.stderr) == (0, "{}\n", "")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == {"value": "MQ==", "found": True}


def test_call_prints_a_server_stream_one_line_per_message_as_they_arrive(kv, url):
    second = threading.Event()

    def watch(request, ctx):
        yield kv_pb2.WatchEvent(type=kv_pb2.EVENT_TYPE_PUT, key=f"{request.prefix}1")
        second.wait(30)
        yield kv_pb2.WatchEvent(type=kv_pb2.EVENT_TYPE_DELETE, key=f"{request.prefix}2")

    kv.script("watch", watch)
    with subprocess.Popen(
        ["connectplugin", "call", url, "kv.v1.KVService/Watch", '{"prefix": "p/"}', *KV_MODULE],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as process:
        assert process.stdout is not None
        first = process.stdout.readline()  # printed while the stream is still open
        second.set()
        rest, errors = process.communicate(timeout=30)

    assert json.loads(first) == {"type": "EVENT_TYPE_PUT", "key": "p/1"}
    assert [json.loads(line) for line in rest.splitlines()] == [{"type": "EVENT_TYPE_DELETE", "key": "p/2"}]
    assert (process.returncode, errors) == (0, "")


def test_call_sends_the_headers_given_with_h(kv, url):
    done = connectplugin("call", url, "kv.v1.KVService/Get", '{"key": "k"}', *KV_MODULE, "-H", "X-Trace: abc 1")

    assert done.returncode == 0, done.stderr
    assert kv.last.headers["x-trace"] == "abc 1"


def test_a_failed_call_exits_1_with_the_connect_code_and_message_on_stderr(kv, url):
    def get(request, ctx):
        raise ConnectError(Code.FAILED_PRECONDITION, "the store is read-only")

    kv.script("get", get)
    done = connectplugin("call", url, "kv.v1.KVService/Get", '{"key": "k"}', *KV_MODULE)

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "connectplugin call: failed_precondition: the store is read-only\n"


def test_a_call_to_nothing_listening_exits_1_unavailable():
    done = connectplugin("call", f"http://127.0.0.1:{free_port()}", "kv.v1.KVService/Get", '{"key": "k"}', *KV_MODULE)

    assert done.returncode == 1
    assert done.stderr.startswith("connectplugin call: unavailable: ")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["kv.v1.KVService/Fetch", "{}"], "has no method 'Fetch'"),
        (["kv.v1.Nope/Get", "{}"], "no service 'kv.v1.Nope'"),
        (["kv.v1.KVService", "{}"], "is not SERVICE/METHOD"),
        (["kv.v1.KVService/Get", '{"key": 3'], "is not a kv.v1.GetRequest in JSON"),
        (["kv.v1.KVService/Get", '{"nope": 1}'], "is not a kv.v1.GetRequest in JSON"),
    ],
)
def test_a_call_asked_wrongly_exits_2_saying_why(url, args, says):
    done = connectplugin("call", url, *args, *KV_MODULE)

    assert done.returncode == 2
    assert says in done.stderr


def test_call_without_message_types_is_a_usage_error(url):
    done = connectplugin("call", url, "kv.v1.KVService/Get")

    assert done.returncode == 2
    assert "one of the arguments --module --proto is required" in done.stderr


def test_call_compiles_proto_files_for_the_message_types(kv, url):
    proto = ROOT / "samples" / "kv" / "proto"
    done = connectplugin(
        "call", url, "kv.v1.KVService/Get", '{"key": "k"}', "--proto", str(proto / "kv" / "v1" / "kv.proto"),
        "-I", str(proto),
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {}
    assert kv.last.request == kv_pb2.GetRequest(key="k")


@pytest.mark.parametrize("server_kind", ["tls"], indirect=True)
def test_call_verifies_an_https_server_against_cacert(kv, url, ca_file):
    trusted = connectplugin("call", url, "kv.v1.KVService/Get", '{"key": "k"}', *KV_MODULE, "--cacert", ca_file)
    untrusted = connectplugin("call", url, "kv.v1.KVService/Get", '{"key": "k"}', *KV_MODULE)

    assert (trusted.returncode, trusted.stderr) == (0, "")
    assert untrusted.returncode == 1
    assert "unavailable" in untrusted.stderr


# --- connectplugin health ------------------------------------------------------------------------


@pytest.fixture
def health(serve) -> tuple[Health, str]:
    """A HealthService over a Health, on a real server (as a plugin serves it to its host)."""
    state = Health()
    state.set_service("kv.v1.KVService", ServingStatus.SERVING)
    return state, serve(App([HealthService(state)])).url


def test_health_of_a_serving_server_prints_serving_and_exits_0(health):
    _, url = health
    whole, service = connectplugin("health", url), connectplugin("health", url, "kv.v1.KVService")

    assert (whole.returncode, whole.stdout) == (0, "SERVING\n")
    assert (service.returncode, service.stdout) == (0, "SERVING\n")


def test_health_of_an_unhealthy_server_prints_not_serving_and_exits_1(health):
    state, url = health
    state.set(HealthState.UNHEALTHY, reason="disk full")
    done = connectplugin("health", url)

    assert (done.returncode, done.stdout) == (1, "NOT_SERVING\n")


def test_health_of_an_unknown_service_exits_1_with_the_servers_answer(health):
    _, url = health
    done = connectplugin("health", url, "nope.v1.Nope")

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "connectplugin health: not_found: unknown service 'nope.v1.Nope'\n"


def test_health_of_a_host_asks_its_readiness_probe(host):
    done = connectplugin("health", host.url)

    assert (done.returncode, done.stdout) == (0, "SERVING (the host's /readyz)\n")


def test_health_of_nothing_listening_exits_1():
    done = connectplugin("health", f"http://127.0.0.1:{free_port()}")

    assert done.returncode == 1
    assert done.stderr.startswith("connectplugin health: unavailable: ")


# --- connectplugin host --------------------------------------------------------------------------

HOST_FILE = """\
[handshake]
magic_cookie_key = "CONNECTPLUGIN_PLATFORM"
magic_cookie_value = "5e0b7d2c-platform-sample"
app_protocol_versions = [1]

[host]
stop_grace = 2.0

[host.http]
port = 0
threads = 4

[[host.operator_tokens]]
secret_env = "CLI_TEST_OPERATOR_TOKEN"

[plugins.kv]
command = [{python}, "-m", "tests.platform_plugins.provider", "--type", "kv", "--version", "1.2.0"]
cwd = {root}
restart = {{ max_crashes = 3, window = 30.0 }}
"""


def _host_file(tmp_path: Path, text: str = HOST_FILE) -> Path:
    path = tmp_path / "host.toml"
    path.write_text(text.format(python=json.dumps(sys.executable), root=json.dumps(str(ROOT))))
    return path


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_host_runs_a_toml_files_plugins_until_a_signal_stops_them_all(tmp_path, signum):
    with subprocess.Popen(
        ["connectplugin", "host", str(_host_file(tmp_path))],
        cwd=tmp_path, env=_env(CLI_TEST_OPERATOR_TOKEN=OPERATOR), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        listening = process.stdout.readline()
        launched = process.stdout.readline()
        url = listening.removeprefix("host listening on ").strip()
        pid = int(re.search(r"\(pid (\d+)\)", launched).group(1))  # type: ignore[union-attr]
        assert url.startswith("http://127.0.0.1:"), listening + (process.stderr.read() if process.stderr else "")
        assert connectplugin("health", url).returncode == 0
        listed = connectplugin("list", url, "--json", env=_env(CONNECTPLUGIN_TOKEN=OPERATOR))
        process.send_signal(signum)
        out, errors = process.communicate(timeout=30)

    assert launched.startswith("plugin kv launched at http://127.0.0.1:")
    assert "(restarted when it crashes)" in launched
    assert (process.returncode, out) == (0, "host stopped\n"), errors
    assert "INFO connectplugin.host: launched kv" in errors  # the host's log, on stderr
    assert listed.returncode == 0, listed.stderr
    [kv] = json.loads(listed.stdout)
    assert (kv["name"], kv["launched"], kv["health"]) == ("kv", True, "HEALTHY")
    assert [(s["service_type"], s["version"], s["health"]) for s in kv["services"]] == [("kv", "1.2.0", "HEALTHY")]
    wait_until(lambda: not _alive(pid), "the plugin to exit with its host", timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (("port = 0", "prot = 0"), "[host.http]: unknown key 'prot'; known: "),
        (("threads = 4", 'threads = "four"'), "host.http.threads: must be a int, not 'four'"),
        (("stop_grace = 2.0", "clock = 1"), "host.clock: cannot be set from a file"),
        (('magic_cookie_value = "5e0b7d2c-platform-sample"\n', ""), "[handshake]: missing: magic_cookie_value"),
        (("[plugins.kv]", "[plugins.kv.x]"), "[plugins.kv]: unknown key 'x'"),
        (("max_crashes = 3", "max_crashes = 0"), "[plugins.kv.restart]: RestartPolicy: max_crashes"),
        (("app_protocol_versions = [1]", "app_protocol_versions = [1"), "not TOML"),
    ],
)
def test_a_host_file_written_wrongly_exits_2_naming_the_key(tmp_path, change, says):
    done = connectplugin(
        "host", str(_host_file(tmp_path, HOST_FILE.replace(*change))), env=_env(CLI_TEST_OPERATOR_TOKEN=OPERATOR)
    )

    assert (done.returncode, done.stdout) == (2, "")
    assert says in done.stderr


def test_a_host_file_serving_plaintext_off_loopback_exits_2_saying_how_to_serve_tls(tmp_path):
    text = HOST_FILE.replace("port = 0\n", 'host = "0.0.0.0"\nport = 0\n')
    done = connectplugin("host", str(_host_file(tmp_path, text)), env=_env(CLI_TEST_OPERATOR_TOKEN=OPERATOR))

    assert (done.returncode, done.stdout) == (2, "")
    assert "[host.http] host = '0.0.0.0' is not a loopback address" in done.stderr
    assert "[host.http.tls] table with cert and key), or set behind_tls_proxy = true" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_host_file_behind_a_tls_proxy_serves_plaintext_off_loopback_and_warns(tmp_path):
    text = HOST_FILE.replace("port = 0\n", 'host = "0.0.0.0"\nport = 0\nbehind_tls_proxy = true\n')
    text = text.split("[plugins.kv]")[0]
    with subprocess.Popen(
        ["connectplugin", "host", str(_host_file(tmp_path, text))],
        cwd=tmp_path, env=_env(CLI_TEST_OPERATOR_TOKEN=OPERATOR), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        listening = process.stdout.readline()
        process.send_signal(signal.SIGTERM)
        out, errors = process.communicate(timeout=30)

    assert listening.startswith("host listening on http://0.0.0.0:"), listening + errors
    assert "WARNING connectplugin.httpserver: serving plaintext HTTP on 0.0.0.0" in errors
    assert (process.returncode, out) == (0, "host stopped\n"), errors


def test_a_host_file_secret_comes_from_the_environment_it_names(tmp_path):
    text = HOST_FILE + '\n[[host.join_tokens]]\nsecret_env = "CLI_TEST_JOIN_TOKEN"\nservice_types = ["kv"]\n'
    done = connectplugin("host", str(_host_file(tmp_path, text)), env=_env(CLI_TEST_OPERATOR_TOKEN=OPERATOR))

    assert done.returncode == 2
    assert "host.join_tokens[0].secret_env: the environment variable CLI_TEST_JOIN_TOKEN is not set" in done.stderr


def test_the_readme_host_file_reads_as_the_configs_it_names(tmp_path, pki, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n### Running a host from a file\n", 1)[1]
    text = re.search(r"^```toml\n(.*?)^```$", section, re.MULTILINE | re.DOTALL).group(1)  # type: ignore[union-attr]
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "host.pem").write_bytes(pki.host.certificate_pem())
    (tmp_path / "pki" / "host-key.pem").write_bytes(pki.host.private_key_pem())
    (tmp_path / "pki" / "ca.pem").write_bytes(pki.ca.certificate_pem())
    (tmp_path / "pki" / "revoked.txt").write_text(f"{pki.plugins['other'].fingerprint}\n")
    (tmp_path / "host.toml").write_text(text)
    monkeypatch.setenv("KV_JOIN_TOKEN", "k" * 32)
    monkeypatch.setenv("OPERATOR_TOKEN", "o" * 32)

    described = hostfile.load(tmp_path / "host.toml")

    assert described.handshake == HandshakeConfig("CONNECTPLUGIN_KV", "8c1f2a4e-kv-sample", (1,))
    assert (described.host.stop_grace, described.host.handshake_rate) == (5.0, Rate(2.0, 20))
    http = described.host.http
    assert (http.host, http.port, http.threads) == ("0.0.0.0", 8443, 16)
    assert http.tls is not None and http.tls.key_pair is not None and http.tls.trust is not None
    assert http.tls.key_pair.fingerprint == pki.host.fingerprint
    assert http.tls.trust.cas == (pki.ca.certificate,)
    assert list(http.tls.trust.revoked) == [pki.plugins["other"].fingerprint]
    assert described.revoked == tmp_path / "pki" / "revoked.txt"
    assert described.host.join_tokens == (JoinToken("k" * 32, ("kv",), "kv-joiners"),)
    assert described.host.certificate_identities == (CertificateIdentity("reporter", ("reports",)),)
    assert described.host.operator_tokens == (OperatorToken("o" * 32),)
    assert described.host.metrics == MetricsConfig()
    [kv] = described.plugins
    assert (kv.name, tuple(kv.strategy.command), kv.strategy.env) == (
        "kv", ("python3", "-m", "samples.kv"), {"KV_LOG": "debug"}
    )
    assert kv.strategy.cwd == str(tmp_path)
    assert kv.restart is not None
    assert (kv.restart.max_crashes, kv.restart.window, kv.restart.backoff.max_backoff) == (5, 60.0, 30.0)


CERTIFICATE_HOST_FILE = """\
[handshake]
magic_cookie_key = "CONNECTPLUGIN_PLATFORM"
magic_cookie_value = "5e0b7d2c-platform-sample"
app_protocol_versions = [1]

[host.http]
port = 0
threads = 4

[host.http.tls]
cert = "pki/host.pem"
key = "pki/host-key.pem"
client_ca = "pki/ca.pem"

[[host.certificate_identities]]
self_id = "kv"
service_types = ["kv"]

[[host.operator_tokens]]
secret_env = "CLI_TEST_OPERATOR_TOKEN"
"""


def test_a_host_file_admits_a_joiner_by_its_certificate_identity(tmp_path, pki):
    pki.write(tmp_path / "pki")
    (tmp_path / "host.toml").write_text(CERTIFICATE_HOST_FILE)
    listing = ["--json", "--cacert", str(tmp_path / "pki" / "ca.pem")]
    listing += ["--cert", str(tmp_path / "pki" / "other.pem"), "--key", str(tmp_path / "pki" / "other-key.pem")]
    with subprocess.Popen(
        ["connectplugin", "host", str(tmp_path / "host.toml")],
        cwd=tmp_path, env=_env(CLI_TEST_OPERATOR_TOKEN=OPERATOR), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        listening = process.stdout.readline()
        url = listening.removeprefix("host listening on ").strip()
        assert url.startswith("https://127.0.0.1:"), listening + (process.stderr.read() if process.stderr else "")
        # The joiner presents kv.pem (self id kv, from the CA of client_ca) and no join token.
        joiner = subprocess.Popen(
            [sys.executable, "-m", "tests.platform_plugins.provider", "--type", "kv", "--host-url", url,
             "--pki", str(tmp_path / "pki")],
            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            def joined() -> bool:
                listed = connectplugin("list", url, *listing, env=_env(CONNECTPLUGIN_TOKEN=OPERATOR))
                return listed.returncode == 0 and bool(json.loads(listed.stdout))

            wait_until(joined, "the joiner to be listed", timeout=30)
            listed = connectplugin("list", url, *listing, env=_env(CONNECTPLUGIN_TOKEN=OPERATOR))
        finally:
            joiner.terminate()
            joiner.wait(timeout=30)
        process.send_signal(signal.SIGTERM)
        out, errors = process.communicate(timeout=30)

    [kv] = json.loads(listed.stdout)
    assert (kv["launched"], [s["service_type"] for s in kv["services"]]) == (False, ["kv"]), listed.stdout
    assert (process.returncode, out) == (0, "host stopped\n"), errors


def _colons(fingerprint: str) -> str:
    """A fingerprint as ``openssl x509 -fingerprint -sha256`` prints it."""
    return "sha256 Fingerprint=" + ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()


def _readyz_over_tls(url: str, pki_dir: Path, name: str) -> str:
    """``ok``, or the TLS error a client with ``name``'s certificate gets at ``url``."""
    config = tls.TLSConfig(
        key_pair=tls.KeyPair.from_files(pki_dir / f"{name}.pem", pki_dir / f"{name}-key.pem"),
        trust=tls.Trust.from_files(cas=pki_dir / "ca.pem"),
    )
    host, port = url.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        try:
            with tls.client_context(config).wrap_socket(raw, server_hostname=host) as sock:
                with contextlib.suppress(ssl.SSLEOFError):  # refused: the alert is there to read
                    sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
                return "ok" if sock.recv(100).startswith(b"HTTP/1.1 200") else "not ready"
        except ssl.SSLError as e:
            return str(e)


class _Lines:
    """The lines a process writes to a pipe, collected by a thread as they come."""

    def __init__(self, pipe: Any) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=lambda: self.lines.extend(pipe), daemon=True)
        self._thread.start()

    def wait_for(self, text: str) -> str:
        wait_until(lambda: any(text in line for line in self.lines), f"a line saying {text!r}", timeout=30)
        return next(line for line in self.lines if text in line)

    def join(self) -> None:
        self._thread.join(timeout=30)


def test_the_revoked_file_of_a_host_file_is_read_again_on_sighup(tmp_path, pki):
    pki.write(tmp_path / "pki")
    revoked = tmp_path / "pki" / "revoked.txt"
    revoked.write_text(f"# revoked 2026-11-30: the laptop was lost\n{_colons(pki.plugins['other'].fingerprint)}\n")
    (tmp_path / "host.toml").write_text(
        CERTIFICATE_HOST_FILE.replace('client_ca = "pki/ca.pem"\n', 'client_ca = "pki/ca.pem"\nrevoked = "pki/revoked.txt"\n')
    )
    with subprocess.Popen(
        ["connectplugin", "host", str(tmp_path / "host.toml")],
        cwd=tmp_path, env=_env(CLI_TEST_OPERATOR_TOKEN=OPERATOR), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    ) as process:
        out, errors = _Lines(process.stdout), _Lines(process.stderr)
        url = out.wait_for("host listening on ").removeprefix("host listening on ").strip()
        before = {name: _readyz_over_tls(url, tmp_path / "pki", name) for name in ("kv", "other")}

        # Now kv's certificate (PEM), and no longer other's.
        revoked.write_bytes(b"# kv's certificate\n" + pki.plugins["kv"].certificate_pem())
        process.send_signal(signal.SIGHUP)
        reread = out.wait_for("revoked certificates read again")
        after = {name: _readyz_over_tls(url, tmp_path / "pki", name) for name in ("kv", "other")}

        revoked.write_text("not a fingerprint\n")  # a mistake changes nothing
        process.send_signal(signal.SIGHUP)
        mistake = errors.wait_for("not read again")
        still = _readyz_over_tls(url, tmp_path / "pki", "kv")
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        out.join()
        errors.join()

    assert before["kv"] == "ok"
    assert "internal error" in before["other"], before  # by fingerprint alone: no reason given
    assert reread.strip().endswith(": 1 (1 new, 1 no longer)"), reread
    assert after["other"] == "ok"
    assert "certificate revoked" in after["kv"], after
    assert "line 1 is neither a PEM certificate nor a SHA-256 fingerprint" in mistake
    assert "certificate revoked" in still
    assert (process.returncode, out.lines[-1]) == (0, "host stopped\n"), "".join(errors.lines)


def test_a_reload_that_fails_unexpectedly_is_logged_and_the_next_sighup_reloads_still(caplog):
    """Its last line said on a closed stdout, say (BrokenPipeError): the thread that reloads
    used to end with it, and every later SIGHUP changed nothing, silently."""
    reloads: list[int] = []

    class Reloader:
        def reload(self) -> None:
            reloads.append(len(reloads))
            if len(reloads) == 1:
                raise BrokenPipeError(32, "Broken pipe")

    with hostfile._reloading_on_sighup(Reloader()):  # type: ignore[arg-type]  # only reload() is called
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: len(reloads) == 1, "the first reload", timeout=10)
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: len(reloads) == 2, "the second reload", timeout=10)

    assert "Broken pipe" in caplog.text


def test_a_revoked_file_lists_certificates_and_fingerprints_and_names_a_wrong_line(tmp_path, pki):
    path = tmp_path / "revoked.txt"
    path.write_bytes(
        f"{pki.plugins['kv'].fingerprint}  # as hex\n\n".encode()
        + pki.plugins["other"].certificate_pem()
        + f"{_colons(pki.host.fingerprint)}\n".encode()
    )
    listed = hostfile.read_revoked(path)
    path.write_text(f"{pki.host.fingerprint}\n# fine\n{pki.host.fingerprint[:-1]}\n")
    with pytest.raises(ValueError) as short:
        hostfile.read_revoked(path)

    assert listed == {
        pki.plugins["kv"].fingerprint: None,
        pki.plugins["other"].fingerprint: pki.plugins["other"].certificate,
        pki.host.fingerprint: None,
    }
    assert "line 3 is neither" in str(short.value)


def test_a_revoked_file_needs_client_certificates(tmp_path, pki):
    pki.write(tmp_path / "pki")
    (tmp_path / "pki" / "revoked.txt").write_text("")
    text = CERTIFICATE_HOST_FILE.replace('client_ca = "pki/ca.pem"\n', 'revoked = "pki/revoked.txt"\n')
    (tmp_path / "host.toml").write_text(text.split("[[host.certificate_identities]]")[0])

    with pytest.raises(hostfile.HostFileError) as refused:
        hostfile.load(tmp_path / "host.toml")

    assert "revoked needs client_ca" in str(refused.value)


# --- connectplugin list --------------------------------------------------------------------------

OPERATOR = "operator-token-for-the-cli-tests"


def test_list_prints_a_table_of_the_hosts_plugins(make_host):
    host = make_host(kv_plugin.HANDSHAKE, kv_plugin.PLUGINS, operator_tokens=[OperatorToken(OPERATOR)])
    host.launch(ProcessStrategy([sys.executable, "-m", "samples.kv"], cwd=str(ROOT)), name="kv")
    done = connectplugin("list", host.url, "--token", OPERATOR)

    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()
    assert header.split() == ["PLUGIN", "SELF", "ID", "VERSION", "HEALTH", "LAUNCHED", "SERVICES"]
    plugin, self_id, _, health, launched, *service = row.split()
    assert (plugin, self_id, health, launched, service) == ("kv", "kv-store", "HEALTHY", "yes", ["kv", "1.0.0"])


@pytest.mark.parametrize(
    ("token", "says"),
    [
        ("wrong-token-of-sufficient-length!", "an operator token (Authorization: Bearer ...) is required"),
        ("", "an operator token is needed: --token or the environment variable CONNECTPLUGIN_TOKEN"),
    ],
)
def test_list_refuses_without_the_operator_token(make_host, token, says):
    host = make_host(operator_tokens=[OperatorToken(OPERATOR)])
    done = connectplugin("list", host.url, *(["--token", token] if token else []))

    assert done.returncode == (1 if token else 2)
    assert says in done.stderr
    assert done.stdout == ""


def test_a_host_without_operator_tokens_lists_to_nobody(make_host):
    done = connectplugin("list", make_host().url, "--token", OPERATOR)

    assert done.returncode == 1
    assert "unauthenticated" in done.stderr and "HostConfig.operator_tokens" in done.stderr


def test_call_presents_a_client_certificate_to_a_server_that_requires_one(serve, kv, pki, tmp_path):
    pki.write(tmp_path)
    mtls = tls.TLSConfig(key_pair=pki.host, trust=tls.Trust(cas=(pki.ca.certificate,)))
    url = HTTPServer(App([kv]), HTTPConfig(tls=mtls)).start()
    try:
        args = ["call", url.url, "kv.v1.KVService/Get", '{"key": "k"}', *KV_MODULE, "--cacert", str(tmp_path / "ca.pem")]
        with_cert = connectplugin(*args, "--cert", str(tmp_path / "kv.pem"), "--key", str(tmp_path / "kv-key.pem"))
        without = connectplugin(*args)
    finally:
        url.close(grace=1.0)

    assert (with_cert.returncode, with_cert.stderr) == (0, "")
    assert without.returncode == 1
    assert "unavailable" in without.stderr


# --- the command itself --------------------------------------------------------------------------


def test_python_m_connectplugin_is_the_command_and_help_lists_the_subcommands():
    helped = subprocess.run(
        [sys.executable, "-m", "connectplugin", "--help"], env=_env(), capture_output=True, text=True, timeout=60
    )

    assert helped.returncode == 0
    for command in ("call", "health", "list", "host", "codegen"):
        assert f"\n    {command} " in helped.stdout
    assert "Exit status: 0 success, 1" in helped.stdout


@pytest.mark.parametrize("args", [[], ["nope"], ["call", "http://127.0.0.1:1"], ["health"]])
def test_usage_errors_exit_2(args):
    done = connectplugin(*args)

    assert done.returncode == 2
    assert done.stderr.startswith("usage: connectplugin")
