"""OpenTelemetry setup shared by the CLI and the gateway, driven only by the standard OTEL_* variables.

Tracing is on when an OTLP endpoint is configured and neither OTEL_SDK_DISABLED nor
OTEL_TRACES_EXPORTER=none turns it off. Spans go over OTLP/HTTP (protobuf), the one protocol the
gateway, the CLI and Triton's own exporter all speak, so one collector address serves all three.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.environment_variables import OTEL_TRACES_EXPORTER
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
    OTEL_SDK_DISABLED,
)
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)

_FLUSH_TIMEOUT_MS = 5_000


def otlp_traces_url(env: Mapping[str, str] | None = None) -> str | None:
    """The OTLP/HTTP traces URL that configure_tracing exports to, or None when tracing is off.

    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is used as is; OTEL_EXPORTER_OTLP_ENDPOINT gets "/v1/traces"
    appended, as the OTLP specification says. The gateway points its embedded Triton here.
    """
    env = os.environ if env is None else env
    if not _enabled(env):
        return None
    if url := env.get(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "").strip():
        return url
    if base := env.get(OTEL_EXPORTER_OTLP_ENDPOINT, "").strip():
        return f"{base.rstrip('/')}/v1/traces"
    return None


def configure_tracing(service_name: str, *, set_global: bool = True) -> TracerProvider | None:
    """An SDK TracerProvider exporting to otlp_traces_url() in batches, or None when tracing is off.

    service_name is the default service.name: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win.
    With set_global (the default) the provider becomes the process-wide one that the OpenTelemetry
    API hands out; when None is returned the API stays a no-op.
    """
    url = otlp_traces_url()
    if url is None:
        return None
    protocol = os.environ.get(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL) or os.environ.get(
        OTEL_EXPORTER_OTLP_PROTOCOL
    )
    if protocol and protocol.strip() != "http/protobuf":
        log.warning(
            "OTLP protocol %r is not supported; exporting spans with http/protobuf to %s", protocol, url
        )
    # Resource.create lets its argument override the environment; detecting the environment again
    # and merging it last restores the documented precedence of OTEL_SERVICE_NAME over our default.
    resource = Resource.create({SERVICE_NAME: service_name}).merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def shutdown_tracing(provider: TracerProvider | None) -> None:
    """Exports the spans still queued, then stops the provider; a no-op for None."""
    if provider is None:
        return
    provider.force_flush(_FLUSH_TIMEOUT_MS)
    provider.shutdown()


def _enabled(env: Mapping[str, str]) -> bool:
    if env.get(OTEL_SDK_DISABLED, "").strip().lower() == "true":
        return False
    exporters = {name.strip().lower() for name in (env.get(OTEL_TRACES_EXPORTER) or "otlp").split(",")}
    if "otlp" in exporters:
        return True
    if exporters - {"none", ""}:
        log.warning("OTEL_TRACES_EXPORTER=%s: only 'otlp' is supported; tracing is off", ",".join(exporters))
    return False
