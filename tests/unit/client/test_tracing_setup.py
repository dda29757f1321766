"""bgremove.tracing: on only when an OTLP endpoint is configured, and then really exporting."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from bgremove.tracing import configure_tracing, otlp_traces_url, shutdown_tracing

OTEL_VARS = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in OTEL_VARS:
        monkeypatch.delenv(var, raising=False)


class Collector:
    """An OTLP/HTTP endpoint on loopback that records the path and body of each export."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, bytes]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.posts.append((self.path, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._http.server_address[1]}"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def spans(self) -> list[tuple[dict[str, str], str]]:
        """(resource attributes, span name) of every exported span."""
        found: list[tuple[dict[str, str], str]] = []
        for _, body in self.posts:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            for rs in request.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                found.extend((resource, span.name) for ss in rs.scope_spans for span in ss.spans)
        return found

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


def test_without_an_endpoint_tracing_stays_off() -> None:
    assert otlp_traces_url() is None
    assert configure_tracing("svc", set_global=False) is None
    shutdown_tracing(None)


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "http://collector:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}, "http://collector:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:9/custom"}, "http://c:9/custom"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:1",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:2/t",
            },
            "http://b:2/t",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:1", "OTEL_SDK_DISABLED": "TRUE"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:1", "OTEL_TRACES_EXPORTER": "none"}, None),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:1", "OTEL_TRACES_EXPORTER": "otlp"},
            "http://a:1/v1/traces",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:1", "OTEL_SDK_DISABLED": "false"}, "http://a:1/v1/traces"),
    ],
)
def test_traces_url_follows_the_otlp_variables(env: dict[str, str], url: str | None) -> None:
    assert otlp_traces_url(env) == url


def test_disabled_sdk_wins_over_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert configure_tracing("svc", set_global=False) is None


def test_with_an_endpoint_spans_are_exported_there(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    provider = configure_tracing("bgremove-test", set_global=False)
    assert provider is not None
    with provider.get_tracer("t").start_as_current_span("work"):
        pass
    shutdown_tracing(provider)
    assert [path for path, _ in collector.posts] == ["/v1/traces"]
    ((resource, name),) = collector.spans()
    assert (resource["service.name"], name) == ("bgremove-test", "work")


def test_service_name_and_resource_attributes_from_the_environment_win(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "renamed")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging")
    provider = configure_tracing("default-name", set_global=False)
    assert provider is not None
    try:
        attrs = provider.resource.attributes
        assert attrs["service.name"] == "renamed"
        assert attrs["deployment.environment"] == "staging"
    finally:
        provider.shutdown()


def test_configured_provider_becomes_the_global_one(collector: Collector) -> None:
    # A fresh process: the global provider can be set only once per process.
    code = (
        "from opentelemetry import trace\n"
        "from bgremove.tracing import configure_tracing, shutdown_tracing\n"
        "provider = configure_tracing('global-test')\n"
        "assert trace.get_tracer_provider() is provider\n"
        "with trace.get_tracer('t').start_as_current_span('via-api'): pass\n"
        "shutdown_tracing(provider)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in OTEL_VARS}
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector.endpoint
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    ((resource, name),) = collector.spans()
    assert (resource["service.name"], name) == ("global-test", "via-api")


def test_without_the_sdk_tracing_stays_off_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """bgremove-client without its `tracing` extra: the OpenTelemetry SDK cannot be imported."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delitem(sys.modules, "bgremove._otlp", raising=False)
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with caplog.at_level(logging.WARNING, logger="bgremove.tracing"):
        assert configure_tracing("svc", set_global=False, short_lived=True) is None
    (record,) = caplog.records
    assert "not exported to http://127.0.0.1:9/v1/traces" in record.getMessage()
    assert "pip install 'bgremove-client[tracing]'" in record.getMessage()


def test_a_short_lived_provider_exports_like_any_other(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    provider = configure_tracing("short", set_global=False, short_lived=True)
    assert provider is not None
    with provider.get_tracer("t").start_as_current_span("work"):
        pass
    shutdown_tracing(provider)
    ((resource, name),) = collector.spans()
    assert (resource["service.name"], name) == ("short", "work")


def test_a_short_lived_provider_drops_the_queue_once_an_export_failed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """More spans than one batch (512) and a collector that refuses: one attempt, one line."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    provider = configure_tracing("short", set_global=False, short_lived=True)
    assert provider is not None
    tracer = provider.get_tracer("t")
    for _ in range(1500):
        with tracer.start_as_current_span("work"):
            pass
    with caplog.at_level(logging.WARNING):
        shutdown_tracing(provider)
    assert [r.getMessage() for r in caplog.records] == [
        "tracing: 1500 spans were not exported to http://127.0.0.1:9/v1/traces: Connection refused"
    ]
