"""One view that hands a request to the current process's host as a WSGI call."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.http import HttpRequest, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from . import plugins


@csrf_exempt  # Connect calls carry bearer tokens, not cookies; a CSRF token means nothing here
def host_endpoint(request: HttpRequest, path: str) -> StreamingHttpResponse:
    """Run the host's WSGI app on this request, its path the part below the include's prefix."""
    environ = dict(request.META)
    prefix = request.path_info[: len(request.path_info) - len(path)].rstrip("/")
    environ["SCRIPT_NAME"] = request.META.get("SCRIPT_NAME", "") + prefix
    environ["PATH_INFO"] = "/" + path
    # Django reads the body lazily through the request; nothing has read it for this view.
    environ["wsgi.input"] = request
    started: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        started[:] = [status, headers]

    body: Iterable[bytes] = plugins().host().app(environ, start_response)
    if not started:  # a WSGI app may start its response on the first chunk (streams do)
        iterator = iter(body)
        first = next(iterator, b"")
        body = _chain(first, iterator, body)
    status, headers = started
    code, _, reason = status.partition(" ")
    response = StreamingHttpResponse(body, status=int(code), reason=reason or None)
    for name, value in headers:
        response[name] = value
    return response


def _chain(first: bytes, rest: Any, original: Iterable[bytes]) -> Iterable[bytes]:
    try:
        yield first
        yield from rest
    finally:
        close = getattr(original, "close", None)
        if close is not None:
            close()
