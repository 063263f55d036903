"""A logger plugin: provides the ``logger`` service (``capability.logger.v1.Logger``) to other plugins."""

from __future__ import annotations

import logging

from connectplugin import Context, ServeConfig, ServiceDeclaration, serve
from connectplugin.gen.capability.logger.v1 import logger_pb2
from connectplugin.gen.capability.logger.v1.logger_connect import LOGGER_PLUGIN, LoggerHandler
from samples.platform import HANDSHAKE
from samples.platform.capabilities import LEVELS

log = logging.getLogger("logger-plugin")


class Logger(LoggerHandler):
    """Writes each entry to this process's log, tagged with the calling plugin."""

    def log(self, request: logger_pb2.LogRequest, ctx: Context) -> logger_pb2.LogResponse:
        caller = ctx.request_headers.get("x-plugin-caller-id", "?")
        fields = " ".join(f"{k}={v}" for k, v in sorted(request.fields.items()))
        log.log(LEVELS.get(request.level, logging.INFO), "[%s] %s %s", caller, request.message, fields)
        return logger_pb2.LogResponse()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    serve(
        {"logger": LOGGER_PLUGIN},
        {"logger": Logger()},
        handshake=HANDSHAKE,
        config=ServeConfig(
            self_id="logger",
            self_version="1.0.0",
            provides=[ServiceDeclaration(service_type="logger", version="1.0.0", path=LOGGER_PLUGIN.service_path)],
        ),
    )


if __name__ == "__main__":
    main()
