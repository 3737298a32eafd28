"""Log lines: text for a terminal, or one JSON object a line for a log collector
(``ORGWALLET_LOG_FORMAT=json``). Either way every line of the process (ours, uvicorn's access and
error logs, Python's warnings) goes through one handler on standard error, and carries the id
of the request it belongs to (``X-Request-ID``, set by ``RequestIdMiddleware``).

The request id is read when the line is written: logging is synchronous, so that is in the
context of the code that logged, where ``request_id_var`` holds the request's id."""

from __future__ import annotations

import logging
import logging.config
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import orjson

from orgwallet.services.audit import request_id_var

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def _request_id(record: logging.LogRecord) -> str | None:
    given: str | None = getattr(record, "request_id", None)
    return given or request_id_var.get()


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``: the request id is ``-`` outside a request."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.request_id = _request_id(record) or "-"
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, message, request_id, and
    the exception's traceback as one string field when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": _request_id(record),
        }
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


class StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to standard error as it is when a line is written, like logging's last resort:
    a runner that swaps ``sys.stderr`` for a while (a test's) leaves no closed stream behind."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # always sys.stderr


def log_config(log_format: LogFormat, level: str = "INFO") -> dict[str, Any]:
    """The ``logging.config.dictConfig`` of a process: the root's one handler, and uvicorn's
    loggers sent to it (uvicorn applies this in each of its worker processes: ``log_config``)."""
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    # uvicorn's own loggers keep their levels; they lose their handlers and reach the root's.
    through_root = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"orgwallet": {"()": formatter}},
        "handlers": {"stderr": {"()": StderrHandler, "formatter": "orgwallet"}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            "uvicorn": {**through_root, "level": level},
            "uvicorn.error": through_root,
            "uvicorn.access": through_root,
            # Chatty at INFO: a line per plugin at every start; initdb's and pg_ctl's output.
            "alembic.runtime.plugins": {"level": "WARNING"},
            "pgserver": {"level": "WARNING"},
            # A line per HTTP request the process makes (Stripe, the bench's own calls).
            "httpx": {"level": "WARNING"},
        },
    }


def configure_logging(log_format: LogFormat, level: str = "INFO") -> None:
    """Sets up logging for a command of ``orgwallet`` (``serve`` passes the same to uvicorn)."""
    logging.config.dictConfig(log_config(log_format, level))
    logging.captureWarnings(True)  # a warning is a line like any other (JSON when asked)
