"""OpenTelemetry setup shared by the CLI and the gateway, driven only by the standard OTEL_* variables.

Tracing is on when an OTLP endpoint is configured and neither OTEL_SDK_DISABLED nor
OTEL_TRACES_EXPORTER=none turns it off. Spans go over OTLP/HTTP (protobuf), the one protocol the
gateway, the CLI and Triton's own exporter all speak, so one collector address serves all three.

Exporting needs the OpenTelemetry SDK and OTLP exporter, which bgremove-client installs only with its
`tracing` extra (the server always has them); without them configure_tracing warns once and tracing
stays off. Importing this module imports neither.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from bgremove._otlp import ShortLivedExporter

log = logging.getLogger(__name__)

# The variables' names, spelled out so that reading them needs no SDK.
OTEL_SDK_DISABLED = "OTEL_SDK_DISABLED"
OTEL_TRACES_EXPORTER = "OTEL_TRACES_EXPORTER"
OTEL_EXPORTER_OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
OTEL_EXPORTER_OTLP_PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
OTEL_EXPORTER_OTLP_TRACES_PROTOCOL = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"

_FLUSH_TIMEOUT_MS = 5_000
# The exporter's own warning on every failed attempt; a short-lived process says it once instead.
_EXPORTER_LOGGER = "opentelemetry.exporter.otlp"
_short_lived: weakref.WeakKeyDictionary[TracerProvider, ShortLivedExporter] = weakref.WeakKeyDictionary()


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


def configure_tracing(
    service_name: str, *, set_global: bool = True, short_lived: bool = False
) -> TracerProvider | None:
    """An SDK TracerProvider exporting to otlp_traces_url() in batches, or None when tracing is off.

    service_name is the default service.name: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win.
    With set_global (the default) the provider becomes the process-wide one that the OpenTelemetry
    API hands out; when None is returned the API stays a no-op.

    short_lived is for a command that exits once its work is done (the CLI): each export gives up
    after about a second, and instead of the exporter's log lines on every failed attempt,
    shutdown_tracing logs one warning that says how many spans were lost and why.
    """
    url = otlp_traces_url()
    if url is None:
        return None
    try:
        from bgremove._otlp import make_provider
    except ImportError as error:
        log.warning(
            "tracing: spans are not exported to %s: the OpenTelemetry SDK is not installed (no module "
            "%r); pip install 'bgremove-client[tracing]'",
            url,
            error.name,
        )
        return None
    protocol = os.environ.get(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL) or os.environ.get(
        OTEL_EXPORTER_OTLP_PROTOCOL
    )
    if protocol and protocol.strip() != "http/protobuf":
        log.warning(
            "OTLP protocol %r is not supported; exporting spans with http/protobuf to %s", protocol, url
        )
    provider, exporter = make_provider(service_name, url, short_lived=short_lived)
    if exporter is not None:
        _short_lived[provider] = exporter
        logging.getLogger(_EXPORTER_LOGGER).setLevel(logging.CRITICAL)
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def shutdown_tracing(provider: TracerProvider | None) -> None:
    """Exports the spans still queued, then stops the provider; a no-op for None.

    For a short_lived provider an export that has failed is not retried on the way out: the
    spans still queued are dropped, and one warning says how many were lost and why."""
    if provider is None:
        return
    exporter = _short_lived.pop(provider, None)
    if exporter is not None:
        exporter.closing = True
    provider.force_flush(_FLUSH_TIMEOUT_MS)
    provider.shutdown()
    if exporter is not None and (line := exporter.summary()) is not None:
        log.warning("%s", line)


def _enabled(env: Mapping[str, str]) -> bool:
    if env.get(OTEL_SDK_DISABLED, "").strip().lower() == "true":
        return False
    exporters = {name.strip().lower() for name in (env.get(OTEL_TRACES_EXPORTER) or "otlp").split(",")}
    if "otlp" in exporters:
        return True
    if exporters - {"none", ""}:
        log.warning("OTEL_TRACES_EXPORTER=%s: only 'otlp' is supported; tracing is off", ",".join(exporters))
    return False
