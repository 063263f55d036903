"""Plugin logs as the host sees them: one JSON object per stderr line, with its level.

A plugin our host launched writes each log record on stderr as one line of JSON with
hclog's keys, the ones go-plugin's host reads: ``{"@level": "error", "@message": "...",
"@module": "connectplugin.server", "@timestamp": "..."}``; a record's traceback is part of
its message. The host re-emits each such line at its level under the logger
``connectplugin.plugin.<name>``. Lines without that structure (``print()``, a crash's
traceback, a program's own logging format) are logged at INFO, except that a ``[LEVEL]``
prefix (``[TRACE]`` ``[DEBUG]`` ``[INFO]`` ``[WARN]`` ``[WARNING]`` ``[ERROR]``
``[CRITICAL]`` ``[FATAL]``) gives the level, as go-plugin does.

``serve()`` sets this up only when the program has not configured logging itself (the root
logger has no handler) and only for a plugin a host launched: a program's own logging
configuration is never replaced. Such a program keeps its levels on the host by starting
its format with ``[%(levelname)s]``.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import IO

TRACE = 5
"""Below DEBUG: hclog's and go-plugin's trace level."""

_LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}
_NAMES = {TRACE: "trace", logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
          logging.ERROR: "error", logging.CRITICAL: "critical"}


class JSONLineFormatter(logging.Formatter):
    """A record as one line of JSON with hclog's keys; its traceback joins the message."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            message += "\n" + self.formatStack(record.stack_info)
        level = max((n for n in _NAMES if n <= record.levelno), default=TRACE)
        when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        return json.dumps({
            "@level": _NAMES[level],
            "@message": message,
            "@module": record.name,
            "@timestamp": when.isoformat(timespec="microseconds"),
        })


def install(stream: IO[str]) -> bool:
    """Send this process's log records of INFO and above to ``stream`` as JSON lines, unless
    the program configured logging itself (the root logger has a handler): then change
    nothing and return False. A root level already below INFO is kept."""
    root = logging.getLogger()
    if root.handlers:
        return False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONLineFormatter())
    root.addHandler(handler)
    root.setLevel(min(root.level, logging.INFO))
    return True


def parse(line: str) -> tuple[int, str]:
    """The level and the message of one whole line a plugin wrote on stderr."""
    if line.startswith("{"):
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            entry = None
        if isinstance(entry, dict) and isinstance(entry.get("@message"), str):
            level = _LEVELS.get(str(entry.get("@level", "")).lower(), logging.INFO)
            module = entry.get("@module")
            message = entry["@message"]
            return level, f"{module}: {message}" if isinstance(module, str) and module else message
    if line.startswith("["):
        word, bracket, _ = line[1:].partition("]")
        if bracket and word.lower() in _LEVELS:
            return _LEVELS[word.lower()], line
    return logging.INFO, line
