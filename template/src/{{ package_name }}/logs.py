"""Logging: every line of the process, uvicorn's included, through one handler on stdout, as
text or one JSON object per line (LOG_FORMAT), with the id of the request it belongs to."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from asgi_correlation_id import CorrelationIdFilter
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from .config import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s] %(message)s"
# Loggers that uvicorn configures with handlers of its own.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
# Database drivers log bound parameters or connection details at DEBUG (aiosqlite logs every
# call with its arguments): they stay at WARNING whatever LOG_LEVEL says.
DRIVER_LOGGERS = ("aiosqlite", "asyncpg", "psycopg")


class ServiceHandler(logging.StreamHandler[TextIO]):
    """The one handler the service installs on the root logger."""


def configure_logging(settings: Settings) -> None:
    """Install the service's handler on the root logger (replacing an earlier one, leaving
    others alone) and route uvicorn's loggers through it."""
    handler = ServiceHandler(sys.stdout)
    # The request id of the request being served (api: X-Request-ID), "-" outside requests.
    handler.addFilter(CorrelationIdFilter(default_value="-"))
    if settings.log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "{levelname}{name}{message}{correlation_id}",
                style="{",
                rename_fields={
                    "levelname": "level",
                    "name": "logger",
                    "correlation_id": "request_id",
                },
                timestamp="time",
                # uvicorn adds a copy of its message with terminal colour codes.
                reserved_attrs=[*RESERVED_ATTRS, "color_message"],
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    # The handler's level too: records of loggers with a level of their own (uvicorn's)
    # reach it whatever the root logger's level is.
    handler.setLevel(settings.log_level)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, ServiceHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        # LOG_LEVEL decides, not uvicorn's --log-level.
        logger.setLevel(logging.NOTSET)
        # Only loggers uvicorn gave a handler: `--no-access-log` leaves uvicorn.access
        # without one, and it stays silent.
        if logger.handlers:
            logger.handlers.clear()
            logger.propagate = True
    for name in DRIVER_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
