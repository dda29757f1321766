"""Admission control: the stream cap, the memory budget, and where the pipeline reserves from it."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator

import grpc
import pytest
from PIL import Image

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.config import Limits
from bgremove_gateway.errors import BUDGET_RETRY_AFTER_S, ServiceError
from bgremove_gateway.pipeline.decode import decode
from bgremove_gateway.pipeline.flow import TicketBudget
from bgremove_gateway.pipeline.upload import read_stream_upload
from bgremove_gateway.runtime.budget import (
    BYTES_PER_PIXEL,
    PER_REQUEST_OVERHEAD_BYTES,
    MemoryBudget,
    image_bytes_estimate,
)

MiB = 1 << 20


def test_stream_cap_refuses_with_a_retry_hint_and_frees_on_release() -> None:
    admission = MemoryBudget(memory_budget_bytes=64 * MiB, max_concurrent_streams=3)
    tickets = [admission.ticket() for _ in range(3)]
    for t in tickets:
        t.enter()
    extra = admission.ticket()
    with pytest.raises(ServiceError) as err:
        extra.enter()
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.message == "too many concurrent streams: 3 open, the limit is 3; retry in 1 s"
    assert err.value.retry_after_s == BUDGET_RETRY_AFTER_S
    extra.release()  # a refused ticket releases nothing it did not take
    assert admission.streams == 3
    tickets[0].release()
    tickets[0].release()  # idempotent
    assert admission.streams == 2
    extra.enter()
    assert admission.streams == 3


def test_memory_budget_refuses_what_does_not_fit_now_and_admits_it_later() -> None:
    admission = MemoryBudget(memory_budget_bytes=10 * MiB, max_concurrent_streams=10)
    first, second = admission.ticket(), admission.ticket()
    first.enter()
    second.enter()
    first.reserve(6 * MiB, "an upload")
    with pytest.raises(ServiceError) as err:
        second.reserve(4 * MiB, "a 1000x1000 image")
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.retry_after_s == BUDGET_RETRY_AFTER_S
    free = 10 * MiB - 6 * MiB - 2 * PER_REQUEST_OVERHEAD_BYTES
    assert err.value.message == (
        f"the gateway is at its memory budget: a 1000x1000 image needs {4 * MiB} bytes, "
        f"{free} of {10 * MiB} are free; retry in 1 s"
    )
    assert admission.reserved_bytes == 6 * MiB + 2 * PER_REQUEST_OVERHEAD_BYTES
    first.release()
    second.reserve(4 * MiB, "a 1000x1000 image")
    assert admission.reserved_bytes == 4 * MiB + PER_REQUEST_OVERHEAD_BYTES
    second.release()
    assert (admission.reserved_bytes, admission.streams) == (0, 0)


def test_a_request_larger_than_the_whole_budget_gets_no_retry_hint() -> None:
    admission = MemoryBudget(memory_budget_bytes=10 * MiB, max_concurrent_streams=10)
    ticket = admission.ticket()
    ticket.enter()
    with pytest.raises(ServiceError) as err:
        ticket.reserve(20 * MiB, "a 5000x4000 image")
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.retry_after_s is None, "retrying cannot help"
    assert "more than its whole memory budget of 10485760 bytes" in err.value.message
    ticket.release()
    assert admission.reserved_bytes == 0


def test_concurrent_reservations_from_threads_never_exceed_the_budget() -> None:
    admission = MemoryBudget(memory_budget_bytes=40 * MiB, max_concurrent_streams=6)
    outcomes = {"admitted": 0, "refused": 0, "over": 0}
    lock = threading.Lock()

    def work() -> None:
        for _ in range(300):
            ticket = admission.ticket()
            try:
                ticket.enter()
                ticket.reserve(3 * MiB, "x")
                ticket.reserve(5 * MiB, "y")
                key = "over" if admission.reserved_bytes > admission.memory_budget_bytes else "admitted"
            except ServiceError:
                key = "refused"
            finally:
                ticket.release()
            with lock:
                outcomes[key] += 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (admission.reserved_bytes, admission.streams) == (0, 0)
    assert outcomes["over"] == 0
    assert outcomes["admitted"] + outcomes["refused"] == 2400


def test_estimate_is_per_output_format() -> None:
    assert (
        image_bytes_estimate(1000, 1000, pb.OUTPUT_FORMAT_MASK)
        == 1_000_000 * BYTES_PER_PIXEL[pb.OUTPUT_FORMAT_MASK]
    )
    # Lossless WebP needs about twice a PNG (libwebp's buffers), a mask much less.
    png = image_bytes_estimate(100, 100, pb.OUTPUT_FORMAT_PNG)
    assert (
        image_bytes_estimate(100, 100, pb.OUTPUT_FORMAT_WEBP)
        > 2 * png
        > 2 * image_bytes_estimate(100, 100, pb.OUTPUT_FORMAT_MASK)
    )
    assert image_bytes_estimate(100, 100, pb.OUTPUT_FORMAT_UNSPECIFIED) == png


async def test_an_upload_that_can_never_fit_is_refused_at_the_header_before_any_chunk() -> None:
    admission = MemoryBudget(memory_budget_bytes=4 * MiB, max_concurrent_streams=4)
    ticket = admission.ticket()
    ticket.enter()
    chunks_read = 0

    async def messages() -> AsyncIterator[pb.UploadRequest]:
        nonlocal chunks_read
        yield pb.UploadRequest(header=pb.UploadHeader(content_type="image/png", total_size=8 * MiB))
        for _ in range(8):
            chunks_read += 1
            yield pb.UploadRequest(chunk=bytes(MiB))

    with pytest.raises(ServiceError) as err:
        await read_stream_upload(messages(), Limits(), TicketBudget(ticket))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "an upload of 8388608 bytes" in err.value.message and "whole memory budget" in err.value.message
    assert chunks_read == 0
    ticket.release()


async def test_a_stalled_upload_holds_only_the_bytes_it_sent_not_what_it_declared() -> None:
    admission = MemoryBudget(memory_budget_bytes=64 * MiB, max_concurrent_streams=4)
    ticket = admission.ticket()
    ticket.enter()
    sent = asyncio.Event()

    async def trickle() -> AsyncIterator[pb.UploadRequest]:
        yield pb.UploadRequest(header=pb.UploadHeader(content_type="image/png", total_size=50 * MiB))
        yield pb.UploadRequest(chunk=bytes(MiB))
        sent.set()
        await asyncio.sleep(3600)

    reading = asyncio.create_task(read_stream_upload(trickle(), Limits(), TicketBudget(ticket)))
    await sent.wait()
    await asyncio.sleep(0.05)
    assert admission.reserved_bytes == PER_REQUEST_OVERHEAD_BYTES + MiB
    # A second caller's 50 MiB upload still fits beside it.
    other = admission.ticket()
    other.enter()
    other.reserve(50 * MiB, "another upload")
    other.release()
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    ticket.release()
    assert (admission.reserved_bytes, admission.streams) == (0, 0)


def test_decode_reports_the_size_before_decoding_and_can_be_refused() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 20, 30)).save(buf, "PNG")
    seen: list[tuple[int, int]] = []
    decoded = decode(buf.getvalue(), "image/png", Limits(), lambda w, h, extra: seen.append((w, h)))
    assert seen == [(300, 200)] and decoded.image.size == (300, 200)

    def refuse(width: int, height: int, extra_bytes: int) -> None:
        raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no room for {width}x{height}")

    with pytest.raises(ServiceError) as err:
        decode(buf.getvalue(), "image/png", Limits(), refuse)
    # The refusal itself reaches the caller, not "corrupt image".
    assert (err.value.code, err.value.message) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "no room for 300x200")


def test_admission_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        MemoryBudget(memory_budget_bytes=0, max_concurrent_streams=1)
    with pytest.raises(ValueError):
        MemoryBudget(memory_budget_bytes=1, max_concurrent_streams=0)


async def test_reservations_from_worker_threads_while_the_loop_runs() -> None:
    """decode() reserves from the executor's threads; release happens on the loop."""
    admission = MemoryBudget(memory_budget_bytes=100 * MiB, max_concurrent_streams=10)
    tickets = [admission.ticket() for _ in range(5)]
    for t in tickets:
        t.enter()
    await asyncio.gather(*(asyncio.to_thread(t.reserve, 10 * MiB, "img") for t in tickets))
    assert admission.reserved_bytes == 5 * (10 * MiB + PER_REQUEST_OVERHEAD_BYTES)
    for t in tickets:
        t.release()
    assert admission.reserved_bytes == 0
