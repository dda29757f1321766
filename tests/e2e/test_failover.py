"""Failover: one gateway over two real Tritons; replicas killed with SIGKILL under load, all of them
down, one back; and the embedded Triton killed under a gateway that supervises it."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import pytest_asyncio
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2
from PIL import Image
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from bgremove_gateway.config import TritonSettings
from bgremove_gateway.triton.embedded import EmbeddedTriton, _child_pids, process_alive
from e2e_helpers import iou, reference_mask
from load_helpers import children, codes, drive, open_fds, remove, small_jpeg
from service_harness import GatewayProcess, free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PHOTOS = [
    small_jpeg(skdata.astronaut(), 192),
    small_jpeg(skdata.chelsea(), 192),
    small_jpeg(skdata.coffee(), 192),
    small_jpeg(skdata.rocket(), 192),
]


def triton_settings(repo: Path) -> TritonSettings:
    return TritonSettings(
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        model_repository=repo,
        startup_timeout_s=120.0,
    )


async def executions(triton: EmbeddedTriton) -> int:
    """Images this Triton has run u2netp on since it started."""
    client = triton_aio.InferenceServerClient(triton.grpc_url)
    try:
        stats: dict[str, Any] = await client.get_inference_statistics("u2netp", as_json=True)
    finally:
        await client.close()
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("count", 0))


async def wait_health(gw: GatewayProcess, want: int, timeout_s: float) -> float:
    """Seconds until the gateway's health is `want`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if await asyncio.to_thread(gw.health) == want:
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"health not {want} within {timeout_s} s:\n{gw.log_text()[-3000:]}")


@pytest_asyncio.fixture(scope="module")
async def tritons(prepared_repo: Path) -> AsyncIterator[list[EmbeddedTriton]]:
    pair = [EmbeddedTriton(triton_settings(prepared_repo)) for _ in range(2)]
    try:
        await asyncio.gather(*(t.start() for t in pair))
        yield pair
    finally:
        await asyncio.gather(*(t.stop() for t in pair))


@pytest.fixture(scope="module")
def pooled_gateway(tritons: list[EmbeddedTriton]) -> Any:
    gw = GatewayProcess(
        args=[
            "--triton-url",
            tritons[0].grpc_url,
            "--triton-url",
            tritons[1].grpc_url,
            "--log-level",
            "DEBUG",
        ]
    )
    with gw.serving():
        yield gw


@pytest.fixture(scope="module")
def references() -> list[npt.NDArray[np.uint8]]:
    return [reference_mask(Image.open(io.BytesIO(p))) for p in PHOTOS]


def assert_correct(mask: npt.NDArray[np.uint8], reference: npt.NDArray[np.uint8]) -> None:
    assert mask.shape == reference.shape
    assert iou(mask >= 128, reference >= 128) >= 0.97
    assert np.abs(mask.astype(int) - reference.astype(int)).mean() <= 3


async def test_sigkill_of_one_replica_under_load_loses_no_request(
    pooled_gateway: GatewayProcess, tritons: list[EmbeddedTriton], references: list[npt.NDArray[np.uint8]]
) -> None:
    victim, survivor = tritons
    victim_pid = victim.pid
    assert victim_pid is not None
    done = 0
    killed_at: int | None = None

    with grpc.insecure_channel(pooled_gateway.target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)

        async def call(i: int) -> Any:
            nonlocal done, killed_at
            outcome = await remove(stub, PHOTOS[i % len(PHOTOS)])
            done += 1
            if done >= 60 and killed_at is None:
                killed_at = done
                # Both replicas have been serving; now one dies mid-batch, with calls on it.
                assert await executions(victim) > 0 and await executions(survivor) > 0
                os.kill(victim_pid, signal.SIGKILL)
            return outcome

        started = time.monotonic()
        outcomes = await drive(200, 8, call)
        elapsed = time.monotonic() - started

    assert killed_at == 60
    assert codes(outcomes) == {"OK": 200}, [o.details for o in outcomes if not o.ok][:5]
    for i, outcome in enumerate(outcomes):
        assert_correct(outcome.mask(), references[i % len(PHOTOS)])
    log = pooled_gateway.log_text()
    assert f"Triton replica {victim.grpc_url} ejected" in log
    assert "trying another replica" in log, "no call was in flight on the killed replica"
    print(f"200 requests at concurrency 8 with one of two replicas killed: all OK in {elapsed:.1f} s")
    await victim.stop()  # reap it and its backend stubs


async def test_all_replicas_down_fails_fast_then_recovers_without_restart(
    pooled_gateway: GatewayProcess, tritons: list[EmbeddedTriton], references: list[npt.NDArray[np.uint8]]
) -> None:
    first, second = tritons
    if first.running:  # alone, without the test above
        os.kill(first.pid or 0, signal.SIGKILL)
        await first.stop()
    assert second.pid is not None
    os.kill(second.pid, signal.SIGKILL)
    await second.stop()
    to_not_serving = await wait_health(pooled_gateway, NOT_SERVING, 10)

    with grpc.insecure_channel(pooled_gateway.target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        outcomes = await asyncio.gather(*(remove(stub, PHOTOS[0]) for _ in range(8)))
        assert codes(outcomes) == {"UNAVAILABLE": 8}
        assert max(o.latency_s for o in outcomes) < 1.0, "must fail fast, not wait for a deadline"
        details = outcomes[0].details
        assert "not ready" in details and "0 of 2 Triton replicas" in details, details
        assert first.grpc_url in details and second.grpc_url in details, details
        assert all(o.retry_after_s for o in outcomes)

        # One replica comes back on its old address: the gateway finds it by itself.
        await first.start()
        back = time.monotonic()
        to_serving = await wait_health(pooled_gateway, SERVING, 30)
        outcome = await remove(stub, PHOTOS[1])
        assert outcome.ok, outcome.details
        assert_correct(outcome.mask(), references[1])
        first_call_s = time.monotonic() - back
    assert f"Triton replica {first.grpc_url} re-admitted" in pooled_gateway.log_text()
    assert pooled_gateway.proc is not None and pooled_gateway.proc.poll() is None
    print(
        f"all down: NOT_SERVING after {to_not_serving:.2f} s, calls refused in "
        f"{max(o.latency_s for o in outcomes) * 1000:.0f} ms; one back: SERVING after {to_serving:.2f} s, "
        f"first call done {first_call_s:.2f} s after Triton was ready"
    )


async def test_killed_embedded_triton_is_restarted_and_serves_again() -> None:
    gw = GatewayProcess()
    await asyncio.to_thread(gw.start)
    try:
        await asyncio.to_thread(gw.wait_serving, 120)
        assert gw.proc is not None
        (triton_pid,) = children(gw.proc.pid, "tritonserver")
        with grpc.insecure_channel(gw.target) as channel:
            stub = pb_grpc.BackgroundRemovalStub(channel)
            assert (await remove(stub, PHOTOS[2])).ok

            stubs = _child_pids(triton_pid)
            assert stubs, "the Python backend runs the model in stub processes"
            fds_before = open_fds(gw.proc.pid)
            os.kill(triton_pid, signal.SIGKILL)
            killed = time.monotonic()
            to_not_serving = await wait_health(gw, NOT_SERVING, 10)
            # Triton's own health probe can see the dead port a moment before the supervisor reaps
            # the process; the refusal then says "connection refused" until the exit is known.
            for _ in range(50):
                refused = await remove(stub, PHOTOS[2])
                assert refused.code == grpc.StatusCode.UNAVAILABLE, refused.details
                assert "not ready" in refused.details, refused.details
                if "killed by signal 9" in refused.details:
                    break
                await asyncio.sleep(0.1)
            assert "killed by signal 9" in refused.details, refused.details

            await wait_health(gw, SERVING, 120)
            to_serving = time.monotonic() - killed
            outcome = await remove(stub, PHOTOS[2])
            assert outcome.ok, outcome.details
        (restarted,) = children(gw.proc.pid, "tritonserver")
        assert restarted != triton_pid
        # The dead Triton's stubs were killed with it and its output pipe closed: nothing leaks
        # per crash.
        assert not [p for p in stubs if process_alive(p)]
        assert open_fds(gw.proc.pid) <= fds_before + 2
        assert "embedded Triton restarted (restart 1)" in gw.log_text()
        print(
            f"embedded Triton killed: NOT_SERVING after {to_not_serving:.2f} s, "
            f"SERVING again after {to_serving:.2f} s"
        )
    finally:
        assert await asyncio.to_thread(gw.stop) == 0
