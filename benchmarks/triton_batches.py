"""Triton alone at client batch sizes 1-32: images/s and latency per batch, for the GPU configs.

Sends uint8 [B, 320, 320, 3] tensors straight to a running Triton (the gateway is not involved) at
a fixed number of requests in flight, for each batch size B the model's max_batch_size allows, and
prints one Markdown row per size. On a GPU node (NVIDIA's Triton container, this model repository,
`--model-config-name=gpu` or `gpu-tensorrt`) this is the table to record in benchmarks/results/:

    .venv/bin/python benchmarks/triton_batches.py --url TRITON_HOST:8001 [--model u2netp]
        [--batches 1 2 4 8 16 32] [--concurrency 4] [--requests 64]

It runs against the CPU Triton too (max_batch_size 8 there), which is how it is checked here.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio


async def measure(
    client: grpcclient_aio.InferenceServerClient, model: str, batch: int, concurrency: int, requests: int
) -> tuple[float, float, float]:
    """(images/s, p50 ms, p95 ms) for `requests` calls of `batch` images, `concurrency` at once."""
    rng = np.random.default_rng(batch)
    tensor = rng.integers(0, 256, (batch, 320, 320, 3), dtype=np.uint8)
    latencies: list[float] = []
    todo = iter(range(requests))

    async def one() -> None:
        inp = grpcclient.InferInput("image", list(tensor.shape), "UINT8")
        inp.set_data_from_numpy(tensor)
        t0 = time.perf_counter()
        result = await client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("mask")])
        latencies.append((time.perf_counter() - t0) * 1000)
        mask = result.as_numpy("mask")
        if mask is None or mask.shape != (batch, 320, 320):
            raise SystemExit(f"unexpected output for batch {batch}: {None if mask is None else mask.shape}")

    async def worker() -> None:
        for _ in todo:
            await one()

    await one()  # first call at this shape (TensorRT may build or load a profile): not measured
    latencies.clear()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    p95 = statistics.quantiles(latencies, n=20)[-1] if len(latencies) >= 2 else latencies[0]
    return batch * requests / wall, statistics.median(latencies), p95


async def main_async(ns: argparse.Namespace) -> int:
    client = grpcclient_aio.InferenceServerClient(ns.url)
    try:
        config = await client.get_model_config(ns.model, as_json=True)
        max_batch = int(config["config"].get("max_batch_size", 0))
        platform = config["config"].get("backend") or config["config"].get("platform")
        print(f"model {ns.model} on {ns.url}: backend {platform}, max_batch_size {max_batch}")
        print("| batch | concurrency | images/s | p50 ms per request | p95 ms | ms per image |")
        print("|---|---|---|---|---|---|")
        for batch in ns.batches:
            if batch > max_batch:
                print(f"| {batch} | - | skipped: above max_batch_size {max_batch} | | | |")
                continue
            rate, p50, p95 = await measure(client, ns.model, batch, ns.concurrency, ns.requests)
            print(f"| {batch} | {ns.concurrency} | {rate:.1f} | {p50:.1f} | {p95:.1f} | {1000 / rate:.2f} |")
    finally:
        await client.close()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="127.0.0.1:8001", help="Triton's gRPC address")
    ap.add_argument("--model", default="u2netp")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--requests", type=int, default=64)
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
