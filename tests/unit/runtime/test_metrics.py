"""The Prometheus metrics and their hooks: calls, steps, admission and key refusals, Triton retries,
what is read at scrape time, and the listener (OpenMetrics with trace-id exemplars)."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.access.control import AccessControl, Policy
from bgremove_gateway.access.keys import KeyLimits
from bgremove_gateway.access.log import Access
from bgremove_gateway.errors import ServiceError
from bgremove_gateway.runtime import metrics
from bgremove_gateway.runtime.budget import MemoryBudget
from bgremove_gateway.triton.client import Failure, InferError
from bgremove_gateway.triton.pool import TritonPool, _Member
from bgremove_gateway.triton.replica import ReplicaState

MiB = 1 << 20
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
tracer = TracerProvider().get_tracer("test")  # a real span context, without a global provider


def value(name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels or {}) or 0.0


class FakeContext:
    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    def time_remaining(self) -> float | None:
        return None


def test_format_label() -> None:
    assert metrics.format_label(pb.OUTPUT_FORMAT_WEBP) == "webp"
    assert metrics.format_label(pb.OUTPUT_FORMAT_UNSPECIFIED) == "unspecified"


def test_a_finished_call_is_counted_with_its_labels_sizes_and_trace_exemplar() -> None:
    labels = {"method": "RemoveBackground", "code": "OK", "format": "png", "model": "u2netp"}
    before = value("bgremove_calls_total", labels)
    inflight = value("bgremove_calls_in_flight", {"method": "RemoveBackground"})
    requests = value("bgremove_request_bytes_count")
    with tracer.start_as_current_span("call") as span:
        access = Access("RemoveBackground", FakeContext())  # type: ignore[arg-type]
        assert value("bgremove_calls_in_flight", {"method": "RemoveBackground"}) == inflight + 1
        access.output_format, access.model = "png", "u2netp"
        access.bytes_in, access.bytes_out = 5000, 7000
        access.done()
        access.done()  # once only
    assert value("bgremove_calls_total", labels) == before + 1
    assert value("bgremove_calls_in_flight", {"method": "RemoveBackground"}) == inflight
    assert value("bgremove_request_bytes_count") == requests + 1
    trace_id = format(span.get_span_context().trace_id, "032x")
    body, content_type = metrics.exposition(OPENMETRICS)
    assert content_type.startswith("application/openmetrics-text")
    assert f'# {{trace_id="{trace_id}"}}' in body.decode()
    assert "bgremove_call_duration_seconds_bucket" in body.decode()


def test_a_call_without_tracing_has_no_exemplar_and_no_image_labels() -> None:
    labels = {"method": "GetServiceInfo", "code": "OK", "format": "-", "model": "-"}
    before = value("bgremove_calls_total", labels)
    responses = value("bgremove_response_bytes_count")
    access = Access("GetServiceInfo", FakeContext())  # type: ignore[arg-type]
    access.bytes_out = 300
    access.done()
    assert value("bgremove_calls_total", labels) == before + 1
    assert value("bgremove_response_bytes_count") == responses  # only image results are sized


def test_step_timer_records_the_step_with_its_trace_id() -> None:
    before = value("bgremove_step_duration_seconds_count", {"step": "decode"})
    with tracer.start_as_current_span("decode") as span, metrics.timed_step("decode"):
        pass
    with pytest.raises(ValueError), metrics.timed_step("decode"):  # failed runs count too
        raise ValueError
    assert value("bgremove_step_duration_seconds_count", {"step": "decode"}) == before + 2
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert trace_id in metrics.exposition(OPENMETRICS)[0].decode()
    assert trace_id not in metrics.exposition("text/plain")[0].decode()  # exemplars: OpenMetrics only


def test_megapixels() -> None:
    before = value("bgremove_image_megapixels_sum")
    metrics.observe_megapixels(2_500_000)
    assert value("bgremove_image_megapixels_sum") == pytest.approx(before + 2.5)


@pytest.mark.parametrize(
    ("reason", "refuse"),
    [
        ("streams", lambda b: [b.ticket().enter() for _ in range(3)]),
        ("memory", lambda b: [b.ticket().enter(), b.ticket().enter(), b.ticket().reserve(3 * MiB, "x")]),
        ("never_fits", lambda b: b.ticket().fits(5 * MiB, "an upload")),
    ],
)
def test_admission_refusals_by_reason(reason: str, refuse: Any) -> None:
    budget = MemoryBudget(4 * MiB, 2)
    before = {r: value("bgremove_admission_refusals_total", {"reason": r}) for r in metrics.ADMISSION_REASONS}
    with pytest.raises(ServiceError):
        refuse(budget)
    after = {r: value("bgremove_admission_refusals_total", {"reason": r}) for r in metrics.ADMISSION_REASONS}
    assert {r: after[r] - before[r] for r in after} == {r: float(r == reason) for r in after}


async def test_key_refusal_reasons() -> None:
    control = AccessControl(Policy(keys=None, client_certs=False, require_auth=False))
    limits = KeyLimits(rate=1000, burst=1000, max_streams=1)
    unauthenticated = ServiceError(grpc.StatusCode.UNAUTHENTICATED, "no")
    exhausted = ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "no")
    assert control._refusal_reason(unauthenticated, None, None) == "unauthenticated"
    assert control._refusal_reason(exhausted, None, None) == "key_checks"
    assert control._refusal_reason(exhausted, "k1", limits) == "key_rate"
    async with control.admission.admit("k1", limits):
        assert control._refusal_reason(exhausted, "k1", limits) == "key_streams"


def test_the_collector_reads_budget_replicas_and_encode_pool_at_scrape_time() -> None:
    @dataclass
    class Encoder:
        workers: int = 2
        pending: int = 1
        remote_encodes: int = 7
        restarts: int = 0
        no_room: int = 3

    @dataclass
    class Pool:
        default_model: str
        replicas: list[ReplicaState]

    up = ReplicaState("10.0.0.1:8001", "triton:8001", inflight=2, ejected=False, calls=9, failures=1)
    up.ready_models = frozenset({"u2netp"})
    down = ReplicaState("10.0.0.2:8001", "triton:8001")
    budget = MemoryBudget(64 * MiB, 4)
    collector = metrics.GatewayCollector()
    collector.budget, collector.encoder = budget, Encoder()  # type: ignore[assignment]
    collector.pool = Pool("u2netp", [up, down])  # type: ignore[assignment]
    budget.ticket().enter()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for m in collector.collect() for s in m.samples
    }
    one = (("replica", "10.0.0.1:8001"), ("source", "triton:8001"))
    two = (("replica", "10.0.0.2:8001"), ("source", "triton:8001"))
    assert samples[("bgremove_memory_budget_bytes", ())] == 64 * MiB
    assert samples[("bgremove_memory_reserved_bytes", ())] == MiB
    assert samples[("bgremove_streams_open", ())] == 1
    assert samples[("bgremove_streams_limit", ())] == 4
    assert samples[("bgremove_triton_replica_ready", one)] == 1
    assert samples[("bgremove_triton_replica_ready", two)] == 0
    assert samples[("bgremove_triton_replica_ejected", two)] == 1
    assert samples[("bgremove_triton_replica_calls_in_flight", one)] == 2
    assert samples[("bgremove_triton_replica_calls_total", one)] == 9
    assert samples[("bgremove_triton_replica_errors_total", one)] == 1
    assert samples[("bgremove_encode_pool_pending", ())] == 1
    assert samples[("bgremove_encode_pool_encodes_total", ())] == 7
    assert samples[("bgremove_encode_pool_no_room_total", ())] == 3


class FlakyClient:
    def __init__(self, fail: bool) -> None:
        self.fail = fail

    async def infer(self, model: str, image: Any, *, timeout_s: float | None = None) -> Any:
        if self.fail:
            raise InferError(grpc.StatusCode.UNAVAILABLE, "gone", failure=Failure.REPLICA)
        return np.zeros((4, 4), np.uint8)


async def test_a_call_moved_to_another_replica_is_counted_against_the_one_that_failed() -> None:
    pool = TritonPool(["127.0.0.1:1"], default_model="u2netp")
    states = []
    for address, fail in (("10.9.0.1:8001", True), ("10.9.0.2:8001", False)):
        state = ReplicaState(address, "t:8001", ejected=False, ready_models=frozenset({"u2netp"}))
        state.latency_s = 0.001 if fail else 10.0  # the failing one is picked first
        pool._members[address] = _Member(state, FlakyClient(fail))  # type: ignore[arg-type]
        states.append(state)
    before = value("bgremove_triton_retries_total", {"replica": "10.9.0.1:8001"})
    await pool.infer("u2netp", np.zeros((4, 4, 3), np.uint8))
    assert value("bgremove_triton_retries_total", {"replica": "10.9.0.1:8001"}) == before + 1
    assert value("bgremove_triton_retries_total", {"replica": "10.9.0.2:8001"}) == 0


@pytest.mark.parametrize(
    ("address", "split"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:9", ("::1", 9)), (":9464", ("0.0.0.0", 9464))],
)
def test_split_address(address: str, split: tuple[str, int]) -> None:
    assert metrics.split_address(address) == split


@pytest.mark.parametrize("address", ["9464", "host:", "host:http", "host:70000"])
def test_split_address_names_a_bad_value(address: str) -> None:
    with pytest.raises(metrics.MetricsListenError, match="HOST:PORT"):
        metrics.split_address(address)


@pytest.fixture
def served() -> Iterator[metrics.MetricsServer]:
    server = metrics.serve_metrics("127.0.0.1:0")
    yield server
    server.stop()


def test_the_listener_serves_openmetrics_when_asked(served: metrics.MetricsServer) -> None:
    url = f"http://127.0.0.1:{served.port}/metrics"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": OPENMETRICS})) as reply:
        assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
        assert reply.read().decode().rstrip().endswith("# EOF")
    with urllib.request.urlopen(url) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        assert "bgremove_calls_total" in reply.read().decode()


def test_a_taken_port_is_one_clear_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(metrics.MetricsListenError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            metrics.serve_metrics(f"127.0.0.1:{port}")
