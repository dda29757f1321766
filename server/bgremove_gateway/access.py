"""The access log: one line per request, and nothing in it that came from the image.

A line carries exactly: the time (the log record's), the caller's key id, the peer address, the
method, the status, bytes in, bytes out, latency and the trace id. Never a key, a file name, a
content type, an option or an error message: messages may quote what the caller sent.
"""

from __future__ import annotations

import contextvars
import logging
import time
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace

access_log = logging.getLogger("bgremove.access")

ANONYMOUS = "-"
# The key id the access control admitted this call under; set per call, read by the servicer.
caller: contextvars.ContextVar[str] = contextvars.ContextVar("bgremove_caller", default=ANONYMOUS)

FIELDS = ("key", "peer", "method", "status", "bytes_in", "bytes_out", "latency_ms", "trace_id")


def _trace_id() -> str:
    span_ctx = trace.get_current_span().get_span_context()
    return format(span_ctx.trace_id, "032x") if span_ctx.is_valid else "-"


def short_method(full_method: str) -> str:
    """ "/bgremove.v1.BackgroundRemoval/RemoveBackground" -> "RemoveBackground"."""
    return full_method.rsplit("/", 1)[-1] or full_method


@dataclass
class Access:
    """Collects one request's figures; done() writes its line."""

    method: str
    context: grpc.aio.ServicerContext
    started: float = field(default_factory=time.perf_counter)
    bytes_in: int = 0
    bytes_out: int = 0
    code: grpc.StatusCode = grpc.StatusCode.OK
    key: str | None = None  # None: the caller the access control admitted

    def done(self) -> None:
        access_log.info(
            "key=%s peer=%s method=%s status=%s bytes_in=%d bytes_out=%d latency_ms=%.1f trace_id=%s",
            self.key if self.key is not None else caller.get(),
            self.context.peer(),
            self.method,
            self.code.name,
            self.bytes_in,
            self.bytes_out,
            (time.perf_counter() - self.started) * 1000,
            _trace_id(),
        )
