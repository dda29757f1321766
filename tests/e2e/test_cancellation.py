"""Callers who walk away: cancel, deadline and disconnect at every point of a call, against the real
gateway and Triton, for every output format, with and without API keys, with and without tracing.

After each: the gateway is alive and SERVING, its memory budget and stream count are back to zero,
the call wrote its one access line, no worker process went missing or was left behind, and the
next ordinary call succeeds. A crash here is the worst bug the service can have (one client with a
short deadline would take every replica down).
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from bgremove_gateway.access.keys import KeyLimits, new_key, write_keys
from bgremove_gateway.pipeline.encode import OUTPUT_FORMATS as FORMATS
from e2e_helpers import jpeg_bytes, upload_messages
from load_helpers import children
from service_harness import GatewayProcess, OtlpReceiver

RESULT_CHUNK = 16 * 1024
UPLOAD_CHUNK = 32 * 1024
PHOTO = jpeg_bytes(np.asarray(Image.fromarray(skdata.astronaut()).resize((1024, 1024))), quality=92)
ADMISSION = re.compile(r"admission: streams=(\d+) reserved_bytes=(\d+)")
ACCESS = re.compile(r"bgremove\.access .*method=StreamRemoveBackground status=(\w+)")


@dataclass
class Variant:
    gateway: GatewayProcess
    metadata: tuple[tuple[str, str], ...]
    traced: bool


@pytest.fixture(
    scope="module",
    params=[(False, False), (True, True), (True, False), (False, True)],
    ids=["plain", "keys+tracing", "keys", "tracing"],
)
def variant(
    request: pytest.FixtureRequest,
    gateway: GatewayProcess,
    otlp: OtlpReceiver,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Variant]:
    keyed, traced = request.param
    args = [
        "--triton-url",
        f"127.0.0.1:{gateway.triton_grpc_port}",
        "--result-chunk-bytes",
        str(RESULT_CHUNK),
        "--log-level",
        "DEBUG",
    ]
    metadata: tuple[tuple[str, str], ...] = ()
    if keyed:
        path = tmp_path_factory.mktemp("keys") / "keys.json"
        record, key = new_key("walker", KeyLimits(rate=0, burst=0, max_streams=0))
        write_keys(path, [record])
        args += ["--api-keys-file", str(path)]
        metadata = (("authorization", f"Bearer {key}"),)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"} if traced else {}
    gw = GatewayProcess(args=args, env=env)
    with gw.serving():
        yield Variant(gw, metadata, traced)
        log = gw.log_text()
    assert "Traceback" not in log, log[-4000:]
    assert "Failed to detach context" not in log


def _header(fmt: int) -> pb.UploadRequest:
    return next(iter(upload_messages(PHOTO, "image/jpeg", pb.Options(format=fmt))))


def _chunks() -> list[pb.UploadRequest]:
    return list(upload_messages(PHOTO, "image/jpeg", chunk=UPLOAD_CHUNK))[1:]


async def _forever() -> None:
    await asyncio.Event().wait()


async def _requests(
    fmt: int, *, chunks: int | None = None, stall: bool = False
) -> AsyncIterator[pb.UploadRequest]:
    yield _header(fmt)
    body = _chunks()
    for message in body if chunks is None else body[:chunks]:
        yield message
    if stall:
        await _forever()


Stub = pb_grpc.BackgroundRemovalStub
Metadata = tuple[tuple[str, str], ...]
Scenario = Callable[[Stub, grpc.aio.Channel, int, Metadata], Awaitable[None]]


async def _expect_end(call: grpc.aio.StreamStreamCall, *codes: grpc.StatusCode) -> None:
    code = await call.code()
    assert code in codes, (code, await call.details())


async def before_header(stub: Stub, channel: grpc.aio.Channel, fmt: int, md: Metadata) -> None:
    async def nothing() -> AsyncIterator[pb.UploadRequest]:
        await _forever()
        yield _header(fmt)

    call = stub.StreamRemoveBackground(nothing(), metadata=md)
    await asyncio.sleep(0.3)
    call.cancel()
    await _expect_end(call, grpc.StatusCode.CANCELLED)


async def mid_upload(stub: Stub, channel: grpc.aio.Channel, fmt: int, md: Metadata) -> None:
    call = stub.StreamRemoveBackground(_requests(fmt, chunks=3, stall=True), metadata=md)
    await asyncio.sleep(0.3)
    call.cancel()
    await _expect_end(call, grpc.StatusCode.CANCELLED)


def _after_upload(delay_s: float) -> Scenario:
    async def scenario(stub: Stub, channel: grpc.aio.Channel, fmt: int, md: Metadata) -> None:
        sent = asyncio.Event()

        async def requests() -> AsyncIterator[pb.UploadRequest]:
            async for message in _requests(fmt):
                yield message
            sent.set()

        call = stub.StreamRemoveBackground(requests(), metadata=md)
        await sent.wait()
        await asyncio.sleep(delay_s)
        call.cancel()
        await _expect_end(call, grpc.StatusCode.CANCELLED)

    return scenario


async def _read_until(call: grpc.aio.StreamStreamCall, chunks: int | None) -> None:
    """Reads the header and `chunks` result chunks (None: every byte of the result)."""
    header = await call.read()
    assert header.HasField("header"), header
    size, got, n = header.header.size, 0, 0
    while (chunks is None and got < size) or (chunks is not None and n < chunks and got < size):
        message = await call.read()
        got += len(message.chunk)
        n += 1


async def between_chunks(stub: Stub, channel: grpc.aio.Channel, fmt: int, md: Metadata) -> None:
    call = stub.StreamRemoveBackground(_requests(fmt), metadata=md)
    await _read_until(call, 1)
    call.cancel()
    await _expect_end(call, grpc.StatusCode.CANCELLED)


async def on_last_chunk(stub: Stub, channel: grpc.aio.Channel, fmt: int, md: Metadata) -> None:
    call = stub.StreamRemoveBackground(_requests(fmt), metadata=md)
    await _read_until(call, None)
    call.cancel()
    await _expect_end(call, grpc.StatusCode.CANCELLED, grpc.StatusCode.OK)


async def deadline_mid_upload(stub: Stub, channel: grpc.aio.Channel, fmt: int, md: Metadata) -> None:
    call = stub.StreamRemoveBackground(_requests(fmt, chunks=3, stall=True), metadata=md, timeout=0.4)
    await _expect_end(call, grpc.StatusCode.DEADLINE_EXCEEDED)


async def deadline_while_processing(stub: Stub, channel: grpc.aio.Channel, fmt: int, md: Metadata) -> None:
    call = stub.StreamRemoveBackground(_requests(fmt), metadata=md, timeout=0.25)
    await _expect_end(call, grpc.StatusCode.DEADLINE_EXCEEDED)


async def slow_reader_past_deadline(stub: Stub, channel: grpc.aio.Channel, fmt: int, md: Metadata) -> None:
    call = stub.StreamRemoveBackground(_requests(fmt), metadata=md, timeout=2.0)
    try:
        await _read_until(call, 1)
    except grpc.aio.AioRpcError as exc:  # a slow run may pass the deadline before the header
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        return
    await asyncio.sleep(2.5)
    await _expect_end(call, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK)


async def disconnect_mid_upload(stub: Stub, channel: grpc.aio.Channel, fmt: int, md: Metadata) -> None:
    stub.StreamRemoveBackground(_requests(fmt, chunks=3, stall=True), metadata=md)
    await asyncio.sleep(0.3)
    await channel.close()


async def disconnect_mid_result(stub: Stub, channel: grpc.aio.Channel, fmt: int, md: Metadata) -> None:
    call = stub.StreamRemoveBackground(_requests(fmt), metadata=md)
    await _read_until(call, 1)
    await channel.close()


POINTS: dict[str, Scenario] = {
    "before-header": before_header,
    "mid-upload": mid_upload,
    "during-decode": _after_upload(0.005),
    "during-inference": _after_upload(0.12),
    "between-chunks": between_chunks,
    "on-last-chunk": on_last_chunk,
    "deadline-mid-upload": deadline_mid_upload,
    "deadline-while-processing": deadline_while_processing,
    "slow-reader-past-deadline": slow_reader_past_deadline,
    "disconnect-mid-upload": disconnect_mid_upload,
    "disconnect-mid-result": disconnect_mid_result,
}


async def _eventually(check: Callable[[], bool], timeout_s: float) -> bool:
    for _ in range(int(timeout_s / 0.05)):
        if check():
            return True
        await asyncio.sleep(0.05)
    return check()


async def _ordinary_call(target: str, md: tuple[tuple[str, str], ...], fmt: int) -> bytes:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        parts: list[bytes] = []
        async for message in stub.StreamRemoveBackground(_requests(fmt), metadata=md, timeout=60):
            if message.HasField("chunk"):
                parts.append(message.chunk)
        return b"".join(parts)


def _admission(gw: GatewayProcess) -> tuple[str, str] | None:
    found = ADMISSION.findall(gw.log_text())
    return found[-1] if found else None


async def _admission_back_to_zero(gw: GatewayProcess, timeout_s: float = 20.0) -> None:
    if not await _eventually(lambda: _admission(gw) == ("0", "0"), timeout_s):
        raise AssertionError(f"admission not back to zero: last streams, reserved_bytes = {_admission(gw)}")


@pytest.mark.parametrize("fmt", list(FORMATS), ids=list(FORMATS))
async def test_a_caller_walking_away_at_any_point_ends_only_its_own_call(variant: Variant, fmt: str) -> None:
    gw = variant.gateway
    assert gw.proc is not None
    pid = gw.proc.pid
    workers = set(children(pid))
    code = FORMATS[fmt]
    for name, scenario in POINTS.items():
        accessed = len(ACCESS.findall(gw.log_text()))
        channel = grpc.aio.insecure_channel(gw.target)
        try:
            await asyncio.wait_for(
                scenario(pb_grpc.BackgroundRemovalStub(channel), channel, code, variant.metadata), 30
            )
        finally:
            await channel.close()
        # The walked-away call writes exactly one access line when it has really ended, then gives
        # back its stream slot and memory.
        assert await _eventually(lambda: len(ACCESS.findall(gw.log_text())) > accessed, 20), name  # noqa: B023
        await _admission_back_to_zero(gw)
        assert gw.proc.poll() is None, f"gateway died at {name}:\n" + gw.log_text()[-4000:]
        assert gw.health() == health_pb2.HealthCheckResponse.SERVING, name
        assert set(children(pid)) == workers, f"worker processes changed at {name}"
        result = await _ordinary_call(gw.target, variant.metadata, code)
        assert result, name
        if fmt in ("png", "webp", "mask"):
            assert Image.open(io.BytesIO(result)).size == (1024, 1024)
        assert await _eventually(lambda: len(ACCESS.findall(gw.log_text())) == accessed + 2, 5), name  # noqa: B023
        await _admission_back_to_zero(gw)
