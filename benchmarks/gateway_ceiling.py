"""The gateway's ceiling and the real model's service, in one run on one gateway.

Starts one gateway (embedded Triton, free ports) serving U2-Net-P and the `instant` stand-in, and on
the sweep's 1 MP JPEG photos (PNG out) measures, in this order:

1. instant at concurrency 1 and 4, with Triton direct: the gateway's own ceiling, images/s and
   the gateway's CPU per request (from /proc), so images/s per gateway core;
2. U2-Net-P at concurrency 4 against the model alone (ONNX Runtime in-process) and Triton direct.

    .venv/bin/python benchmarks/gateway_ceiling.py [--requests 160] [--model-requests 40]
        [--out benchmarks/results/gateway-ceiling.md]

CPU ms per request is the robust figure on a shared machine; throughput drifts with what else runs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import numpy as np
from make_images import make
from steps import measure

from bgremove_gateway.config import DEFAULT_MODEL_REPOSITORY
from bgremove_gateway.runtime.memory import configure_allocator
from bgremove_gateway.tools import bench
from bgremove_gateway.tools.local_gateway import local_gateway

COLUMNS = (
    "| model | conc | service img/s | p50 ms | p95 ms | gateway CPU ms/img | net of idle "
    "| gateway cores used "
    "| img/s per gateway core | Triton direct img/s | model alone img/s | service/Triton | service/model |"
)


def _ns(**given: Any) -> argparse.Namespace:
    """The namespace `bgremove bench` would parse, with `given` on top."""
    defaults: dict[str, Any] = {
        "format": "png",
        "triton_url": None,
        "model_alone": False,
        "model_repository": DEFAULT_MODEL_REPOSITORY,
        "model_threads": min(2, os.cpu_count() or 2),
        "rounds": 0,
    }
    return argparse.Namespace(**(defaults | given))


def floor_cpu_ms(folder: Path, n: int = 5) -> float:
    """The gateway's CPU steps in this process (decode, model-input resize, matte and cut-out, PNG
    encode; benchmarks/steps.py), CPU time per image, median over the photos: the in-process floor."""
    from bgremove.v1 import bgremove_pb2 as pb

    yy, xx = np.mgrid[:320, :320]
    mask = np.clip(255 - ((yy - 170) ** 2 + (xx - 160) ** 2) / 60, 0, 255).astype(np.uint8)
    opts = pb.Options(format=pb.OUTPUT_FORMAT_PNG)
    per_photo = []
    for photo in sorted(folder.glob("*.jpg")):
        data = photo.read_bytes()
        measure(data, mask, opts, opts.format, 1)  # warm-up
        started = time.process_time()
        measure(data, mask, opts, opts.format, n)  # n timed rounds, plus its own warm-up call
        per_photo.append((time.process_time() - started) * 1000 / (n + 1))
    return statistics.median(per_photo)


def _row(model: str, report: dict[str, Any]) -> str:
    runs = {r["name"]: r for r in report["runs"]}
    s, ratios = runs["service"], report["ratios"]
    t, m = runs.get("triton", {}), runs.get("model", {})
    return (
        f"| {model} | {s['concurrency']} | {s['throughput_per_s']:.2f} "
        f"| {s['p50_ms']:.0f} | {s['p95_ms']:.0f} "
        f"| {s['gateway_cpu_ms_per_request']} | {ratios.get('gateway_cpu_ms_per_request_net_of_idle', '')} "
        f"| {s['gateway_cores_used']} "
        f"| {ratios.get('images_per_s_per_gateway_core', '')} | {t.get('throughput_per_s', '')} "
        f"| {m.get('throughput_per_s', '')} | {ratios.get('service_over_triton_throughput', '')} "
        f"| {ratios.get('service_over_model_throughput', '')} |"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=160, help="requests per instant cell")
    ap.add_argument("--model-requests", type=int, default=40, help="requests in the U2-Net-P cell")
    ap.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "bgremove-bench-images")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gateway-ceiling.md"))
    ns = ap.parse_args()
    photos = make(ns.images)[1.0]
    cells = [
        ("instant", 1, ns.requests, {}),
        ("instant", 4, ns.requests, {}),
        ("u2netp", 4, ns.model_requests, {"model_alone": True}),
    ]
    rows, reports = [], []
    configure_allocator()  # as `bgremove serve` sets it up, so the floor is the gateway's
    floor = floor_cpu_ms(photos)
    print(f"in-process floor: {floor:.1f} ms CPU an image", flush=True)
    with local_gateway(["instant"]) as gw:
        for model, conc, requests, extra in cells:
            args = _ns(
                images=[photos],
                target=gw.target,
                gateway_pid=gw.pid,
                triton_url=gw.triton_url,
                model=model,
                concurrency=conc,
                requests=requests,
                **extra,
            )
            report = asyncio.run(bench.run_all(args))
            reports.append({"model": model, **report})
            rows.append(_row(model, report))
            print(rows[-1], flush=True)
    lines = [
        f"# Gateway ceiling and U2-Net-P service, {dt.date.today().isoformat()}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), {platform.python_implementation()} "
        f"{platform.python_version()}, CPU only; one gateway with its embedded Triton (`--load-model "
        "instant`), the sweep's 1 MP JPEG photos (benchmarks/make_images.py), PNG out. `instant` is the "
        "stand-in model (next to no compute); gateway CPU is the gateway process and its children "
        "without Triton, from /proc, over the service rounds.",
        "",
        "    .venv/bin/python benchmarks/gateway_ceiling.py",
        "",
        f"In-process floor, the same run: {floor:.1f} ms of CPU an image (the gateway's CPU steps in one "
        "thread, benchmarks/steps.py). Gateway CPU over that floor: "
        + ", ".join(
            f"{r['model']} c={r['runs'][0]['concurrency']}: "
            f"{r['runs'][0]['gateway_cpu_ms_per_request'] / floor:.2f}"
            for r in reports
        )
        + ".",
        "",
        COLUMNS,
        "|" + "---|" * (COLUMNS.count("|") - 1),
        *rows,
        "",
        "Every report, as `bgremove bench --json` prints it:",
        "",
        "```json",
        json.dumps(reports, indent=1),
        "```",
    ]
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
