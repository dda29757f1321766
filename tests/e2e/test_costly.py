"""Costly inputs against the real gateway and Triton: small or upload-sized files built to cost CPU
or memory (thousands of scans, marker floods, inflating chunks, chunk floods), each at the largest
size the limits allow and as the reproduced attack. Every one is answered within a bound, refusals
name the limit, an ordinary photo sent alongside stays within 3x its time alone, and the gateway's
peak memory stays within its budget."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Iterator

import grpc
import pytest
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from bgremove_gateway.config import Limits
from costly_inputs import Costly, corpus
from e2e_helpers import upload_messages
from load_helpers import MASK, Outcome, peak_rss_bytes, remove, reset_peak_rss, rss_bytes, small_jpeg
from service_harness import GatewayProcess

MiB = 1 << 20
BUDGET = 768 * MiB
# The largest at-limit decode here (12.8 MP with 100 scans) takes ~0.6 s of CPU alone; a refusal
# is one structural scan of at most 50 MB.
ANSWER_S = 20.0
REFUSAL_S = 5.0
# RSS past the idle gateway's: the budget, plus gRPC's buffers for a 50 MB upload in flight and the
# allocator's slack.
RSS_MARGIN = 160 * MiB
BYSTANDER = small_jpeg(skdata.coffee(), 512)
# The 64 MP item costs minutes of PNG encoding here without proving anything the 12.8 MP one does not.
SKIP = {"jpeg-scan-pixels-at"}


def _items() -> list[Costly]:
    return [c for c in corpus(Limits()) if c.variant in ("at", "attack") and c.name not in SKIP]


@pytest.fixture(scope="module")
def costly_gateway(gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(
        args=[
            "--triton-url",
            f"127.0.0.1:{gateway.triton_grpc_port}",
            "--memory-budget-bytes",
            str(BUDGET),
        ]
    )
    with gw.serving():
        yield gw


async def _send(stub: pb_grpc.BackgroundRemovalStub, item: Costly, data: bytes) -> Outcome:
    messages = upload_messages(data, item.content_type, MASK, chunk=1 * MiB)
    return await remove(stub, data, messages=messages, timeout=60)


async def _bystander_alone(stub: pb_grpc.BackgroundRemovalStub) -> float:
    times = []
    for _ in range(3):
        outcome = await remove(stub, BYSTANDER)
        assert outcome.ok, outcome.details
        times.append(outcome.latency_s)
    return statistics.median(times)


async def test_costly_inputs_are_bounded_and_harm_no_bystander(costly_gateway: GatewayProcess) -> None:
    gw = costly_gateway
    assert gw.proc is not None
    pid = gw.proc.pid
    with grpc.insecure_channel(gw.target, options=[("grpc.max_send_message_length", 64 * MiB)]) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        await _bystander_alone(stub)  # warm
        idle = rss_bytes(pid)
        reset_peak_rss(pid)
        report = []
        for item in _items():
            data = await asyncio.to_thread(item.make)
            # Two tries: on two shared cores one pair of timings can be off by the neighbours' load.
            for _ in range(2):
                alone = await _bystander_alone(stub)
                costly, bystander = await asyncio.gather(_send(stub, item, data), remove(stub, BYSTANDER))
                ratio = bystander.latency_s / alone
                if bystander.ok and bystander.latency_s <= max(3 * alone, 0.3):
                    break
            report.append(f"{item.name}: {costly.code.name} {costly.latency_s:.2f} s, bystander {ratio:.1f}x")
            if item.variant == "attack":
                assert costly.code == grpc.StatusCode.INVALID_ARGUMENT, (item.name, costly.details)
                assert "over the limit" in costly.details, (item.name, costly.details)
                assert costly.latency_s < REFUSAL_S, (item.name, costly.latency_s)
            else:
                # At the limit: decoded, or refused by a later, ordinary rule (e.g. no image data).
                assert costly.ok or costly.code == grpc.StatusCode.INVALID_ARGUMENT, (
                    item.name,
                    costly.details,
                )
                assert costly.latency_s < ANSWER_S, (item.name, costly.latency_s)
            assert bystander.ok, (item.name, bystander.details)
            # A floor of 0.3 s: on two shared cores a bystander's own steps jitter by that much.
            assert bystander.latency_s <= max(3 * alone, 0.3), (item.name, bystander.latency_s, alone, report)
            del data
        peak = peak_rss_bytes(pid)
    assert peak - idle <= BUDGET + RSS_MARGIN, (
        f"peak RSS {(peak - idle) / MiB:.0f} MiB over idle\n" + "\n".join(report)
    )
    assert gw.proc.poll() is None
    print("\n".join(report), f"\npeak RSS over idle: {(peak - idle) / MiB:.0f} MiB")


def test_limits_on_costly_structure_are_reported(costly_gateway: GatewayProcess) -> None:
    lim = Limits()
    with grpc.insecure_channel(costly_gateway.target) as channel:
        info = pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10)
    got = info.limits
    assert (got.max_jpeg_scans, got.max_jpeg_scan_pixels, got.max_image_segments, got.max_metadata_bytes) == (
        lim.max_jpeg_scans,
        lim.max_jpeg_scan_pixels,
        lim.max_image_segments,
        lim.max_metadata_bytes,
    )
    assert got.upload_timeout_ms == int(lim.upload_timeout_s * 1000)
