"""Runs the real gateway (and its embedded Triton) as a subprocess, and an OTLP/HTTP receiver.

Used by the integration tests through fixtures in conftest.py. Everything binds loopback ports
picked by the kernel, so tests run beside a developer's `make run`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

REPO = Path(__file__).resolve().parents[2]
BGREMOVE = str(Path(sys.executable).with_name("bgremove"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]


class OtlpReceiver:
    """A minimal OTLP/HTTP trace collector: protobuf from the Python SDK, JSON from Triton."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.raw: list[bytes] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.1 answers curl's "Expect: 100-continue" (Triton's exporter) at once.
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    receiver._ingest(body, self.headers.get("Content-Type", ""))
                except Exception as exc:  # a parse bug here must show in the test, not drop spans
                    with receiver._lock:
                        receiver.errors.append(f"{type(exc).__name__}: {exc}: {body[:300]!r}")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _ingest(self, body: bytes, content_type: str) -> None:
        spans: list[Span] = []
        if "json" in content_type:
            doc = json.loads(body)
            for rs in doc.get("resourceSpans", doc.get("resource_spans", [])):
                attrs = rs.get("resource", {}).get("attributes", [])
                service = next(
                    (a["value"].get("stringValue", "") for a in attrs if a.get("key") == "service.name"), ""
                )
                for ss in rs.get("scopeSpans", rs.get("scope_spans", [])):
                    for sp in ss.get("spans", []):
                        spans.append(
                            Span(
                                service=service,
                                name=sp.get("name", ""),
                                trace_id=sp.get("traceId", sp.get("trace_id", "")).lower(),
                                span_id=sp.get("spanId", sp.get("span_id", "")).lower(),
                                parent_id=sp.get("parentSpanId", sp.get("parent_span_id", "")).lower(),
                                attributes={
                                    a["key"]: next(iter(a.get("value", {}).values()), None)
                                    for a in sp.get("attributes", [])
                                },
                            )
                        )
        else:
            req = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            for rs in req.resource_spans:
                service = next(
                    (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), ""
                )
                for ss in rs.scope_spans:
                    for sp in ss.spans:
                        spans.append(
                            Span(
                                service=service,
                                name=sp.name,
                                trace_id=sp.trace_id.hex(),
                                span_id=sp.span_id.hex(),
                                parent_id=sp.parent_span_id.hex(),
                                attributes={
                                    a.key: getattr(a.value, a.value.WhichOneof("value") or "string_value")
                                    for a in sp.attributes
                                },
                            )
                        )
        with self._lock:
            self.raw.append(body)
            self.spans.extend(spans)

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


HEAD_LINES = 2000


@dataclass
class GatewayProcess:
    """`bgremove serve` in a subprocess; its stderr kept in memory for assertions."""

    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    triton_grpc_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    # The first lines (start-up) are kept whole; after them, the latest 5000.
    head: list[str] = field(default_factory=list)
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=5000))
    # Where health() asks: the serving port, or a plaintext --health-listen port when TLS is on.
    health_port: int | None = None
    # A command that runs the gateway (e.g. strace ... --); proc is then that command's process.
    prefix: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [
            *self.prefix,
            BGREMOVE,
            "serve",
            "--listen",
            self.target,
            "--triton-grpc-port",
            str(self.triton_grpc_port),
            "--triton-http-port",
            str(free_port()),
            "--triton-metrics-port",
            str(free_port()),
            *self.args,
        ]
        # No metrics or HTTP listener unless a test asks (--metrics-listen, --http-listen win): gateways
        # run side by side, and the HTTP port is shared (SO_REUSEPORT) by gateways that bind it.
        env = {**os.environ, "BGREMOVE_METRICS_LISTEN": "", "BGREMOVE_HTTP_LISTEN": "", **self.env}
        # One gateway process unless a test asks for more (--workers wins): the suite's cost stays.
        env["BGREMOVE_WORKERS"] = self.env.get("BGREMOVE_WORKERS", "1")
        self.proc = subprocess.Popen(
            cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, cwd=REPO
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            (self.head if len(self.head) < HEAD_LINES else self.tail).append(line)

    @property
    def lines(self) -> list[str]:
        return [*self.head, *self.tail]

    def health(self, service: str = "") -> int | None:
        """The health status, or None when the gateway does not answer."""
        with grpc.insecure_channel(f"127.0.0.1:{self.health_port or self.port}") as channel:
            try:
                resp = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=10
                )
            except grpc.RpcError:
                return None
            status: int = resp.status
            return status

    def wait_serving(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}:\n" + "\n".join(self.lines))
            if self.health() == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.5)
        raise RuntimeError("gateway not SERVING in time:\n" + "\n".join(self.lines[-50:]))

    @contextlib.contextmanager
    def serving(self, timeout_s: float = 240.0) -> Iterator[GatewayProcess]:
        """Started and SERVING for the block; stopped after it, whatever happened."""
        self.start()
        try:
            self.wait_serving(timeout_s)
            yield self
        finally:
            self.stop()

    def stop(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_text(self) -> str:
        return "\n".join(self.lines)
