"""Prometheus metrics and JSON logs of a real gateway: the numbers move after real calls, latency
buckets carry trace ids as exemplars, the metrics port needs no key, and every log line is JSON.

The gateway here has a keys file, JSON logs, tracing to the session's OTLP receiver and a metrics
listener, and reuses the session gateway's embedded Triton.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from bgremove_gateway.access.keys import KeyLimits, PresentedKey, new_key, write_keys
from e2e_helpers import jpeg_bytes, stream_remove
from service_harness import GatewayProcess, OtlpReceiver, free_port

JPEG = jpeg_bytes(skdata.chelsea())
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
STEPS = ("validate", "decode", "preprocess", "infer", "postprocess", "encode")


@dataclass
class Observed:
    gateway: GatewayProcess
    metrics_url: str
    triton: str  # the --triton-url, which is also the replica's address
    key: str  # no per-key limits
    slow_key: str  # one call, then its rate limit refuses
    slow_key_id: str

    def scrape(self, accept: str = "") -> tuple[str, str]:
        request = urllib.request.Request(self.metrics_url, headers={"Accept": accept} if accept else {})
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.read().decode(), reply.headers["Content-Type"]

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        text, _ = self.scrape()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def observed(
    gateway: GatewayProcess, otlp: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Observed]:
    path = tmp_path_factory.mktemp("metrics") / "keys.json"
    open_record, key = new_key("open", KeyLimits(rate=0, burst=0, max_streams=0))
    slow_record, slow_key = new_key("slow", KeyLimits(rate=0.001, burst=1, max_streams=0))
    write_keys(path, [open_record, slow_record])
    port, triton = free_port(), f"127.0.0.1:{gateway.triton_grpc_port}"
    gw = GatewayProcess(
        args=[
            "--api-keys-file",
            str(path),
            "--triton-url",
            triton,
            "--metrics-listen",
            f"127.0.0.1:{port}",
            "--log-format",
            "json",
        ],
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"},
    )
    with gw.serving():
        parsed = PresentedKey.parse(slow_key)
        assert parsed is not None
        yield Observed(gw, f"http://127.0.0.1:{port}/metrics", triton, key, slow_key, parsed.id)


def _bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def _info(target: str, key: str | None) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        try:
            pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(
                pb.GetServiceInfoRequest(), metadata=_bearer(key) if key else None, timeout=30
            )
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_metrics_need_no_key_while_the_api_does(observed: Observed) -> None:
    text, content_type = observed.scrape()
    assert content_type.startswith("text/plain")
    assert "bgremove_calls_total" in text
    assert _info(observed.gateway.target, None) == grpc.StatusCode.UNAUTHENTICATED


def test_metrics_move_after_a_success_and_refusals(observed: Observed) -> None:
    target = observed.gateway.target
    before = observed.samples()
    header, data, _ = stream_remove(
        target, JPEG, options=pb.Options(format=pb.OUTPUT_FORMAT_WEBP), metadata=_bearer(observed.key)
    )
    assert header.content_type == "image/webp" and data
    assert _info(target, None) == grpc.StatusCode.UNAUTHENTICATED
    assert _info(target, observed.slow_key) == grpc.StatusCode.OK
    assert _info(target, observed.slow_key) == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = observed.samples()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"method": "StreamRemoveBackground", "code": "OK", "format": "webp", "model": header.model}
    assert moved("bgremove_calls_total", **ok) == 1
    info = {"method": "GetServiceInfo", "format": "-", "model": "-"}
    assert moved("bgremove_calls_total", code="UNAUTHENTICATED", **info) == 1
    assert moved("bgremove_calls_total", code="RESOURCE_EXHAUSTED", **info) == 1
    assert moved("bgremove_access_refusals_total", key_id="-", reason="unauthenticated") == 1
    assert moved("bgremove_access_refusals_total", key_id=observed.slow_key_id, reason="key_rate") == 1
    for step in STEPS:
        assert moved("bgremove_step_duration_seconds_count", step=step) == 1, step
    assert moved("bgremove_call_duration_seconds_count", method="StreamRemoveBackground") == 1
    assert moved("bgremove_request_bytes_sum") == len(JPEG)
    assert moved("bgremove_response_bytes_sum") == len(data)
    width, height = header.input_width, header.input_height
    assert moved("bgremove_image_megapixels_sum") == pytest.approx(width * height / 1e6)
    # Read at scrape time: nothing in flight now, the budget as configured, the one replica ready.
    assert value(after, "bgremove_calls_in_flight", method="StreamRemoveBackground") == 0
    assert value(after, "bgremove_memory_reserved_bytes") == 0
    assert value(after, "bgremove_memory_budget_bytes") == 1536 * 1024 * 1024
    labels = {"replica": observed.triton, "source": observed.triton}
    assert value(after, "bgremove_triton_replica_ready", **labels) == 1
    assert value(after, "bgremove_triton_replica_ejected", **labels) == 0
    assert moved("bgremove_triton_replica_calls_total", **labels) == 1
    assert value(after, "bgremove_encode_pool_workers") >= 1
    # Nothing from the image (its bytes, its name) in any label.
    text, _ = observed.scrape()
    assert "chelsea" not in text


def test_latency_buckets_carry_trace_ids_in_openmetrics(observed: Observed, otlp: OtlpReceiver) -> None:
    stream_remove(observed.gateway.target, JPEG, metadata=_bearer(observed.key))
    text, content_type = observed.scrape(OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text")
    exemplars = {
        family.name: s.exemplar.labels["trace_id"]
        for family in openmetrics_families(text)
        if family.name in ("bgremove_call_duration_seconds", "bgremove_step_duration_seconds")
        for s in family.samples
        if s.exemplar is not None
        and s.labels.get("method", s.labels.get("step")) in ("StreamRemoveBackground", "infer")
    }
    assert set(exemplars) == {"bgremove_call_duration_seconds", "bgremove_step_duration_seconds"}
    # Each is a trace the gateway exported.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(otlp.trace(t) for t in exemplars.values()):
        time.sleep(0.3)
    for trace_id in exemplars.values():
        assert any(s.service == "bgremove-gateway" for s in otlp.trace(trace_id)), trace_id


def test_every_log_line_is_json_and_access_lines_carry_trace_ids(observed: Observed) -> None:
    stream_remove(observed.gateway.target, JPEG, metadata=_bearer(observed.key))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "StreamRemoveBackground" not in observed.gateway.log_text():
        time.sleep(0.2)
    lines = [line for line in observed.gateway.lines if line.strip()]
    docs = [json.loads(line) for line in lines]  # every line, startup included
    assert all({"time", "level", "logger", "message"} <= doc.keys() for doc in docs)
    access = [
        d for d in docs if d["logger"] == "bgremove.access" and d.get("method") == "StreamRemoveBackground"
    ]
    assert access
    for doc in access:
        assert doc["status"] == "OK" and isinstance(doc["bytes_in"], int) and doc["bytes_in"] > 0
        assert len(doc["trace_id"]) == 32 and int(doc["trace_id"], 16)
        assert len(doc["span_id"]) == 16 and int(doc["span_id"], 16)
        assert doc["key"] != "-"  # the key id, never the key
    log = observed.gateway.log_text()
    assert observed.key not in log and observed.key.split("_", 2)[2] not in log
