"""Backpressure with a real gateway and Triton: idle streams against the stream cap, load at
several times capacity against the memory budget, and Triton's own full queue."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from bgremove_gateway.errors import ServiceError
from bgremove_gateway.triton.pool import TritonPool
from load_helpers import open_fds, peak_rss_bytes, remove, reset_peak_rss, rss_bytes, small_jpeg
from service_harness import BGREMOVE, GatewayProcess

MiB = 1 << 20
BUDGET = 96 * MiB
STREAMS = 16
IDLE_S = 2.0
UPLOAD_S = 6.0
# What RSS may exceed the idle gateway's plus the budget by: gRPC's per-stream buffers (16 streams
# of up to 1 MiB chunks in flight), the allocator's fragmentation, and encoder scratch the
# per-pixel estimates round off.
RSS_MARGIN = 64 * MiB


@pytest.fixture(scope="module")
def small_gateway() -> Iterator[GatewayProcess]:
    gw = GatewayProcess(
        args=[
            "--memory-budget-bytes",
            str(BUDGET),
            "--max-concurrent-streams",
            str(STREAMS),
            "--idle-timeout",
            str(IDLE_S),
            "--upload-timeout",
            str(UPLOAD_S),
        ]
    )
    gw.start()
    try:
        gw.wait_serving()
        yield gw
    finally:
        assert gw.stop() == 0


@pytest.fixture(scope="module")
def big_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 1600x1200 photos: a PNG cut-out of each is estimated at ~31 MB, so three fit the budget."""
    folder = tmp_path_factory.mktemp("big")
    for name, array in (("astronaut", skdata.astronaut()), ("coffee", skdata.coffee())):
        Image.fromarray(array).convert("RGB").resize((1600, 1200)).save(folder / f"{name}.jpg", quality=90)
    return folder


async def test_idle_streams_cannot_exhaust_the_server(small_gateway: GatewayProcess) -> None:
    gw = small_gateway
    assert gw.proc is not None
    fds_before = open_fds(gw.proc.pid)
    hold = threading.Event()

    def nothing() -> Iterator[pb.UploadRequest]:
        hold.wait(30)
        return
        yield  # a generator that sends nothing until released

    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        idle = [asyncio.create_task(remove(stub, b"", messages=nothing())) for _ in range(STREAMS)]
        await asyncio.sleep(0.5)
        opened = time.monotonic()
        refused = await remove(stub, small_jpeg(skdata.chelsea(), 128))
        assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"too many concurrent streams: {STREAMS} open, the limit is {STREAMS}" in refused.details
        assert refused.retry_after_s == 1.0
        assert refused.latency_s < 1.0
        # Health and service info are not streams: they still answer.
        assert await asyncio.to_thread(gw.health) == health_pb2.HealthCheckResponse.SERVING
        await asyncio.to_thread(stub.GetServiceInfo, pb.GetServiceInfoRequest(), timeout=5)

        cut_off = await asyncio.gather(*idle)
        assert {o.code for o in cut_off} == {grpc.StatusCode.DEADLINE_EXCEEDED}
        assert all("idle timeout of 2 s" in o.details for o in cut_off)
        assert time.monotonic() - opened < IDLE_S + 2
        hold.set()
        served = await remove(stub, small_jpeg(skdata.chelsea(), 128))
        assert served.ok, served.details
    await asyncio.sleep(0.5)
    assert open_fds(gw.proc.pid) <= fds_before + 2


def _trickle(declared: int, stop: threading.Event) -> Iterator[pb.UploadRequest]:
    """Slowloris: declares a large upload, then sends one byte well inside every idle timeout."""
    yield pb.UploadRequest(header=pb.UploadHeader(content_type="image/jpeg", total_size=declared))
    while not stop.wait(IDLE_S / 2):
        yield pb.UploadRequest(chunk=b"\xff")


async def test_trickling_streams_hold_no_memory_and_are_cut_off_at_the_upload_timeout(
    small_gateway: GatewayProcess,
) -> None:
    gw = small_gateway
    photo = small_jpeg(skdata.chelsea(), 1024)  # ~11 MB of budget as a mask
    stop = threading.Event()
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        # Each declares 45 MiB: reserving declarations would hold 90 of the 96 MiB budget with two.
        trickling = [
            asyncio.create_task(remove(stub, b"", messages=_trickle(45 * MiB, stop)))
            for _ in range(STREAMS - 1)
        ]
        try:
            await asyncio.sleep(IDLE_S)
            served = await remove(stub, photo)
            assert served.ok, f"an ordinary caller was kept out by trickling streams: {served.details}"
            # The last slot too: now every stream slot is held, and an ordinary caller is let in
            # once the upload timeout ends the tricklers, not later.
            trickling.append(asyncio.create_task(remove(stub, b"", messages=_trickle(45 * MiB, stop))))
            await asyncio.sleep(0.5)
            started = time.monotonic()
            while not (served := await remove(stub, photo)).ok:
                assert served.code == grpc.StatusCode.RESOURCE_EXHAUSTED, served.details
                assert time.monotonic() - started < UPLOAD_S + 2, "kept out past the upload timeout"
                await asyncio.sleep(served.retry_after_s or 0.2)
            cut_off = await asyncio.gather(*trickling)
        finally:
            stop.set()
    assert {o.code for o in cut_off} == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert all(f"upload timeout of {UPLOAD_S:g} s" in o.details for o in cut_off), cut_off[0].details


def test_overload_at_several_times_capacity_refuses_with_a_status_and_bounds_memory(
    small_gateway: GatewayProcess, big_photos: Path
) -> None:
    gw = small_gateway
    assert gw.proc is not None
    pid = gw.proc.pid

    def bench(concurrency: int, requests: int) -> dict[str, Any]:
        args = ["--concurrency", str(concurrency), "--requests", str(requests), "--json"]
        out = subprocess.run(
            [BGREMOVE, "bench", "--target", gw.target, "--images", str(big_photos), "--format", "png", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode in (0, 1), out.stderr
        report: dict[str, Any] = json.loads(out.stdout)
        run: dict[str, Any] = report["runs"][0]
        return run

    warm = bench(2, 4)  # the allocator's arenas and the encoders' first use
    assert warm["statuses"] == {"OK": 4}
    idle_rss = rss_bytes(pid)
    reset_peak_rss(pid)

    run = bench(48, 480)  # 48 at once: three times the stream cap, 16 times what the budget holds
    peak = peak_rss_bytes(pid)
    statuses = run["statuses"]
    assert sum(statuses.values()) == 480, "every request ended with a status"
    assert set(statuses) <= {"OK", "RESOURCE_EXHAUSTED"}, statuses
    assert statuses.get("OK", 0) >= 1 and statuses.get("RESOURCE_EXHAUSTED", 0) >= 48, statuses
    assert run["retry_hinted"] == statuses["RESOURCE_EXHAUSTED"], "every refusal says when to retry"
    assert run["error_p99_ms"] < 1000, "refusals are fast"
    assert peak <= idle_rss + BUDGET + RSS_MARGIN, (peak - idle_rss) / MiB
    assert gw.health() == health_pb2.HealthCheckResponse.SERVING
    print(
        f"overload 48 at once, 480 requests: {statuses}; peak RSS {peak / MiB:.0f} MiB = idle "
        f"{idle_rss / MiB:.0f} MiB + {(peak - idle_rss) / MiB:.0f} MiB (budget {BUDGET / MiB:.0f} MiB)"
    )


async def test_full_triton_queue_fails_fast_and_keeps_the_replica(small_gateway: GatewayProcess) -> None:
    """Straight at Triton through the gateway's pool: 100 calls at once against a queue of 64."""
    pool = TritonPool([f"127.0.0.1:{small_gateway.triton_grpc_port}"], default_model="u2netp")
    await pool.start()
    try:
        assert pool.status.ready
        image = np.random.default_rng(0).integers(0, 256, (320, 320, 3), dtype=np.uint8)

        async def one() -> tuple[str, float, float | None]:
            started = time.monotonic()
            try:
                await pool.infer("u2netp", image, timeout_s=6.0)
            except ServiceError as err:
                return err.code.name, time.monotonic() - started, err.retry_after_s
            return "OK", time.monotonic() - started, None

        outcomes = await asyncio.gather(*(one() for _ in range(100)))
        by_code: dict[str, list[tuple[str, float, float | None]]] = {}
        for outcome in outcomes:
            by_code.setdefault(outcome[0], []).append(outcome)
        assert set(by_code) <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, set(by_code)
        full = by_code["RESOURCE_EXHAUSTED"]
        assert len(full) >= 100 - 64 - 8 - 8  # queue, a batch running, one forming
        assert max(latency for _, latency, _ in full) < 1.5
        assert {retry for _, _, retry in full} == {1.0}
        # Queue-full is load, not a fault: the replica is neither ejected nor retried elsewhere.
        (replica,) = pool.replicas
        assert not replica.ejected and pool.status.ready
    finally:
        await pool.close()
    print({code: len(v) for code, v in by_code.items()})
