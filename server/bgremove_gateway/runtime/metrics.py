"""Every Prometheus metric the gateway serves, and the listener that serves them (--metrics-listen).

prometheus-client: the kept reference library, it writes OpenMetrics with exemplars (a trace id on
a latency bucket) as well as the classic text format, and needs no agent or sidecar.

The serving path pays a dict lookup and a lock per observation: children are bound once here, and
whatever another object already counts (the memory budget, Triton replicas, the encode pool) is
read only when Prometheus scrapes, by GatewayCollector. Labels carry method names, status codes,
output formats, model names, key ids and replica addresses: never anything taken from an image
(content, file name, EXIF), never an API key's secret, and never a key id that is not in the keys
file (a presented id is the caller's text: as a label it would let anyone add series).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal
from wsgiref.simple_server import WSGIServer

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from bgremove.v1 import bgremove_pb2 as pb

if TYPE_CHECKING:
    from bgremove_gateway.pipeline.encode_pool import EncodePool
    from bgremove_gateway.runtime.budget import MemoryBudget
    from bgremove_gateway.triton.pool import TritonPool
    from bgremove_gateway.triton.replica import ReplicaState

log = logging.getLogger("bgremove.gateway")

NS: Final = "bgremove"
# Pipeline steps, as their spans are named (flow.py).
STEPS: Final = ("validate", "decode", "preprocess", "infer", "postprocess", "encode")
# Seconds: a small image's step takes milliseconds, a 64 MP one seconds, a stalled upload minutes.
LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
# Bytes: 1 KiB to 64 MiB by factors of 4 (the default --max-upload-bytes is 50 MiB).
SIZE_BUCKETS: Final = tuple(float(1024 * 4**i) for i in range(9))
# Megapixels: thumbnails to the default --max-pixels of 64 MP.
MEGAPIXEL_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0)
# Why admission refused a call (budget.py), and why access control refused one (control.py).
ADMISSION_REASONS: Final = ("streams", "memory", "never_fits")
KEY_REASONS: Final = ("unauthenticated", "key_checks", "key_streams", "key_rate")
NO_LABEL: Final = "-"

# Own registry, not the library's global one: only what is defined here is served, and importing
# the module twice (tests) cannot register anything twice.
REGISTRY: Final = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

CALLS: Final = Counter(
    f"{NS}_calls",
    "Calls answered, by method, status code, output format and model (format and model are - "
    "until the request's options were validated)",
    ("method", "code", "format", "model"),
    registry=REGISTRY,
)
CALL_SECONDS: Final = Histogram(
    f"{NS}_call_duration_seconds",
    "Time from a call's start in the servicer (or access control, for a refusal) to its last byte",
    ("method",),
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
# livesum: with --workers, the pod's total over the worker processes alive now.
IN_FLIGHT: Final = Gauge(
    f"{NS}_calls_in_flight",
    "Calls being handled now",
    ("method",),
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
WORKER_IN_FLIGHT: Final = Gauge(
    f"{NS}_worker_calls_in_flight",
    "Calls being handled now by each gateway process of the pod (--workers), by its index",
    ("worker",),
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
WORKER_CALLS: Final = Counter(
    f"{NS}_worker_calls",
    "Calls answered by each gateway process of the pod (--workers), by its index: how the kernel "
    "spreads connections among them",
    ("worker",),
    registry=REGISTRY,
)
STEP_SECONDS: Final = Histogram(
    f"{NS}_step_duration_seconds",
    "Time each pipeline step took, failed runs included",
    ("step",),
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
_STEPS: Final = {step: STEP_SECONDS.labels(step) for step in STEPS}
REQUEST_BYTES: Final = Histogram(
    f"{NS}_request_bytes",
    "Size of each image received (the upload, or RemoveBackground's image)",
    buckets=SIZE_BUCKETS,
    registry=REGISTRY,
)
RESPONSE_BYTES: Final = Histogram(
    f"{NS}_response_bytes",
    "Size of each result sent",
    buckets=SIZE_BUCKETS,
    registry=REGISTRY,
)
IMAGE_MEGAPIXELS: Final = Histogram(
    f"{NS}_image_megapixels",
    "Width x height of each decoded image, in millions of pixels",
    buckets=MEGAPIXEL_BUCKETS,
    registry=REGISTRY,
)
ADMISSION_REFUSALS: Final = Counter(
    f"{NS}_admission_refusals",
    "Calls refused by admission control: streams (stream cap full), memory (budget full), "
    "never_fits (larger than the whole budget)",
    ("reason",),
    registry=REGISTRY,
)
_ADMISSION: Final = {reason: ADMISSION_REFUSALS.labels(reason) for reason in ADMISSION_REASONS}
KEY_REFUSALS: Final = Counter(
    f"{NS}_access_refusals",
    "Calls refused by access control, by key id (- when no known key was presented) and reason: "
    "unauthenticated, key_checks (too many failed key checks or a full check queue), key_streams "
    "(the key's cap on calls in flight), key_rate (the key's rate limit)",
    ("key_id", "reason"),
    registry=REGISTRY,
)
TRITON_RETRIES: Final = Counter(
    f"{NS}_triton_retries",
    "Inference calls moved to another Triton replica after this one failed them",
    ("replica",),
    registry=REGISTRY,
)
for _reason in KEY_REASONS:  # every series exists from the start, at 0, so rate() sees the first
    KEY_REFUSALS.labels(NO_LABEL, _reason)
LIMITS_SHARED_UP: Final = Gauge(
    f"{NS}_limits_shared_up",
    "1 while the Redis holding per-key limits for every replica (--limits-redis-url) answers, 0 while "
    "this replica decides alone on its share of them; absent without --limits-redis-url",
    ("redis",),
    registry=REGISTRY,
    multiprocess_mode="livemin",  # with --workers: 0 when any worker's checks fall back
)
LIMITS_FALLBACKS: Final = Counter(
    f"{NS}_limits_fallback_decisions",
    "Per-key admission decisions this replica made alone, on its share of the key's limits, "
    "because Redis did not answer in time: admitted or refused",
    ("outcome",),
    registry=REGISTRY,
)
_LIMITS_FALLBACKS: Final = {o: LIMITS_FALLBACKS.labels(o) for o in ("admitted", "refused")}


def _trace_exemplar() -> dict[str, str] | None:
    """The current span's trace id as an exemplar; None when tracing is off."""
    ctx = trace.get_current_span().get_span_context()
    return {"trace_id": format(ctx.trace_id, "032x")} if ctx.is_valid else None


@contextlib.contextmanager
def timed_step(step: str, started: float | None = None) -> Iterator[None]:
    """Observes the block's duration as `step` (from `started`, a perf_counter reading, when given);
    inside the step's span, so its trace id is the exemplar."""
    started = time.perf_counter() if started is None else started
    try:
        yield
    finally:
        timer = _STEPS.get(step) or STEP_SECONDS.labels(step)  # a step added to flow.py counts too
        timer.observe(time.perf_counter() - started, _trace_exemplar())


def observe_megapixels(pixels: int) -> None:
    IMAGE_MEGAPIXELS.observe(pixels / 1e6)


def admission_refused(reason: str) -> None:
    _ADMISSION[reason].inc()


def key_refused(key_id: str, reason: str) -> None:
    KEY_REFUSALS.labels(key_id, reason).inc()


def triton_retried(replica: str) -> None:
    TRITON_RETRIES.labels(replica).inc()


def limits_shared_up(redis: str, up: bool) -> None:
    LIMITS_SHARED_UP.labels(redis).set(1.0 if up else 0.0)


def limits_fallback(outcome: str) -> None:
    _LIMITS_FALLBACKS[outcome].inc()


def format_label(output_format: int) -> str:
    """OUTPUT_FORMAT_PNG -> "png"; only for a format validate_options accepted."""
    name: str = pb.OutputFormat.Name(output_format)  # type: ignore[arg-type]
    return name.removeprefix("OUTPUT_FORMAT_").lower()


_worker_calls, _worker_in_flight = WORKER_CALLS.labels("0"), WORKER_IN_FLIGHT.labels("0")


def set_worker(index: int) -> None:
    """Labels this process's calls as worker `index` of the pod."""
    global _worker_calls, _worker_in_flight
    _worker_calls, _worker_in_flight = WORKER_CALLS.labels(str(index)), WORKER_IN_FLIGHT.labels(str(index))


def call_started(method: str) -> None:
    IN_FLIGHT.labels(method).inc()
    _worker_in_flight.inc()


@dataclass(frozen=True)
class CallRecord:
    """What the access log knows about one finished call (access/log.py)."""

    method: str
    code: str
    output_format: str
    model: str
    seconds: float
    bytes_in: int
    bytes_out: int
    trace_id: str  # "-" without tracing


def call_ended(call: CallRecord) -> None:
    """Counts a finished call, which call_started() counted in flight."""
    IN_FLIGHT.labels(call.method).dec()
    _worker_in_flight.dec()
    _worker_calls.inc()
    CALLS.labels(call.method, call.code, call.output_format, call.model).inc()
    exemplar = None if call.trace_id == NO_LABEL else {"trace_id": call.trace_id}
    CALL_SECONDS.labels(call.method).observe(call.seconds, exemplar)
    if call.bytes_in:
        REQUEST_BYTES.observe(call.bytes_in)
    if call.bytes_out and call.output_format != NO_LABEL:  # results, not GetServiceInfo's answer
        RESPONSE_BYTES.observe(call.bytes_out)


# --- read at scrape time ---------------------------------------------------------------------------


class GatewayCollector(Collector):
    """The memory budget, the Triton replicas and the encode pool, read when Prometheus scrapes.

    Scrapes run on the metrics server's thread while the event loop changes what they read: each
    number is one attribute read, and the replica list is copied with a retry (see _replicas)."""

    def __init__(self) -> None:
        self.budget: MemoryBudget | None = None
        self.pool: TritonPool | None = None
        self.encoder: EncodePool | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to check at registration: what is watched comes later

    def collect(self) -> Iterator[Metric]:
        if self.budget is not None:
            yield from _budget_metrics(self.budget)
        if self.pool is not None:
            yield from _replica_metrics(self.pool.default_model, _replicas(self.pool))
        if self.encoder is not None:
            yield from _encoder_metrics(self.encoder)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NS}_{name}", doc, value=value)


def _budget_metrics(budget: MemoryBudget) -> Iterator[Metric]:
    yield _gauge(
        "memory_budget_bytes", "The memory budget (--memory-budget-bytes)", budget.memory_budget_bytes
    )
    yield _gauge(
        "memory_reserved_bytes", "Bytes of the memory budget held by calls now", budget.reserved_bytes
    )
    yield _gauge(
        "streams_limit",
        "The cap on open image calls (--max-concurrent-streams)",
        budget.max_concurrent_streams,
    )
    yield _gauge("streams_open", "Image calls holding a stream slot now", budget.streams)


def _replicas(pool: TritonPool) -> Sequence[ReplicaState]:
    # The pool's member dict may change size mid-copy (a DNS change on the event loop): copy again.
    for _ in range(5):
        with contextlib.suppress(RuntimeError):
            return pool.replicas
    return ()


def _replica_metrics(default_model: str, replicas: Sequence[ReplicaState]) -> Iterator[Metric]:
    labels = ["replica", "source"]
    ready = GaugeMetricFamily(
        f"{NS}_triton_replica_ready",
        "1 when the replica serves the default model and takes new calls",
        labels=labels,
    )
    ejected = GaugeMetricFamily(
        f"{NS}_triton_replica_ejected", "1 while the replica is ejected (circuit open)", labels=labels
    )
    in_flight = GaugeMetricFamily(
        f"{NS}_triton_replica_calls_in_flight", "Inference calls on the replica now", labels=labels
    )
    latency = GaugeMetricFamily(
        f"{NS}_triton_replica_latency_seconds",
        "The replica's recent inference latency (moving average the pool picks by)",
        labels=labels,
    )
    calls = CounterMetricFamily(
        f"{NS}_triton_replica_calls", "Inference calls the replica answered or failed", labels=labels
    )
    errors = CounterMetricFamily(
        f"{NS}_triton_replica_errors",
        "Inference calls that failed because of the replica (gone, exiting, lost the model)",
        labels=labels,
    )
    for r in replicas:
        values = [r.address, r.source]
        ready.add_metric(values, 1.0 if r.usable(default_model) else 0.0)
        ejected.add_metric(values, 1.0 if r.ejected else 0.0)
        in_flight.add_metric(values, r.inflight)
        latency.add_metric(values, r.latency_s)
        calls.add_metric(values, r.calls)
        errors.add_metric(values, r.failures)
    yield from (ready, ejected, in_flight, latency, calls, errors)


def _encoder_metrics(encoder: EncodePool) -> Iterator[Metric]:
    yield _gauge("encode_pool_workers", "Encode worker processes", encoder.workers)
    yield _gauge(
        "encode_pool_pending",
        "Encodes handed to the worker processes and not finished (running or queued)",
        encoder.pending,
    )
    yield CounterMetricFamily(
        f"{NS}_encode_pool_encodes", "Encodes done in a worker process", value=encoder.remote_encodes
    )
    yield CounterMetricFamily(
        f"{NS}_encode_pool_restarts", "Times a dead encode worker's pool was replaced", value=encoder.restarts
    )
    yield CounterMetricFamily(
        f"{NS}_encode_pool_no_room",
        "Large encodes done in-process because /dev/shm had no room",
        value=encoder.no_room,
    )


WATCHED: Final = GatewayCollector()
REGISTRY.register(WATCHED)


def watch(
    *,
    budget: MemoryBudget | None = None,
    pool: TritonPool | None = None,
    encoder: EncodePool | None = None,
) -> None:
    """Has scrapes read these (one gateway per process; a later call replaces what it names)."""
    if budget is not None:
        WATCHED.budget = budget
    if pool is not None:
        WATCHED.pool = pool
    if encoder is not None:
        WATCHED.encoder = encoder


# --- several gateway processes (--workers) ----------------------------------------------------------
# Each worker writes its metrics to memory-mapped files in the pod's PROMETHEUS_MULTIPROC_DIR
# (prometheus-client's multiprocess mode); the supervising parent serves their totals. Counters of a
# dead worker stay in the totals, its live gauges leave them (mark_process_dead).

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
PUBLISH_INTERVAL_S: Final = 1.0
# How the pod combines each worker's scrape-time gauges; the others are summed over live workers.
PodGaugeMode = Literal["livesum", "livemin", "livemax"]
_POD_GAUGE_MODES: Final[dict[str, PodGaugeMode]] = {
    # Every worker reads the pod's one budget and its shared counters (shared_budget.py): not a sum.
    f"{NS}_memory_budget_bytes": "livemax",
    f"{NS}_memory_reserved_bytes": "livemax",
    f"{NS}_streams_limit": "livemax",
    f"{NS}_streams_open": "livemax",
    f"{NS}_triton_replica_ready": "livemin",
    f"{NS}_triton_replica_ejected": "livemax",
    f"{NS}_triton_replica_latency_seconds": "livemax",
}


def multiprocess() -> bool:
    """True in a worker of a pod: prometheus-client writes this process's values to the pod's files."""
    return MULTIPROC_ENV in os.environ


class _Mirror:
    """Copies what GatewayCollector reads at scrape time into multiprocess metrics, which the parent
    can read: it cannot run a worker's collector. Counters move by what grew since the last copy."""

    def __init__(self) -> None:
        self.gauges: dict[str, Gauge] = {}
        self.counters: dict[str, Counter] = {}
        self.last: dict[tuple[str, tuple[str, ...]], float] = {}

    def publish(self, collector: Collector) -> None:
        for family in collector.collect():
            for sample in family.samples:
                names, values = tuple(sample.labels), tuple(sample.labels.values())
                if family.type == "counter":
                    if not sample.name.endswith("_total"):
                        continue
                    counter = self.counters.get(family.name)
                    if counter is None:
                        counter = self.counters[family.name] = Counter(
                            family.name, family.documentation, names, registry=None
                        )
                    key = (family.name, values)
                    grown = sample.value - self.last.get(key, 0.0)
                    self.last[key] = sample.value
                    # The child exists from the first copy, at 0, so rate() sees the first increment.
                    child = counter.labels(*values) if names else counter
                    if grown > 0:
                        child.inc(grown)
                else:
                    gauge = self.gauges.get(family.name)
                    if gauge is None:
                        mode = _POD_GAUGE_MODES.get(family.name, "livesum")
                        gauge = self.gauges[family.name] = Gauge(
                            family.name, family.documentation, names, registry=None, multiprocess_mode=mode
                        )
                    (gauge.labels(*values) if names else gauge).set(sample.value)


def start_publishing(interval_s: float = PUBLISH_INTERVAL_S) -> threading.Thread:
    """In a worker: copies the watched values for the parent every `interval_s`, on a thread of its
    own like the scrapes it stands in for."""
    mirror = _Mirror()

    def run() -> None:
        while True:
            try:
                mirror.publish(WATCHED)
            except Exception:  # a failed copy must not end the copying
                log.exception("copying the gateway's metrics for the pod failed")
            time.sleep(interval_s)

    thread = threading.Thread(target=run, name="bgremove-metrics-publisher", daemon=True)
    thread.start()
    return thread


class PodCollector(Collector):
    """The supervising parent's own figures: its workers, and their restarts and Triton's."""

    def __init__(self, workers: int, worker_restarts: Callable[[], int], triton_restarts: Callable[[], int]):
        self.workers = workers
        self.worker_restarts = worker_restarts
        self.triton_restarts = triton_restarts

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield _gauge("workers", "Gateway processes in the pod (--workers)", self.workers)
        yield CounterMetricFamily(
            f"{NS}_worker_restarts",
            "Times a gateway process died (crashed, killed) and the parent started it again",
            value=self.worker_restarts(),
        )
        yield CounterMetricFamily(
            f"{NS}_triton_restarts",
            "Times the embedded Triton died and the parent started it again",
            value=self.triton_restarts(),
        )


def pod_registry(path: str, own: Collector) -> CollectorRegistry:
    """What the parent of a pod serves: every worker's metrics from `path`, summed (live gauges
    combined as each declares), with the parent's own figures and process metrics."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    ProcessCollector(registry=registry)
    registry.register(own)
    return registry


# --- the listener -----------------------------------------------------------------------------------


class MetricsListenError(ValueError):
    """--metrics-listen cannot be used; one line that says why."""


def split_address(address: str) -> tuple[str, int]:
    """ "127.0.0.1:9464" -> ("127.0.0.1", 9464); "[::]:9464" -> ("::", 9464); ":9464" -> all."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise MetricsListenError(f"--metrics-listen {address!r} is not HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


@dataclass
class MetricsServer:
    """The HTTP listener for /metrics on its own thread: a scrape never waits on the event loop. It
    serves OpenMetrics (with exemplars) to a scraper whose Accept header asks for it, the classic
    text format otherwise. No key: it serves nothing but these numbers."""

    httpd: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_metrics(address: str, registry: CollectorRegistry = REGISTRY) -> MetricsServer:
    """Starts the listener on `address`; MetricsListenError when it cannot bind."""
    host, port = split_address(address)
    try:
        httpd, thread = start_http_server(port, host, registry)
    except OSError as exc:
        raise MetricsListenError(
            f"cannot serve metrics on {address}: {exc.strerror or exc} "
            "(pick another --metrics-listen, or give it empty to serve none)"
        ) from None
    return MetricsServer(httpd, thread)


def exposition(accept: str = "", registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """What a scrape with this Accept header gets: (body, content type); for tests and tools."""
    from prometheus_client.exposition import choose_encoder

    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
