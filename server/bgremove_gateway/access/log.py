"""The access log: one line per request, and nothing in it that came from the image.

A line carries exactly: the time (the log record's), the caller's key id, the peer address, the
method, the status, bytes in, bytes out, latency and the trace id. Never a key, a file name, a
content type, an option or an error message: messages may quote what the caller sent.
"""

from __future__ import annotations

import contextvars
import logging
import time

import grpc
from opentelemetry import trace

from bgremove_gateway.runtime import metrics

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


class Access:
    """Collects one request's figures; done() writes its line, once.

    The peer and trace id are read when the call starts: done() may run after the call has ended,
    when its context must no longer be touched."""

    def __init__(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        started: float | None = None,
        *,
        code: grpc.StatusCode = grpc.StatusCode.OK,
        key: str | None = None,  # None: the caller the access control admitted this call under
    ) -> None:
        self.method = method
        self.peer = _peer(context)
        self.trace_id = _trace_id()
        self.started = time.perf_counter() if started is None else started
        self.bytes_in = 0
        self.bytes_out = 0
        self.code = code
        remaining = _time_remaining(context)
        self.deadline = None if remaining is None else time.monotonic() + remaining
        self.key = caller.get() if key is None else key
        # Metric labels only (never logged): set once the request's options were validated.
        self.output_format = metrics.NO_LABEL
        self.model = metrics.NO_LABEL
        self._written = False
        metrics.call_started(method)

    def ended_by_caller(self) -> None:
        """The call ended under us: past its deadline, or cancelled or dropped by the caller."""
        late = self.deadline is not None and time.monotonic() >= self.deadline
        self.code = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED

    def done(self) -> None:
        if self._written:
            return
        self._written = True
        seconds = time.perf_counter() - self.started
        fields = {
            "key": self.key,
            "peer": self.peer,
            "method": self.method,
            "status": self.code.name,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "latency_ms": round(seconds * 1000, 1),
            "trace_id": self.trace_id,
        }
        access_log.info(
            "key=%s peer=%s method=%s status=%s bytes_in=%d bytes_out=%d latency_ms=%.1f trace_id=%s",
            *fields.values(),
            extra={"fields": fields},  # the JSON log format's keys (runtime/logs.py)
        )
        metrics.call_ended(
            metrics.CallRecord(
                self.method,
                self.code.name,
                self.output_format,
                self.model,
                seconds,
                self.bytes_in,
                self.bytes_out,
                self.trace_id,
            )
        )


def _peer(context: grpc.aio.ServicerContext) -> str:
    try:
        return str(context.peer())
    except Exception:  # a call already gone has no peer to report
        return "-"


def _time_remaining(context: grpc.aio.ServicerContext) -> float | None:
    try:
        remaining = context.time_remaining()
    except Exception:
        return None
    return None if remaining is None else float(remaining)
