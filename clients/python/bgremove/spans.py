"""The client span around each call, and the W3C trace context it hands to the server.

Only the OpenTelemetry API is used: without a configured SDK every call here is a no-op. Attributes
are sizes, media types and status codes; never file names or image content.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from bgremove.channel import __version__
from bgremove.errors import BgRemoveError

SERVICE = "bgremove.v1.BackgroundRemoval"


@dataclass
class CallTrace:
    span: trace.Span
    # Headers to send as gRPC metadata (traceparent, tracestate, ...).
    carrier: dict[str, str] = field(default_factory=dict)


def get_tracer(provider: trace.TracerProvider | None) -> trace.Tracer:
    return trace.get_tracer("bgremove.client", __version__, tracer_provider=provider)


@contextmanager
def client_span(
    tracer: trace.Tracer, method: str, attributes: dict[str, str | int] | None = None
) -> Iterator[CallTrace]:
    """A CLIENT span named like gRPC's own instrumentation ("package.Service/Method").

    On a BgRemoveError the span records the gRPC status code, but not the message: the span leaves
    this process, and a message is the server's words, which the span does not need.
    """
    with tracer.start_as_current_span(
        f"{SERVICE}/{method}",
        kind=SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method, **(attributes or {})},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        call = CallTrace(span)
        propagate.inject(call.carrier)
        try:
            yield call
        except BgRemoveError as error:
            _set_code(span, error.code)
            raise
        except BaseException as error:
            # Cancelled (Ctrl-C, task cancellation) or a local failure: no gRPC status to report.
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            raise
        else:
            _set_code(span, grpc.StatusCode.OK)


def _set_code(span: trace.Span, code: grpc.StatusCode) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
