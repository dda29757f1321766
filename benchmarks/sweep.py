"""The standard sweep: models x image sizes 0.3/1/4/12 MP x concurrency 1/4/16, service vs Triton vs model.

Starts its own gateway with an embedded Triton on free loopback ports (so "Triton direct" is the
same Triton the gateway uses), runs `bgremove bench` for every cell, and writes a Markdown table:

    .venv/bin/python benchmarks/sweep.py [--models u2netp u2net] [--requests N] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).parent))
from make_images import SIZES_MP, make

BGREMOVE = str(Path(sys.executable).with_name("bgremove"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(target: str, proc: subprocess.Popen[bytes], timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited with {proc.returncode}")
        with grpc.insecure_channel(target) as ch:
            try:
                check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if check.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.5)
    raise SystemExit("gateway not SERVING in time")


def bench(target: str, triton: str, images: Path, concurrency: int, requests: int, model: str) -> dict:
    cmd = [
        BGREMOVE,
        "bench",
        "--model",
        model,
        "--target",
        target,
        "--triton-url",
        triton,
        "--images",
        str(images),
        "--concurrency",
        str(concurrency),
        "--requests",
        str(requests),
        "--model-alone",
        "--json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode not in (0, 1):
        raise SystemExit(out.stderr)
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["u2netp", "u2net"])
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--sizes", type=float, nargs="+", default=list(SIZES_MP))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/latest.md"))
    ap.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "bgremove-bench-images")
    ns = ap.parse_args()
    folders = make(ns.images)
    target, triton_port = f"127.0.0.1:{free_port()}", free_port()
    proc = subprocess.Popen(
        [
            BGREMOVE,
            "serve",
            "--listen",
            target,
            "--triton-grpc-port",
            str(triton_port),
            "--triton-http-port",
            str(free_port()),
            "--triton-metrics-port",
            str(free_port()),
            "--log-level",
            "WARNING",
        ],
        env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
    )
    rows = []
    try:
        wait_serving(target, proc)
        for model in ns.models:
            for mp in ns.sizes:
                for conc in ns.concurrency:
                    report = bench(target, f"127.0.0.1:{triton_port}", folders[mp], conc, ns.requests, model)
                    runs = {r["name"]: r for r in report["runs"]}
                    rows.append((model, mp, conc, runs, report["ratios"]))
                    throughputs = {k: v["throughput_per_s"] for k, v in runs.items()}
                    ratios = json.dumps(report["ratios"])
                    print(f"{model} {mp:g} MP c={conc}: {json.dumps(throughputs)} {ratios}", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    lines = [
        f"# bgremove benchmark sweep, {dt.date.today().isoformat()}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}, CPU only (Triton Python backend + ONNX Runtime), PNG output.",
        f"{ns.requests} requests per cell; JPEG inputs from benchmarks/make_images.py.",
        "",
        "| model | input | conc | service img/s | p50 ms | p95 ms | p99 ms | Triton img/s | Triton p50 ms "
        "| model img/s | service/Triton | service/model | gateway added p50 ms | statuses |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, mp, conc, runs, ratios in rows:
        s, t, m = runs["service"], runs.get("triton", {}), runs.get("model", {})
        lines.append(
            f"| {model} | {mp:g} MP | {conc} | {s['throughput_per_s']:.2f} | {s['p50_ms']:.0f} "
            f"| {s['p95_ms']:.0f} "
            f"| {s['p99_ms']:.0f} | {t.get('throughput_per_s', 0):.2f} | {t.get('p50_ms', 0):.0f} "
            f"| {m.get('throughput_per_s', '')} | {ratios.get('service_over_triton_throughput', '')} "
            f"| {ratios.get('service_over_model_throughput', '')} "
            f"| {ratios.get('gateway_added_p50_ms', '')} "
            f"| {s['statuses']} |"
        )
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
