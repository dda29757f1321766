"""`bgremove bench`: drive a running service with real photos and compare it with its floor.

In one run, on the same images and machine:
- service: StreamRemoveBackground through the gateway (what users get);
- triton: infer calls straight to Triton on preprocessed tensors (bypassing the gateway);
- model: ONNX Runtime in-process on the same tensors (the floor for this machine).
Ratios between them are what to compare across machines; absolute times are noisy. The three run
in alternating rounds rather than one after another, so a slow spell on a shared machine lands on
all of them alike and the ratios stay meaningful when absolute times drift.

When the gateway's process is known (`--serve` starts one of the bench's own, `--gateway-pid` names
a local one), the service run also reports the gateway's CPU per request, from /proc: the figure
that holds on a shared machine, and with the `instant` stand-in model the gateway's own ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from PIL import Image

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from bgremove_gateway.config import DEFAULT_MODEL_REPOSITORY
from bgremove_gateway.pipeline.encode import OUTPUT_FORMATS
from bgremove_gateway.tools.cpu_time import gateway_cpu_s, read_stat
from bgremove_gateway.tools.load import OK, Call, Outcome, drive, http_remove, stream_remove, upload_messages
from bgremove_gateway.tools.local_gateway import GatewayStartError, local_gateway
from bgremove_gateway.triton.graph import benchmark_only

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
DEFAULT_TARGET = "127.0.0.1:50051"
# How long the bench watches an idle gateway's CPU before the rounds (when it knows the process).
IDLE_WINDOW_S = 3.0
_CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


@dataclass
class RunStats:
    name: str
    concurrency: int
    requests: int
    wall_s: float
    # Latencies of successful calls only: fast refusals would otherwise flatter the percentiles.
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    error_latencies_ms: list[float] = field(default_factory=list, repr=False)
    statuses: Counter[str] = field(default_factory=Counter)
    retry_hinted: int = 0
    # The gateway's CPU seconds over this run's rounds (tools/cpu_time.py); None: not measured.
    cpu_s: float | None = None

    def record(self, outcome: Outcome, latency_ms: float) -> None:
        self.statuses[outcome.status] += 1
        if outcome.status == "OK":
            self.latencies_ms.append(latency_ms)
        else:
            self.error_latencies_ms.append(latency_ms)
            self.retry_hinted += outcome.retry_hinted

    @property
    def ok(self) -> int:
        return self.statuses.get("OK", 0)

    @property
    def errors(self) -> int:
        return sum(self.statuses.values()) - self.ok

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    def percentile(self, q: float, errors: bool = False) -> float:
        values = self.error_latencies_ms if errors else self.latencies_ms
        if not values:
            return float("nan")
        return float(np.percentile(values, q))

    @property
    def cpu_ms_per_request(self) -> float | None:
        """The gateway's CPU per call, over every call of the run (refusals cost little)."""
        done = sum(self.statuses.values())
        return self.cpu_s * 1000 / done if self.cpu_s is not None and done else None

    def summary(self) -> dict[str, Any]:
        cpu_ms = self.cpu_ms_per_request
        return {
            "name": self.name,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "wall_s": round(self.wall_s, 3),
            "ok": self.ok,
            "errors": self.errors,
            "throughput_per_s": round(self.throughput, 3),
            "p50_ms": round(self.percentile(50), 1),
            "p95_ms": round(self.percentile(95), 1),
            "p99_ms": round(self.percentile(99), 1),
            "mean_ms": round(statistics.fmean(self.latencies_ms), 1) if self.latencies_ms else None,
            # Every call ends in exactly one status: the counts add up to `requests`.
            "statuses": dict(sorted(self.statuses.items())),
            "retry_hinted": self.retry_hinted,
            "error_p50_ms": round(self.percentile(50, errors=True), 1),
            "error_p99_ms": round(self.percentile(99, errors=True), 1),
            "gateway_cpu_ms_per_request": None if cpu_ms is None else round(cpu_ms, 2),
            # Cores the gateway kept busy while this run's calls flowed.
            "gateway_cores_used": (
                None if self.cpu_s is None or self.wall_s <= 0 else round(self.cpu_s / self.wall_s, 3)
            ),
        }


@dataclass(frozen=True)
class Photo:
    data: bytes
    content_type: str
    tensor: npt.NDArray[np.uint8]


def load_photos(paths: Sequence[Path]) -> list[Photo]:
    from bgremove_gateway.config import Limits
    from bgremove_gateway.pipeline.decode import decode
    from bgremove_gateway.pipeline.preprocess import to_model_input

    files: list[Path] = []
    for p in paths:
        files.extend(
            sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
        )
    photos = []
    for f in files:
        data = f.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            ctype = _CONTENT_TYPES.get(im.format or "", "application/octet-stream")
        decoded = decode(data, ctype, Limits())
        photos.append(Photo(data, ctype, to_model_input(decoded.image)))
    if not photos:
        raise SystemExit("bgremove bench: no images found (jpg, jpeg, png, webp)")
    return photos


@dataclass
class Target:
    """One thing to measure: `call(i)` sends request i; `close()` releases the client."""

    name: str
    call: Call
    close: Callable[[], Awaitable[None]]
    concurrency: int | None = None  # None: the run's; the model floor is one run at a time
    cpu_clock: Callable[[], float] | None = None  # the gateway's CPU seconds so far, when known


async def _drive(
    stats: RunStats, concurrency: int, indices: range, call: Call, cpu_clock: Callable[[], float] | None
) -> None:
    """Sends `indices` on `concurrency` workers; adds outcomes, the wall time and the gateway's CPU
    time (when `cpu_clock` reads it) to `stats`."""
    cpu_before = cpu_clock() if cpu_clock is not None else 0.0
    started = time.perf_counter()
    await drive(indices, concurrency, call, stats.record)
    stats.wall_s += time.perf_counter() - started
    if cpu_clock is not None:
        stats.cpu_s = (stats.cpu_s or 0.0) + cpu_clock() - cpu_before


async def idle_cores(pid: int, seconds: float) -> float:
    """The cores gateway `pid` keeps busy with no call in flight, over `seconds`."""
    before, started = gateway_cpu_s(pid), time.perf_counter()
    await asyncio.sleep(seconds)
    return (gateway_cpu_s(pid) - before) / (time.perf_counter() - started)


def default_rounds(concurrency: int, requests: int) -> int:
    """Rounds of at least two requests per worker, so every round runs at full concurrency."""
    return max(1, min(8, requests // (2 * concurrency)))


async def interleaved(
    targets: Sequence[Target], concurrency: int, requests: int, rounds: int
) -> list[RunStats]:
    """Measures `targets` in alternating rounds (A B, B A, A B, ...) rather than one after the
    other: on a shared, noisy machine a slow minute then lands on every target alike, so the
    ratios between them hold even when absolute times drift."""
    stats = [RunStats(t.name, t.concurrency or concurrency, requests, 0.0) for t in targets]
    bounds = [round(r * requests / rounds) for r in range(rounds + 1)]
    for r in range(rounds):
        order = list(zip(targets, stats, strict=True))
        for target, run in order if r % 2 == 0 else reversed(order):
            await _drive(run, run.concurrency, range(bounds[r], bounds[r + 1]), target.call, target.cpu_clock)
    return stats


async def service_target(
    target: str,
    photos: list[Photo],
    concurrency: int,
    fmt: int,
    chunk: int = 256 * 1024,
    model: str = "",
    gateway_pid: int | None = None,
) -> Target:
    """Blocking gRPC calls on `concurrency` threads, not grpc.aio (see tools/load.py)."""
    options = pb.Options(format=fmt, model=model)  # type: ignore[arg-type]
    uploads = [list(upload_messages(photo.data, photo.content_type, options, chunk)) for photo in photos]
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
    stub = pb_grpc.BackgroundRemovalStub(channel)

    def blocking_call(i: int) -> Outcome:
        return stream_remove(stub, uploads[i % len(uploads)], timeout=300, keep_result=False)

    loop = asyncio.get_running_loop()
    threads = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench")

    async def call(i: int) -> Outcome:
        return await loop.run_in_executor(threads, blocking_call, i)

    async def close() -> None:
        threads.shutdown()
        channel.close()

    await call(0)  # connection and first-call warm-up, not measured
    clock = None if gateway_pid is None else (lambda: gateway_cpu_s(gateway_pid))
    return Target("service", call, close, cpu_clock=clock)


# The HTTP API's parameters for each --format (docs/http-api.md).
HTTP_FORMATS: dict[str, dict[str, str]] = {
    "png": {"format": "png"},
    "webp": {"format": "webp"},
    "mask": {"channels": "alpha"},
    "jpeg": {"format": "jpg"},
    "zip": {"format": "zip"},
}


async def http_target(url: str, photos: list[Photo], concurrency: int, fmt: str) -> Target:
    """POST /v1.0/removebg on `concurrency` threads with keep-alive connections, as the gRPC target
    calls: the two differ only in the protocol."""
    import httpx

    client = httpx.Client(limits=httpx.Limits(max_connections=concurrency))
    fields = HTTP_FORMATS[fmt]
    loop = asyncio.get_running_loop()
    threads = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench-http")

    async def call(i: int) -> Outcome:
        image = photos[i % len(photos)].data
        return await loop.run_in_executor(threads, http_remove, client, url, image, fields, 300.0)

    async def close() -> None:
        threads.shutdown()
        await asyncio.to_thread(client.close)

    await call(0)
    return Target("http", call, close)


async def triton_target(url: str, model: str, photos: list[Photo]) -> Target:
    from bgremove_gateway.errors import ServiceError
    from bgremove_gateway.triton.client import TritonInference

    client = TritonInference(url, timeout_s=300)

    async def call(i: int) -> Outcome:
        try:
            await client.infer(model, photos[i % len(photos)].tensor)
        except ServiceError as exc:
            return Outcome(exc.code, exc.message, exc.retry_after_s)
        return OK

    await call(0)
    return Target("triton", call, client.close)


async def model_target(repo: Path, model: str, photos: list[Photo], threads: int) -> Target:
    """ONNX Runtime in-process, batch 1, one run at a time, the same graph and session settings
    Triton's CPU config uses: the floor on this machine."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(
        str(repo / model / "1" / "model.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    name = sess.get_inputs()[0].name

    async def call(i: int) -> Outcome:
        await asyncio.to_thread(sess.run, None, {name: photos[i % len(photos)].tensor[np.newaxis]})
        return OK

    async def close() -> None:
        pass

    await call(0)
    return Target("model", call, close, concurrency=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", default=None, help="gateway address (default 127.0.0.1:50051, unless the bench serves)"
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="start a gateway of the bench's own (embedded Triton, free ports, --model loaded) and report "
        "its CPU per request; implied for a benchmark-only model such as instant when no --target is given",
    )
    parser.add_argument(
        "--triton-direct", action="store_true", help="with --serve: also measure its Triton directly"
    )
    parser.add_argument(
        "--gateway-pid",
        type=int,
        default=None,
        help="a local gateway's process id: report its CPU per request",
    )
    parser.add_argument("--images", type=Path, nargs="+", required=True, help="image files or folders")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--format", choices=sorted(OUTPUT_FORMATS), default="png")
    parser.add_argument("--triton-url", default=None, help="also measure Triton directly at HOST:PORT")
    parser.add_argument("--model-alone", action="store_true", help="also measure ONNX Runtime in-process")
    parser.add_argument("--model", default="u2netp")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    parser.add_argument("--model-threads", type=int, default=min(2, os.cpu_count() or 2))
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="alternate service and Triton-direct in this many rounds (default: up to 8, two "
        "requests per worker each)",
    )
    parser.add_argument(
        "--protocol",
        choices=("grpc", "http", "both"),
        default="grpc",
        help="the gateway's gRPC API, its HTTP API (POST /v1.0/removebg), or both in one run, "
        "alternating, with their ratio",
    )
    parser.add_argument(
        "--http-url", default="http://127.0.0.1:8080/v1.0/removebg", help="the HTTP API's endpoint"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")


async def run_all(ns: argparse.Namespace) -> dict[str, Any]:
    photos = load_photos(ns.images)
    fmt = OUTPUT_FORMATS[ns.format]
    protocol = getattr(ns, "protocol", "grpc")
    targets = []
    if protocol != "http":
        targets.append(
            await service_target(
                ns.target or DEFAULT_TARGET,
                photos,
                ns.concurrency,
                fmt,
                model=ns.model,
                gateway_pid=ns.gateway_pid,
            )
        )
    try:
        if protocol != "grpc":
            targets.append(await http_target(ns.http_url, photos, ns.concurrency, ns.format))
        if ns.triton_url:
            targets.append(await triton_target(ns.triton_url, ns.model, photos))
        if ns.model_alone:
            targets.append(await model_target(ns.model_repository, ns.model, photos, ns.model_threads))
        rounds = ns.rounds or default_rounds(ns.concurrency, ns.requests)
        idle = None if ns.gateway_pid is None else await idle_cores(ns.gateway_pid, IDLE_WINDOW_S)
        runs = await interleaved(targets, ns.concurrency, ns.requests, rounds)
    finally:
        for t in targets:
            await t.close()
    by_name = {r.name: r for r in runs}
    ratios: dict[str, float] = {}
    svc = by_name.get("service", runs[0])
    if "http" in by_name and "service" in by_name and svc.throughput > 0:
        # What HTTP/1.1, multipart and the form parsing cost over gRPC streaming, same photos.
        http = by_name["http"]
        ratios["http_over_grpc_p50"] = round(http.percentile(50) / svc.percentile(50), 3)
        ratios["http_over_grpc_throughput"] = round(http.throughput / svc.throughput, 3)
    for other in ("model", "triton"):
        if other in by_name and by_name[other].throughput > 0:
            ratios[f"service_over_{other}_throughput"] = round(svc.throughput / by_name[other].throughput, 3)
    if "triton" in by_name:
        ratios["gateway_added_p50_ms"] = round(svc.percentile(50) - by_name["triton"].percentile(50), 1)
    if (cpu_ms := svc.cpu_ms_per_request) is not None and cpu_ms > 0:
        # What one gateway core could carry if the gateway were the only limit.
        ratios["images_per_s_per_gateway_core"] = round(1000 / cpu_ms, 2)
    if idle is not None and svc.cpu_s is not None and svc.requests:
        # Less what the gateway burns between calls: it weighs on slow runs, not on requests.
        ratios["gateway_idle_cores"] = round(idle, 4)
        net = (svc.cpu_s - idle * svc.wall_s) * 1000 / svc.requests
        ratios["gateway_cpu_ms_per_request_net_of_idle"] = round(net, 2)
    return {
        "images": len(photos),
        "format": ns.format,
        "rounds": rounds,
        "runs": [r.summary() for r in runs],
        "ratios": ratios,
    }


def serves(ns: argparse.Namespace) -> bool:
    """Whether the bench starts its own gateway: --serve, or a benchmark-only model and no --target."""
    return bool(ns.serve) or (ns.target is None and benchmark_only(ns.model_repository, ns.model))


def run(ns: argparse.Namespace) -> int:
    if serves(ns):
        if ns.target is not None or ns.triton_url is not None:
            raise SystemExit(
                "bgremove bench: --serve starts its own gateway and Triton: drop --target and --triton-url"
            )
        if getattr(ns, "protocol", "grpc") != "grpc":
            raise SystemExit(
                "bgremove bench: --serve measures the gRPC API only (its gateway has no HTTP API)"
            )
        load = [ns.model] if benchmark_only(ns.model_repository, ns.model) else []
        try:
            with local_gateway(load, ns.model_repository) as gateway:
                ns.target, ns.gateway_pid = gateway.target, gateway.pid
                ns.triton_url = gateway.triton_url if ns.triton_direct else None
                report = asyncio.run(run_all(ns))
        except GatewayStartError as exc:
            raise SystemExit(f"bgremove bench: {exc}") from None
    else:
        if ns.gateway_pid is not None and read_stat(ns.gateway_pid) is None:
            raise SystemExit(
                f"bgremove bench: --gateway-pid {ns.gateway_pid}: no such process on this machine"
            )
        report = asyncio.run(run_all(ns))
    if ns.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 1 if report["runs"][0]["errors"] else 0


def format_report(report: dict[str, Any]) -> str:
    """The text form: one row per run, then every run's outcome counts by gRPC status."""
    cols = (
        "name",
        "concurrency",
        "requests",
        "ok",
        "errors",
        "throughput_per_s",
        "p50_ms",
        "p95_ms",
        "p99_ms",
    )
    lines = [" | ".join(cols)]
    lines += [" | ".join(str(r[c]) for c in cols) for r in report["runs"]]
    for r in report["runs"]:
        counts = ", ".join(f"{status} {n}" for status, n in r["statuses"].items())
        lines.append(f"{r['name']} statuses: {counts}")
        if r.get("gateway_cpu_ms_per_request") is not None:
            lines.append(
                f"{r['name']} gateway CPU: {r['gateway_cpu_ms_per_request']} ms a request, "
                f"{r['gateway_cores_used']} cores used"
            )
        if r["errors"]:
            lines.append(
                f"{r['name']} errors: {r['errors']} of {r['requests']}, "
                f"{r['retry_hinted']} with a retry hint, "
                f"answered in p50 {r['error_p50_ms']} ms / p99 {r['error_p99_ms']} ms"
            )
    lines += [f"{k}: {v}" for k, v in report["ratios"].items()]
    return "\n".join(lines)
