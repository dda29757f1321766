"""Log setup that keeps image content out of the log at every level, DEBUG included, as text or
as JSON lines (--log-format).

Pillow logs each EXIF tag it parses, value and all (description, artist, GPS position...), on
the PIL.TiffImagePlugin logger at DEBUG, and its PNG and JPEG plugins log chunk and marker
details. Those loggers stay at WARNING whatever --log-level asks for.

JSON: one object a line, with time, level, logger and message, the trace_id and span_id of the
span current when the line was written, and a record's structured fields as keys of their own
(an access line's key, peer, method, status, bytes and latency: access/log.py). The stdlib's
logging with a small formatter: no dependency for what a dozen lines do.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

from opentelemetry import trace

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Libraries whose debug output quotes the data they parse.
CONTENT_LOGGERS = ("PIL",)
# The keys every JSON line has; a record's fields never replace them.
BASE_KEYS = frozenset({"time", "level", "logger", "message", "exception", "stack"})


class JsonFormatter(logging.Formatter):
    """A log record as one line of JSON (see the module's docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        line: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            line["trace_id"] = format(span.trace_id, "032x")
            line["span_id"] = format(span.span_id, "016x")
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            # An access line's trace id was read at the call's start and is kept; "-" means none.
            line.update(
                (k, v) for k, v in fields.items() if k not in BASE_KEYS and not (k == "trace_id" and v == "-")
            )
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def configure_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    for name in CONTENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
