"""A local attacker with no credentials: scans loopback for our servers, then calls everything.

``python -m tests.attacker PID...`` looks at the loopback TCP ports the given processes
listen on (read from ``/proc``, so the scan stays on the servers a test started and never
touches anyone else's), keeps those answering ``/healthz`` with ``Server: connectplugin``,
and calls every procedure of every public connectplugin service, and of the sample KV
service, on each with no credentials at all. It prints one JSON object:
``{"servers": [url, ...], "calls": {url: {procedure: code}}}``, where ``code`` is the
Connect error code of the answer, or ``"ok"`` when a call went through.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

from connectplugin.gen.connectplugin.health.v1.health_connect import HEALTH_SERVICE
from connectplugin.gen.connectplugin.v1 import (
    broker_connect,
    handshake_connect,
    lifecycle_connect,
    plugininfo_connect,
    registry_connect,
)
from samples.kv.gen.kv.v1.kv_connect import KV_SERVICE

SERVICES = [
    HEALTH_SERVICE,
    handshake_connect.HANDSHAKE_SERVICE,
    lifecycle_connect.PLUGIN_CONTROL_SERVICE,
    lifecycle_connect.PLUGIN_LIFECYCLE_SERVICE,
    plugininfo_connect.PLUGIN_IDENTITY_SERVICE,
    registry_connect.SERVICE_REGISTRY_SERVICE,
    broker_connect.CAPABILITY_BROKER_SERVICE,
    KV_SERVICE,
]
TIMEOUT = 2.0
"""Seconds per connection and per answer: every server here is local."""


def listening_ports(pids: list[int]) -> list[int]:
    """Loopback ports in LISTEN state whose sockets belong to one of ``pids``."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            address, state, inode = fields[1], fields[3], fields[9]
            ip_hex, port_hex = address.split(":")
            loopback = socket.inet_ntoa(struct.pack("<I", int(ip_hex, 16))).startswith("127.")
            if state == "0A" and loopback and inode in inodes:
                ports.add(int(port_hex, 16))
    return sorted(ports)


def http(port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict, bytes]:
    """One HTTP/1.1 exchange on a fresh connection: status, headers (lower-cased), body."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head += f"Content-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    raw_head, _, payload = reply.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    if fields.get("transfer-encoding") == "chunked":
        payload = unchunk(payload)
    return status, fields, payload


def unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def call(port: int, path: str, streaming: bool) -> str:
    """Call one procedure with an empty message and no credentials; the answer's code."""
    if streaming:
        status, fields, body = http(port, "POST", path, {"Content-Type": "application/connect+proto"}, b"\0\0\0\0\0")
        if status != 200:
            return error_code(status, fields, body)
        # The end-of-stream message is the last envelope: flags 0x02, then JSON.
        pos, end = 0, None
        while pos + 5 <= len(body):
            flags, size = body[pos], int.from_bytes(body[pos + 1 : pos + 5], "big")
            if flags & 0x02:
                end = json.loads(body[pos + 5 : pos + 5 + size] or b"{}")
            pos += 5 + size
        if end is None:
            return f"http {status}, no end of stream"
        return end.get("error", {}).get("code", "ok")
    status, fields, body = http(port, "POST", path, {"Content-Type": "application/proto"})
    return "ok" if status == 200 else error_code(status, fields, body)


def error_code(status: int, fields: dict, body: bytes) -> str:
    """The code of a Connect error answered with an HTTP error status (a JSON body)."""
    if fields.get("content-type", "").startswith("application/json"):
        return json.loads(body).get("code", f"http {status}")
    return f"http {status}"


def main() -> None:
    ports = listening_ports([int(pid) for pid in sys.argv[1:]])
    servers = []
    for port in ports:
        try:
            _, fields, _ = http(port, "GET", "/healthz", {})
        except OSError:
            continue
        if fields.get("server") == "connectplugin":
            servers.append(port)
    calls = {
        f"http://127.0.0.1:{port}": {
            method.path: call(port, method.path, method.server_streaming)
            for service in SERVICES
            for method in service.methods.values()
        }
        for port in servers
    }
    print(json.dumps({"servers": [f"http://127.0.0.1:{p}" for p in servers], "calls": calls}))


if __name__ == "__main__":
    main()
