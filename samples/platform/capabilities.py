"""The host's own capability in the samples: ``capability.logger.v1.Logger`` into the host's logging."""

from __future__ import annotations

import logging

from connectplugin import Context
from connectplugin.gen.capability.logger.v1 import logger_pb2
from connectplugin.gen.capability.logger.v1.logger_connect import LoggerHandler

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


class HostLogger(LoggerHandler):
    """Plugins holding a grant write here; entries land in the host's ``plugins`` logger."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger("plugins")
        self.entries: list[logger_pb2.LogRequest] = []

    def log(self, request: logger_pb2.LogRequest, ctx: Context) -> logger_pb2.LogResponse:
        self.entries.append(request)
        fields = " ".join(f"{k}={v}" for k, v in sorted(request.fields.items()))
        self._log.log(LEVELS.get(request.level, logging.INFO), "%s %s", request.message, fields)
        return logger_pb2.LogResponse()
