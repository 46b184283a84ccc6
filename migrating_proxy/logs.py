"""structlog set-up: JSON lines in production, readable console output on a terminal.

Logs go to stderr so that stdout stays pure data for `--json` commands. A redaction processor
blanks any field whose name says it is a secret, as a second line of defence: the code itself
never passes passwords or SASL payloads to the logger.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

SECRET_FIELDS = {"password", "passwd", "pass", "secret", "sasl", "token", "credentials", "key"}


def redact_secrets(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for name in list(event):
        if name.lower() in SECRET_FIELDS:
            event[name] = "[redacted]"
    return event


def configure(format: str = "auto", level: str = "info") -> None:
    if format == "auto":
        format = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer() if format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library (imapclient, uvicorn, SQLAlchemy...):
    # their warnings become events of this log, not plain-text lines in a JSON log.
    root = logging.getLogger()
    root.handlers = [_LibraryLogs()]
    root.setLevel(logging.WARNING)


class _LibraryLogs(logging.Handler):
    """One `library_log` event per standard-library record. An exception is named by its type
    only: its text (a driver's, a server's) may hold what must never reach a log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a library's malformed format string
            message = str(record.msg)
        fields: dict[str, Any] = {"logger": record.name, "message": message}
        if record.exc_info and record.exc_info[0] is not None:
            fields["error"] = record.exc_info[0].__name__
        structlog.get_logger().log(record.levelno, "library_log", **fields)


def forward_twisted_logs() -> None:
    """Twisted's own errors (an unhandled Deferred failure, say) into the same log stream."""
    from twisted.logger import LogLevel, formatEvent, globalLogBeginner

    log = structlog.get_logger("twisted")

    def observer(event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if level in (LogLevel.error, LogLevel.critical) or "log_failure" in event:
            failure = event.get("log_failure")
            log.error("twisted_error", message=formatEvent(event),
                      error=failure.getErrorMessage() if failure else None,
                      traceback=failure.getTraceback() if failure else None)
        elif level == LogLevel.warn:
            log.warning("twisted_warning", message=formatEvent(event))

    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
