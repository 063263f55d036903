"""``connectplugin``: call plugins, check their health, list a host's, run a host, generate code.

One console script with a subcommand each (``python -m connectplugin`` too). Exit status: 0
done, 1 the call or check failed (the Connect code and message on stderr), 2 a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from ..codegen import __main__ as codegen
from ..gen.connectplugin.health.v1 import health_pb2
from ..gen.connectplugin.health.v1.health_connect import HealthServiceClient
from ..rpc._transport import ConnectionPool, TransportError
from ..rpc.client import DEFAULT_TIMEOUT, Client, ClientConfig
from ..rpc.errors import Code, ConnectError
from ..rpc.httpserver import PlaintextRefusedError, is_loopback
from ..rpc.service import Method
from ..rpc.tls import KeyPair, TLSConfig, Trust
from ..runtime.health import ServingStatus, status_from_wire
from ..runtime.launcher import LaunchError
from . import hostfile

PROG = "connectplugin"
TOKEN_ENV = "CONNECTPLUGIN_TOKEN"
"""Where ``list`` finds the operator token when ``--token`` is not given."""


class UsageError(Exception):
    """What the user asked for cannot be done as asked: exit status 2, the message on stderr."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except UsageError as e:
        print(f"{PROG} {args.command}: {e}", file=sys.stderr)
        return 2
    except ConnectError as e:
        print(f"{PROG} {args.command}: {e.code.value}: {e.message}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader (head, a closed pipe) went away: not our failure
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:  # Ctrl-C during a call or a stream: the shell's convention
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Call Connect services and plugins, check their health, list a host's "
        "plugins, run a host from a TOML file, generate code from .proto files.",
        epilog="Exit status: 0 success, 1 the call or check failed (its Connect code and "
        "message on stderr), 2 a usage error. 'connectplugin COMMAND --help' tells more.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                       help="a request header (repeatable)")
    group.add_argument("--cacert", type=Path, help="PEM CA certificates to verify an https:// server "
                       "against (default: the system's)")
    group.add_argument("--cert", type=Path, help="PEM client certificate, for servers asking for one (mTLS)")
    group.add_argument("--key", type=Path, help="PEM private key of --cert")
    group.add_argument("--timeout", type=float, metavar="SECONDS",
                       help="deadline of the call (default: 30 s for unary calls, none for streams)")

    call = commands.add_parser(
        "call", parents=[connection], help="call a method with a JSON request, print the JSON answer",
        description="Call SERVICE/METHOD at URL with a proto3 JSON request and print the answer as "
        "JSON: one line per message, a server stream's messages as they arrive. The message types "
        "come from a generated module (--module) or from .proto files compiled now (--proto, "
        "needs grpcio-tools: pip install 'connectplugin[codegen]').",
        epilog="example: connectplugin call http://127.0.0.1:8080 kv.v1.KVService/Get "
        "'{\"key\": \"a\"}' --module myapp.gen.kv.v1.kv_pb2",
    )
    call.add_argument("url", help="the server's base URL (the procedure path is appended)")
    call.add_argument("procedure", metavar="SERVICE/METHOD",
                      help="fully qualified service and method, e.g. kv.v1.KVService/Get")
    call.add_argument("request", nargs="?", default="{}", metavar="JSON",
                      help="the request as proto3 JSON (default {}); - reads it from stdin")
    types = call.add_mutually_exclusive_group(required=True)
    types.add_argument("--module", action="append", default=[], metavar="MODULE",
                       help="import this generated module (_pb2 or _connect) for the types (repeatable)")
    types.add_argument("--proto", action="append", default=[], type=Path, metavar="FILE",
                       help="compile this .proto file for the types (repeatable)")
    call.add_argument("-I", "--proto-path", action="append", default=[], type=Path, metavar="DIR",
                      help="where --proto files and their imports are found (default: each file's directory)")
    call.set_defaults(run=_call)

    health = commands.add_parser(
        "health", parents=[connection], help="check a plugin's (or host's) health; exit 0 only when serving",
        description="Ask the HealthService at URL how SERVICE (default: the whole server) is and "
        "print the status. A host has no HealthService: for it, its /readyz probe answers. Exit "
        "status 0 only when SERVING, so scripts can wait on it.",
    )
    health.add_argument("url", help="the plugin's or host's base URL")
    health.add_argument("service", nargs="?", default="", help="a service name (default: the whole server)")
    health.set_defaults(run=_health)

    listing = commands.add_parser(
        "list", parents=[connection], help="list a host's plugins, their services, versions and health",
        description="Print the plugins the host at HOST_URL launched or admitted, the services "
        f"each provides and their health. The host answers operators only: give one of its "
        f"operator tokens (HostConfig.operator_tokens) with --token or in ${TOKEN_ENV}.",
    )
    listing.add_argument("url", metavar="HOST_URL", help="the host's URL")
    listing.add_argument("--token", help=f"an operator token of the host (default: ${TOKEN_ENV}); "
                         "a token on the command line is visible to other local users, prefer the variable")
    listing.add_argument("--json", action="store_true", help="print the host's JSON as it is")
    listing.set_defaults(run=_list)

    host = commands.add_parser(
        "host", help="run a host from a TOML file until SIGTERM or SIGINT",
        description="Start a host as CONFIG describes (handshake, listening address, TLS, join "
        "tokens, the plugins to launch and their restart policy; README 'Running a host from a "
        "file'), print its URL and each launched plugin, and serve until SIGTERM or SIGINT, which "
        "stop the plugins and the host (exit status 0). SIGHUP reads the file of revoked client "
        "certificates ([host.http.tls] revoked) again.",
    )
    host.add_argument("config", type=Path, help="the host's TOML file")
    host.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                      help="the host's and its plugins' log records shown on stderr (default INFO)")
    host.set_defaults(run=_host)

    codegen_parser = commands.add_parser(
        "codegen", help="generate messages, typed clients, handler bases and plugin definitions",
        description=codegen.DESCRIPTION,
    )
    codegen.add_arguments(codegen_parser)
    codegen_parser.set_defaults(run=lambda args: codegen.run(args, codegen_parser))
    return parser


# --- connection options ------------------------------------------------------------------------


def _client_config(args: argparse.Namespace, **fields: Any) -> ClientConfig:
    headers = {}
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"-H {header!r}: a header is 'NAME: VALUE'")
        headers[name.strip()] = value.strip()
    if (args.cert is None) != (args.key is None):
        raise UsageError("--cert and --key go together")
    tls = None
    if args.cacert or args.cert:
        try:
            tls = TLSConfig(
                key_pair=KeyPair.from_files(args.cert, args.key) if args.cert else None,
                trust=Trust.from_files(cas=args.cacert) if args.cacert else None,
            )
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load the TLS files: {e}") from None
    return ClientConfig(headers=headers, tls=tls, **fields)


def _connect(args: argparse.Namespace, url: str, **fields: Any) -> Client:
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"{url!r} is not an http:// or https:// URL")
    return Client(url.rstrip("/"), _client_config(args, **fields))


# --- call ----------------------------------------------------------------------------------------


def _call(args: argparse.Namespace) -> int:
    service_name, sep, method_name = args.procedure.strip("/").partition("/")
    if not sep or not service_name or not method_name or "/" in method_name:
        raise UsageError(f"{args.procedure!r} is not SERVICE/METHOD (e.g. kv.v1.KVService/Get)")
    pool = _pool_of_modules(args.module) if args.module else _pool_of_protos(args.proto, args.proto_path)
    method = _method(pool, service_name, method_name)
    text = sys.stdin.read() if args.request == "-" else args.request
    request = method.input()
    try:
        json_format.Parse(text, request)
    except json_format.ParseError as e:
        raise UsageError(f"the request is not a {method.input.DESCRIPTOR.full_name} in JSON: {e}") from None
    client = _connect(args, args.url)
    try:
        if not method.server_streaming:
            _print(client.call_unary(method, request, timeout=args.timeout))
            return 0
        with client.call_server_stream(method, request, timeout=args.timeout) as stream:
            for message in stream:
                _print(message)
        return 0
    finally:
        client.close()


def _print(message: Message) -> None:
    print(json_format.MessageToJson(message, indent=None), flush=True)


def _pool_of_modules(modules: Sequence[str]) -> descriptor_pool.DescriptorPool:
    # As ``python -m`` would: the user's generated package is found from where they stand.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UsageError(f"--module {name}: {e}") from None
    return descriptor_pool.Default()


def _pool_of_protos(files: Sequence[Path], paths: Sequence[Path]) -> descriptor_pool.DescriptorPool:
    """A pool with ``files`` and what they import, compiled by grpc_tools' protoc."""
    try:
        from grpc_tools import protoc  # type: ignore[import-untyped]
    except ImportError:
        raise UsageError("--proto needs grpcio-tools: pip install 'connectplugin[codegen]'") from None
    includes = [p.resolve() for p in paths] or sorted({f.resolve().parent for f in files})
    with tempfile.TemporaryDirectory(prefix="connectplugin-call-") as scratch:
        out = Path(scratch, "descriptors.pb")
        command = [
            sys.executable, "-m", "grpc_tools.protoc",
            *(f"--proto_path={p}" for p in includes),
            f"--proto_path={Path(protoc.__file__).parent / '_proto'}",
            "--include_imports", f"--descriptor_set_out={out}",
            *(str(f.resolve()) for f in files),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise UsageError(f"protoc could not compile {', '.join(map(str, files))}:\n{done.stderr.strip()}")
        descriptors = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in descriptors.file:
        pool.Add(file)
    return pool


def _method(pool: descriptor_pool.DescriptorPool, service_name: str, method_name: str) -> Method[Any, Any]:
    try:
        service: ServiceDescriptor = pool.FindServiceByName(service_name)
    except KeyError:
        raise UsageError(f"no service {service_name!r} in the given types") from None
    found: MethodDescriptor | None = service.methods_by_name.get(method_name)
    if found is None:
        raise UsageError(
            f"{service_name} has no method {method_name!r}; it has {', '.join(service.methods_by_name)}"
        )
    if found.client_streaming:
        raise UsageError(f"{service_name}/{method_name} is client streaming; only unary and server-streaming calls are made")
    return Method(
        service=service.full_name,
        name=found.name,
        input=message_factory.GetMessageClass(found.input_type),
        output=message_factory.GetMessageClass(found.output_type),
        server_streaming=found.server_streaming,
    )


# --- health --------------------------------------------------------------------------------------


def _health(args: argparse.Namespace) -> int:
    client = _connect(args, args.url, timeout=args.timeout or ClientConfig.timeout)
    try:
        try:
            response = HealthServiceClient(client).check(health_pb2.HealthCheckRequest(service=args.service))
            status, where = status_from_wire(response.status), ""
        except ConnectError as e:
            # A host serves no HealthService (an unknown path is unimplemented): ask its probe.
            if e.code is not Code.UNIMPLEMENTED or args.service:
                raise
            status, where = _readyz(args), " (the host's /readyz)"
    finally:
        client.close()
    print(f"{status.name}{where}")
    return 0 if status is ServingStatus.SERVING else 1


def _readyz(args: argparse.Namespace) -> ServingStatus:
    """The host's readiness probe: 200 is SERVING, any other answer NOT_SERVING."""
    return ServingStatus.SERVING if _get(args, "/readyz")[0] == 200 else ServingStatus.NOT_SERVING


# --- host ----------------------------------------------------------------------------------------


def _host(args: argparse.Namespace) -> int:
    try:
        described = hostfile.load(args.config)
    except hostfile.HostFileError as e:
        raise UsageError(str(e)) from None
    # Plugin output arrives as records under connectplugin.plugin.<name>, at its own level.
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        hostfile.run(described, out=lambda line: print(line, flush=True))
    except LaunchError as e:
        print(f"{PROG} host: {e}", file=sys.stderr)
        return 1
    except PlaintextRefusedError as e:
        raise UsageError(
            f"{args.config}: [host.http] host = {e.host!r} is not a loopback address, where plaintext is refused: "
            "serve TLS there (a [host.http.tls] table with cert and key), or set behind_tls_proxy = true "
            "when a TLS-terminating proxy is in front"
        ) from None
    except (KeyboardInterrupt, SystemExit):  # SIGINT, SIGTERM: the with block stopped everything
        print("host stopped", flush=True)
    return 0


# --- list ----------------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(TOKEN_ENV, "")
    if not token:
        raise UsageError(f"an operator token is needed: --token or the environment variable {TOKEN_ENV}")
    host = urlsplit(args.url).hostname or ""
    if args.url.startswith("http://") and not is_loopback(host):
        print(f"{PROG} list: warning: the operator token crosses the network to {host} in clear; use https",
              file=sys.stderr)
    status, body = _get(args, "/plugins", {"Authorization": f"Bearer {token}"})
    if status != 200:
        code = _HTTP_CODES.get(status, Code.UNKNOWN)
        text = body.decode(errors="replace").strip()
        raise ConnectError(code, f"{args.url.rstrip('/')}/plugins answered {status}: {text}")
    plugins = json.loads(body)["plugins"]
    if args.json:
        print(json.dumps(plugins, indent=2))
        return 0
    rows = [("PLUGIN", "SELF ID", "VERSION", "HEALTH", "LAUNCHED", "SERVICES")]
    for p in plugins:
        services = ", ".join(f"{s['service_type']} {s['version']}".strip() for s in p["services"])
        rows.append((p["name"], p["self_id"], p["version"] or "-", p["health"], "yes" if p["launched"] else "no",
                     services or "-"))
    widths = [max(len(row[n]) for row in rows) for n in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


# How list reads a refusal of /plugins.
_HTTP_CODES = {401: Code.UNAUTHENTICATED, 403: Code.PERMISSION_DENIED, 404: Code.UNIMPLEMENTED}


def _get(args: argparse.Namespace, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """A plain GET of ``URL + path`` with the connection options (a probe, the inventory):
    its status and body, on the transport the other commands' calls take."""
    if not args.url.startswith(("http://", "https://")):
        raise UsageError(f"{args.url!r} is not an http:// or https:// URL")
    config = _client_config(args)
    url = args.url.rstrip("/")
    timeout: float = args.timeout or DEFAULT_TIMEOUT
    pool = ConnectionPool(url, 1, config.tls)
    try:
        response = pool.send(
            "GET", path, {**config.headers, **(headers or {})}, None, min(config.connect_timeout, timeout), timeout,
            deadline=time.monotonic() + timeout,
        )
        try:
            chunks = []
            while chunk := response.read(65536):
                chunks.append(chunk)
        finally:
            response.close()
    except TransportError as e:
        raise ConnectError(Code.UNAVAILABLE, f"cannot reach {url}: {e.reason}") from None
    finally:
        pool.close()
    return response.status, b"".join(chunks)
