"""Security: what an attacker on the same machine can and cannot do to a host and its plugins."""

from __future__ import annotations

import logging

import pytest
import requests

from tests.helpers import in_process

# --- resource bounds (sec-bounds) -------------------------------------------------------------


class Reached:
    """Stands in for an in-process provider's app: counts the calls the router let through."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, environ, start_response):
        self.calls += 1
        start_response("200 OK", [("Content-Type", "application/proto"), ("Content-Length", "0")])
        return [b""]


def _routed(host, peer, provider=None):
    """A caller's credentials and the URL of ``Get`` of an in-process provider, through the router."""
    client = host.launch(in_process("p", "svc"), name="p")
    if provider is not None:
        host.router.attach_local(host.runtime_id(client), provider)
    caller = peer(host, "caller")
    return caller.credentials(), host.url + caller.discover("svc").endpoint_url + "/Get"


UNARY = {"Content-Type": "application/proto"}
STREAM = {"Content-Type": "application/connect+proto"}


@pytest.mark.parametrize(
    "headers, code",
    [
        ({**UNARY, "Connect-Timeout-Ms": "1234567890123"}, "invalid_argument"),
        ({**UNARY, "Connect-Timeout-Ms": "99999999999999999999999999999"}, "invalid_argument"),
        ({**UNARY, "Connect-Timeout-Ms": "-1"}, "invalid_argument"),
        ({**UNARY, "Connect-Timeout-Ms": "1e3"}, "invalid_argument"),
        ({**UNARY, "Connect-Protocol-Version": "2"}, "invalid_argument"),
        ({**UNARY, "Content-Encoding": "br"}, "unimplemented"),
        ({**STREAM, "Connect-Timeout-Ms": "12345678901"}, "invalid_argument"),
        ({**STREAM, "Connect-Content-Encoding": "zstd"}, "unimplemented"),
    ],
)
def test_router_refuses_bad_connect_headers_as_the_server_would(host, peer, caplog, headers, code):
    provider = Reached()
    credentials, url = _routed(host, peer, provider)

    with caplog.at_level(logging.ERROR):
        response = requests.post(url, headers={**credentials, **headers}, data=b"", timeout=10)

    if headers["Content-Type"] == STREAM["Content-Type"]:
        assert response.status_code == 200  # a stream's error is its end-of-stream message
        assert f'"code":"{code}"'.encode() in response.content
    else:
        assert response.json()["code"] == code
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert provider.calls == 0


def test_router_relays_a_well_formed_call(host, peer):
    provider = Reached()
    credentials, url = _routed(host, peer, provider)

    response = requests.post(url, headers={**credentials, **UNARY, "Connect-Timeout-Ms": "5000"}, timeout=10)

    assert (response.status_code, provider.calls) == (200, 1)


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/connect+xml", ""])
def test_router_answers_415_for_a_content_type_connect_does_not_know(host, peer, content_type):
    provider = Reached()
    credentials, url = _routed(host, peer, provider)

    response = requests.post(url, headers={**credentials, "Content-Type": content_type}, data=b"", timeout=10)

    assert (response.status_code, provider.calls) == (415, 0)


def test_router_refuses_a_body_over_the_read_limit_before_reading_it(host, peer):
    provider = Reached()
    credentials, url = _routed(host, peer, provider)
    too_big = host.router.read_limit + 1

    response = requests.post(url, headers={**credentials, **UNARY}, data=b"\0" * too_big, timeout=10)

    assert (response.json()["code"], provider.calls) == ("resource_exhausted", 0)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_router_answers_405_for_methods_connect_does_not_use(host, peer, method):
    provider = Reached()
    credentials, url = _routed(host, peer, provider)

    response = requests.request(method, url, headers={**credentials, **UNARY}, data=b"", timeout=10)

    assert (response.status_code, provider.calls) == (405, 0)
