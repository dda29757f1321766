"""The SDK half of bgremove.tracing: imported only once tracing is on, since the OpenTelemetry SDK
and OTLP exporter come with bgremove-client's `tracing` extra (the server always has them)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import requests
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

# A short-lived process (the CLI) gives each export this long, retries included, so a collector
# that is down or silent costs it about a second instead of the exporter's default 10 s.
SHORT_LIVED_EXPORT_TIMEOUT_S = 1.0


def make_provider(
    service_name: str, url: str, *, short_lived: bool
) -> tuple[TracerProvider, ShortLivedExporter | None]:
    """A provider exporting to url in batches, and for short_lived its exporter (see below)."""
    # Resource.create lets its argument override the environment; detecting the environment again
    # and merging it last restores the documented precedence of OTEL_SERVICE_NAME over our default.
    resource = Resource.create({SERVICE_NAME: service_name}).merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)
    if not short_lived:
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        return provider, None
    exporter = ShortLivedExporter(url)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider, exporter


class ShortLivedExporter(SpanExporter):
    """OTLP export for a process on its way out: each export bounded by SHORT_LIVED_EXPORT_TIMEOUT_S;
    once one has failed while closing, the spans still queued are dropped rather than tried again;
    summary() is the one line that says how many spans were lost and why."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.closing = False
        self.lost = 0
        self._failed = False
        self._lock = threading.Lock()
        self._reason: str | None = None
        self._inner = OTLPSpanExporter(
            endpoint=url, timeout=SHORT_LIVED_EXPORT_TIMEOUT_S, session=self._recording_session()
        )

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not (self.closing and self._failed):
            result = self._inner.export(spans)
            if result is SpanExportResult.SUCCESS:
                return result
        self._failed = True
        self.lost += len(spans)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self._inner.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._inner.force_flush(timeout_millis)

    def summary(self) -> str | None:
        if not self.lost:
            return None
        spans = "span was" if self.lost == 1 else "spans were"
        reason = self._reason or "the export failed"
        return f"tracing: {self.lost} {spans} not exported to {self.url}: {reason}"

    def _note(self, reason: str) -> None:
        with self._lock:
            self._reason = self._reason or reason

    def _recording_session(self) -> requests.Session:
        """The exporter's HTTP session, noting the first failure's cause: the exporter itself
        reports only that an export failed, and logs its reasons, which a short-lived process mutes."""
        session = requests.Session()
        send = session.request

        def request(*args: Any, **kwargs: Any) -> requests.Response:
            try:
                response = send(*args, **kwargs)
            except Exception as error:
                self._note(_describe(error))
                raise
            if response.status_code >= 400:
                self._note(f"the collector answered HTTP {response.status_code} {response.reason}")
            return response

        session.request = request  # type: ignore[method-assign]
        return session


def _describe(error: BaseException) -> str:
    """The cause in the OS's words ("Connection refused", "no answer within 1 s"), found under the
    layers requests and urllib3 wrap it in."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, TimeoutError | requests.Timeout) or "Timeout" in type(current).__name__:
            return f"no answer within {SHORT_LIVED_EXPORT_TIMEOUT_S:g} s"
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        stack.extend([current.__cause__, current.__context__])
        if isinstance(reason := getattr(current, "reason", None), BaseException):
            stack.append(reason)
        stack.extend(arg for arg in current.args if isinstance(arg, BaseException))
    return type(error).__name__
