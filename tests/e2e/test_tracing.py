"""One trace from the CLI through the gateway into Triton, read back from an OTLP/HTTP receiver."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from skimage import data as skdata

from e2e_helpers import jpeg_bytes
from service_harness import BGREMOVE, GatewayProcess, OtlpReceiver, Span

GATEWAY_STEPS = {"validate", "decode", "preprocess", "infer", "postprocess", "encode"}


def _wait_for(predicate, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)


def _ancestors(span: Span, by_id: dict[str, Span]) -> list[str]:
    names = []
    while span.parent_id and span.parent_id in by_id:
        span = by_id[span.parent_id]
        names.append(span.name)
    return names


def test_cli_gateway_and_triton_spans_form_one_tree(
    gateway: GatewayProcess, otlp: OtlpReceiver, tmp_path: Path
) -> None:
    secret_name = "holiday-secret-name-7f3a.jpg"
    photo = tmp_path / secret_name
    photo.write_bytes(jpeg_bytes(skdata.astronaut()))
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
        "OTEL_SERVICE_NAME": "bgremove-cli",
    }

    def cli_roots() -> list[Span]:
        return [s for s in otlp.spans if s.service == "bgremove-cli" and not s.parent_id]

    def complete(trace_id: str) -> bool:
        spans = otlp.trace(trace_id)
        services = {s.service for s in spans}
        return {"bgremove-gateway", "bgremove-triton"} <= services and {
            s.name for s in spans
        } >= GATEWAY_STEPS

    # Triton's OTLP exporter (its C++ SDK) has been seen to drop a batch when the machine is
    # saturated by the rest of the suite; a fresh request (a fresh trace) is sent then, up to three
    # times. Every assertion below holds for the one trace that arrived whole.
    root: Span | None = None
    for _attempt in range(3):
        seen = {s.span_id for s in cli_roots()}
        out = subprocess.run(
            [BGREMOVE, "remove", str(photo), "-o", str(tmp_path / "cut.png"), "--target", gateway.target],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        _wait_for(lambda seen=seen: any(s.span_id not in seen for s in cli_roots()))
        root = next((s for s in cli_roots() if s.span_id not in seen), None)
        assert root is not None, "the CLI exported no root span"
        _wait_for(lambda root=root: complete(root.trace_id), 30)
        if complete(root.trace_id):
            break
    assert root is not None
    spans = otlp.trace(root.trace_id)
    by_id = {s.span_id: s for s in spans}
    services = {s.service for s in spans}
    assert {"bgremove-cli", "bgremove-gateway", "bgremove-triton"} <= services, (
        services,
        sorted({(s.service, s.name) for s in otlp.spans}),
        len([s for s in otlp.spans if s.service == "bgremove-triton"]),
        otlp.errors,
        [ln for ln in gateway.lines if "bgremove.triton" in ln and ("rror" in ln or "race" in ln)][-20:],
    )
    assert not otlp.errors

    server = [
        s for s in spans if s.service == "bgremove-gateway" and s.name.endswith("StreamRemoveBackground")
    ]
    assert len(server) == 1
    server_span = server[0]
    assert by_id[server_span.parent_id].service == "bgremove-cli", "gateway span is a child of the client's"

    steps = {s.name: s for s in spans if s.service == "bgremove-gateway" and s.name in GATEWAY_STEPS}
    assert set(steps) == GATEWAY_STEPS
    for step in steps.values():
        assert step.parent_id == server_span.span_id, f"{step.name} hangs under the RPC span"

    triton_spans = [s for s in spans if s.service == "bgremove-triton"]
    triton_roots = [
        s
        for s in triton_spans
        if by_id.get(s.parent_id) is None or by_id[s.parent_id].service != "bgremove-triton"
    ]
    assert triton_roots, "Triton exported spans for this trace"
    for t in triton_roots:
        assert t.parent_id == steps["infer"].span_id, "Triton's spans hang under the gateway's infer span"

    # Privacy: no span of the trace carries the file name or image bytes.
    for span in spans:
        for value in span.attributes.values():
            assert secret_name not in str(value)
            assert "holiday" not in str(value)
    assert all(secret_name.encode() not in body for body in otlp.raw)
