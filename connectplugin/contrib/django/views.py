"""One view that hands a request to the current process's host as a WSGI call."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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
    written: list[bytes] = []  # what the app passed to WSGI's write(), sent before its next chunk

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started[:] = [status, headers]
        return written.append

    chunks = _relay(plugins().host().app(environ, start_response), written)
    first = b""
    if not started:  # a WSGI app may start its response on the first chunk (streams do)
        first = next(chunks, b"")
    status, headers = started
    code, _, reason = status.partition(" ")
    response = StreamingHttpResponse(_prepend(first, chunks), status=int(code), reason=reason or None)
    for name, value in headers:
        response[name] = value
    return response


def _relay(body: Iterable[bytes], written: list[bytes]) -> Iterator[bytes]:
    try:
        for chunk in body:
            if written:
                yield b"".join(written)
                written.clear()
            yield chunk
        if written:
            yield b"".join(written)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    try:
        if first:
            yield first
        yield from rest
    finally:
        rest.close()  # type: ignore[attr-defined]
