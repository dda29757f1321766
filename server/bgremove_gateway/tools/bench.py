"""`bgremove bench`: drive a running service with real photos and compare it with its floor.

In one run, on the same images and machine:
- service: StreamRemoveBackground through the gateway (what users get);
- triton: infer calls straight to Triton on preprocessed tensors (bypassing the gateway);
- model: ONNX Runtime in-process on the same tensors (the floor for this machine).
Ratios between them are what to compare across machines; absolute times are noisy. The three run
in alternating rounds rather than one after another, so a slow spell on a shared machine lands on
all of them alike and the ratios stay meaningful when absolute times drift.
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
from bgremove_gateway.tools.load import OK, Call, Outcome, drive, stream_remove, upload_messages

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
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

    def summary(self) -> dict[str, Any]:
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


async def _drive(stats: RunStats, concurrency: int, indices: range, call: Call) -> None:
    """Sends `indices` on `concurrency` workers; adds outcomes and the wall time to `stats`."""
    started = time.perf_counter()
    await drive(indices, concurrency, call, stats.record)
    stats.wall_s += time.perf_counter() - started


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
            await _drive(run, run.concurrency, range(bounds[r], bounds[r + 1]), target.call)
    return stats


async def service_target(
    target: str, photos: list[Photo], concurrency: int, fmt: int, chunk: int = 256 * 1024, model: str = ""
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
    return Target("service", call, close)


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
    parser.add_argument("--target", default="127.0.0.1:50051", help="gateway address")
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
    parser.add_argument("--json", action="store_true", help="print one JSON document")


async def run_all(ns: argparse.Namespace) -> dict[str, Any]:
    photos = load_photos(ns.images)
    targets = [
        await service_target(ns.target, photos, ns.concurrency, OUTPUT_FORMATS[ns.format], model=ns.model)
    ]
    try:
        if ns.triton_url:
            targets.append(await triton_target(ns.triton_url, ns.model, photos))
        if ns.model_alone:
            targets.append(await model_target(ns.model_repository, ns.model, photos, ns.model_threads))
        rounds = ns.rounds or default_rounds(ns.concurrency, ns.requests)
        runs = await interleaved(targets, ns.concurrency, ns.requests, rounds)
    finally:
        for t in targets:
            await t.close()
    by_name = {r.name: r for r in runs}
    ratios: dict[str, float] = {}
    svc = by_name["service"]
    for other in ("model", "triton"):
        if other in by_name and by_name[other].throughput > 0:
            ratios[f"service_over_{other}_throughput"] = round(svc.throughput / by_name[other].throughput, 3)
    if "triton" in by_name:
        ratios["gateway_added_p50_ms"] = round(svc.percentile(50) - by_name["triton"].percentile(50), 1)
    return {
        "images": len(photos),
        "format": ns.format,
        "rounds": rounds,
        "runs": [r.summary() for r in runs],
        "ratios": ratios,
    }


def run(ns: argparse.Namespace) -> int:
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
        if r["errors"]:
            lines.append(
                f"{r['name']} errors: {r['errors']} of {r['requests']}, "
                f"{r['retry_hinted']} with a retry hint, "
                f"answered in p50 {r['error_p50_ms']} ms / p99 {r['error_p99_ms']} ms"
            )
    lines += [f"{k}: {v}" for k, v in report["ratios"].items()]
    return "\n".join(lines)
