"""Upload protocol and option checks: every refusal has the right status and names the limit."""

from __future__ import annotations

import asyncio
import hashlib
import mmap
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc
import pytest

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc
from bgremove_gateway.config import Limits
from bgremove_gateway.errors import ServiceError
from bgremove_gateway.pipeline.upload import read_stream_upload, unary_upload, validate_options

LIMITS = Limits(max_upload_bytes=10_000, max_chunk_bytes=1_000, max_unary_bytes=2_000, idle_timeout_s=5.0)
PAYLOAD = bytes(range(256)) * 20  # 5120 bytes


def header(
    total_size: int = len(PAYLOAD),
    content_type: str = "image/png",
    sha256: bytes = b"",
    options: pb.Options | None = None,
) -> pb.UploadRequest:
    return pb.UploadRequest(
        header=pb.UploadHeader(
            content_type=content_type, total_size=total_size, sha256=sha256, options=options
        )
    )


def chunks(data: bytes, size: int = 1_000) -> list[pb.UploadRequest]:
    return [pb.UploadRequest(chunk=data[i : i + size]) for i in range(0, len(data), size)]


async def stream(
    messages: Iterable[pb.UploadRequest], *, then_stall: bool = False
) -> AsyncIterator[pb.UploadRequest]:
    for message in messages:
        yield message
    if then_stall:
        await asyncio.Event().wait()  # a client that stops sending but never half-closes


async def refused(
    messages: Iterable[pb.UploadRequest], limits: Limits = LIMITS, *, then_stall: bool = False
) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await asyncio.wait_for(read_stream_upload(stream(messages, then_stall=then_stall), limits), 10)
    return caught.value


async def test_chunks_are_assembled_in_order_with_options_and_normalised_type() -> None:
    options = pb.Options(format=pb.OUTPUT_FORMAT_WEBP, crop=True)
    upload = await read_stream_upload(
        stream(
            [
                header(
                    content_type=" Image/PNG; charset=binary",
                    sha256=hashlib.sha256(PAYLOAD).digest(),
                    options=options,
                ),
                *chunks(PAYLOAD, 777),
            ]
        ),
        LIMITS,
    )
    assert bytes(upload.data) == PAYLOAD
    assert upload.content_type == "image/png"
    assert upload.options == options


async def test_upload_exactly_at_the_limits_is_accepted() -> None:
    data = b"\x01" * LIMITS.max_upload_bytes
    upload = await read_stream_upload(
        stream([header(total_size=len(data)), *chunks(data, LIMITS.max_chunk_bytes)]), LIMITS
    )
    assert len(upload.data) == LIMITS.max_upload_bytes


async def test_image_jpg_is_read_as_image_jpeg() -> None:
    upload = await read_stream_upload(stream([header(content_type="image/jpg"), *chunks(PAYLOAD)]), LIMITS)
    assert upload.content_type == "image/jpeg"


async def test_stream_that_ends_before_the_header() -> None:
    err = await refused([])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "before the header" in err.message


async def test_chunk_before_header() -> None:
    err = await refused([*chunks(PAYLOAD), header()])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message must carry the header, got a chunk" in err.message


async def test_empty_message_before_header() -> None:
    err = await refused([pb.UploadRequest()])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty UploadRequest" in err.message


async def test_second_header() -> None:
    err = await refused([header(), *chunks(PAYLOAD[:1000]), header()])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "second header" in err.message


async def test_header_without_any_chunk() -> None:
    err = await refused([header()])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no image bytes" in err.message
    assert str(len(PAYLOAD)) in err.message


async def test_zero_total_size() -> None:
    err = await refused([header(total_size=0)])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "total_size is 0" in err.message
    assert str(LIMITS.max_upload_bytes) in err.message


async def test_chunk_over_the_chunk_limit() -> None:
    err = await refused([header(), pb.UploadRequest(chunk=PAYLOAD[:1001])])
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1001 bytes" in err.message and "limit of 1000 bytes" in err.message
    assert err.violations[0].field == "chunk"


async def test_declared_size_over_the_limit_is_refused_before_any_chunk_is_read() -> None:
    pulled: list[pb.UploadRequest] = []

    async def client() -> AsyncIterator[pb.UploadRequest]:
        yield header(total_size=LIMITS.max_upload_bytes + 1)
        for message in chunks(PAYLOAD):
            pulled.append(message)
            yield message

    with pytest.raises(ServiceError) as caught:
        await read_stream_upload(client(), LIMITS)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "10001 bytes" in caught.value.message and "limit of 10000 bytes" in caught.value.message
    assert pulled == []


async def test_declared_size_far_over_the_limit_allocates_nothing() -> None:
    err = await refused([header(total_size=2**63)])
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(2**63) in err.message


async def test_more_bytes_than_declared_is_refused_as_soon_as_they_arrive() -> None:
    started = time.monotonic()
    err = await refused([header(total_size=1500), *chunks(PAYLOAD[:2000])], then_stall=True)
    assert time.monotonic() - started < LIMITS.idle_timeout_s  # did not wait for the end of the stream
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than the 1500 bytes declared" in err.message
    assert "2000 bytes so far" in err.message


async def test_running_total_over_the_upload_limit() -> None:
    # Declared at the limit, then one byte more: the total passes the limit as well as the declaration.
    limits = Limits(max_upload_bytes=3_000, max_chunk_bytes=1_000, idle_timeout_s=5.0)
    messages = [header(total_size=3_000), *chunks(PAYLOAD[:3_000]), pb.UploadRequest(chunk=b"x")]
    err = await refused(messages, limits, then_stall=True)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 3000 bytes" in err.message and "3001 bytes so far" in err.message


async def test_fewer_bytes_than_declared() -> None:
    err = await refused([header(total_size=5000), *chunks(PAYLOAD[:4321])])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "after 4321 bytes" in err.message and "declared 5000" in err.message


@pytest.mark.parametrize("digest", [b"\x00" * 31, b"\x00" * 33, b"\x00"])
async def test_sha256_of_wrong_length(digest: bytes) -> None:
    err = await refused([header(sha256=digest), *chunks(PAYLOAD)])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"is {len(digest)} bytes" in err.message and "32 bytes" in err.message


async def test_sha256_mismatch() -> None:
    wrong = hashlib.sha256(PAYLOAD[:-1]).digest()
    err = await refused([header(sha256=wrong), *chunks(PAYLOAD)])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not match" in err.message
    assert err.violations[0].field == "header.sha256"


async def test_stall_after_header_is_cut_off_at_the_idle_timeout() -> None:
    limits = Limits(idle_timeout_s=0.2)
    started = time.monotonic()
    err = await refused([header(), *chunks(PAYLOAD[:2000])], limits, then_stall=True)
    assert 0.2 <= time.monotonic() - started < 2
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "idle timeout of 0.2 s" in err.message


async def test_stall_before_header_is_cut_off_too() -> None:
    err = await refused([], Limits(idle_timeout_s=0.1), then_stall=True)
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_slow_but_steady_client_is_not_cut_off() -> None:
    async def slow() -> AsyncIterator[pb.UploadRequest]:
        yield header()
        for message in chunks(PAYLOAD):
            await asyncio.sleep(0.05)
            yield message

    upload = await read_stream_upload(slow(), Limits(idle_timeout_s=0.2))
    assert bytes(upload.data) == PAYLOAD


async def test_a_trickling_client_is_cut_off_at_the_whole_upload_timeout() -> None:
    async def trickle() -> AsyncIterator[pb.UploadRequest]:
        yield header()
        for message in chunks(PAYLOAD, 10):
            await asyncio.sleep(0.05)  # well inside the idle timeout, every time
            yield message

    limits = Limits(idle_timeout_s=1.0, upload_timeout_s=0.5)
    started = asyncio.get_running_loop().time()
    with pytest.raises(ServiceError) as caught:
        await read_stream_upload(trickle(), limits)
    assert asyncio.get_running_loop().time() - started < 0.9
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert caught.value.message == "upload too slow: not complete within the upload timeout of 0.5 s"


async def test_empty_chunks_are_refused_with_the_chunk_limit() -> None:
    err = await refused([header(), pb.UploadRequest(chunk=b""), *chunks(PAYLOAD)])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message == "empty chunk: every chunk carries 1 to 1000 image bytes"
    assert err.violations[0].field == "chunk"


@pytest.mark.parametrize("content_type", ["", "  "])
async def test_missing_content_type(content_type: str) -> None:
    err = await refused([header(content_type=content_type), *chunks(PAYLOAD)])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing" in err.message and "image/jpeg, image/png, image/webp" in err.message


@pytest.mark.parametrize("content_type", ["image/gif", "text/plain", "application/octet-stream"])
async def test_unsupported_content_type(content_type: str) -> None:
    err = await refused([header(content_type=content_type), *chunks(PAYLOAD)])
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert content_type in err.message and "image/jpeg, image/png, image/webp" in err.message


def test_unary_upload_keeps_bytes_and_options() -> None:
    options = pb.Options(format=pb.OUTPUT_FORMAT_MASK)
    upload = unary_upload(
        pb.RemoveBackgroundRequest(content_type="IMAGE/WEBP", image=PAYLOAD[:2000], options=options), LIMITS
    )
    assert upload.data == PAYLOAD[:2000]
    assert upload.content_type == "image/webp"
    assert upload.options == options


def test_unary_upload_over_its_limit_points_to_streaming() -> None:
    request = pb.RemoveBackgroundRequest(content_type="image/png", image=PAYLOAD[:2001])
    with pytest.raises(ServiceError) as caught:
        unary_upload(request, LIMITS)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2001 bytes" in caught.value.message and "limit of 2000 bytes" in caught.value.message
    assert "use StreamRemoveBackground for larger images" in caught.value.message


def test_unary_upload_without_image() -> None:
    with pytest.raises(ServiceError) as caught:
        unary_upload(pb.RemoveBackgroundRequest(content_type="image/png"), LIMITS)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "image is empty" in caught.value.message


def test_unary_upload_unsupported_content_type() -> None:
    with pytest.raises(ServiceError) as caught:
        unary_upload(pb.RemoveBackgroundRequest(content_type="image/bmp", image=PAYLOAD[:10]), LIMITS)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'image/bmp' is not supported" in caught.value.message


MODELS = ("u2netp", "u2net")
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"\0" * 8  # only sniffed here; decoded later (test_background.py)


def test_options_at_their_limits_are_valid() -> None:
    validate_options(
        pb.Options(
            format=pb.OUTPUT_FORMAT_JPEG,
            bg_color=pb.Color(r=255, g=255, b=255),
            crop=True,
            crop_margin=10_000,
            max_output_side=LIMITS.max_output_side,
            model="u2net",
        ),
        LIMITS,
        MODELS,
    )
    validate_options(pb.Options(), LIMITS, MODELS)
    validate_options(
        pb.Options(
            format=pb.OUTPUT_FORMAT_WEBP,
            bg_color=pb.Color(r=1),
            bg_image=PNG_BYTES,
            roi=pb.Region(x1=pb.Length(px=2**32 - 1), x2=pb.Length(percent=100)),
            crop=True,
            # Over the caps (half the subject, 10000 px) is capped, as remove.bg does, not refused.
            crop_margins=pb.Margins(top=pb.Length(px=2**32 - 1), left=pb.Length(percent=500)),
            scale_percent=10,
            position=pb.Position(placement=pb.PLACEMENT_PERCENT, x_percent=0, y_percent=100),
            max_output_pixels=2**64 - 1,
        ),
        LIMITS,
        MODELS,
    )
    # bg_color with MASK was accepted, and ignored, before the new options: it still is.
    validate_options(pb.Options(format=pb.OUTPUT_FORMAT_MASK, bg_color=pb.Color(g=2)), LIMITS, MODELS)
    validate_options(pb.Options(format=pb.OUTPUT_FORMAT_ZIP, crop=True, scale_percent=100), LIMITS, MODELS)
    # Like crop_margin, and as remove.bg, margins without crop have no effect.
    validate_options(pb.Options(crop_margins=pb.Margins(top=pb.Length(px=5))), LIMITS, MODELS)


def test_bg_image_over_its_limit_is_refused_with_the_limit() -> None:
    limits = Limits(max_bg_image_bytes=len(PNG_BYTES) - 1)
    with pytest.raises(ServiceError) as caught:
        validate_options(pb.Options(bg_image=PNG_BYTES), limits, MODELS)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.violations[0].field == "options.bg_image"
    assert f"{len(PNG_BYTES)} bytes is over the limit of {len(PNG_BYTES) - 1} bytes" in caught.value.message


async def test_a_streams_bg_image_counts_toward_its_upload_limit_before_any_chunk() -> None:
    background = PNG_BYTES * 100  # 1600 bytes; the upload limit is 10000
    options = pb.Options(bg_image=background)
    err = await refused([header(total_size=9_000, options=options)], then_stall=True)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.violations[0].field == "header.total_size"
    assert "upload of 9000 bytes plus an options.bg_image of 1600 bytes is 10600 bytes" in err.message
    upload = await read_stream_upload(stream([header(options=options), *chunks(PAYLOAD)]), LIMITS)
    assert upload.options.bg_image == background


async def test_a_streams_bg_image_is_charged_with_the_header() -> None:
    class Budget:
        def __init__(self) -> None:
            self.calls: list[tuple[str, int]] = []

        def declared(self, total_size: int) -> None:
            self.calls.append(("declared", total_size))

        def received(self, nbytes: int) -> None:
            self.calls.append(("received", nbytes))

    budget = Budget()
    messages = [header(options=pb.Options(bg_image=PNG_BYTES)), *chunks(PAYLOAD, 5_000)]
    await read_stream_upload(stream(messages), Limits(max_chunk_bytes=5_000), budget)
    assert budget.calls == [
        ("declared", len(PAYLOAD) + len(PNG_BYTES)),
        ("received", len(PNG_BYTES)),
        ("received", 5_000),
        ("received", len(PAYLOAD) - 5_000),
    ]


def test_a_unary_bg_image_counts_toward_the_unary_limit() -> None:
    request = pb.RemoveBackgroundRequest(
        content_type="image/png", image=b"\x89PNG" * 497, options=pb.Options(bg_image=PNG_BYTES)
    )
    with pytest.raises(ServiceError) as caught:
        unary_upload(request, LIMITS)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.violations[0].field == "image"
    assert "1988 bytes plus an options.bg_image of 16 bytes is 2004 bytes" in caught.value.message
    assert "StreamRemoveBackground" in caught.value.message


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        (pb.Options(format=99), "options.format", ["99", "OUTPUT_FORMAT_PNG", "OUTPUT_FORMAT_JPEG"]),  # type: ignore[arg-type]
        (pb.Options(bg_color=pb.Color(r=1, g=256, b=3)), "options.bg_color.g", ["256", "0 to 255"]),
        (pb.Options(bg_color=pb.Color(b=2**32 - 1)), "options.bg_color.b", [str(2**32 - 1)]),
        (
            pb.Options(max_output_side=LIMITS.max_output_side + 1),
            "options.max_output_side",
            [str(LIMITS.max_output_side + 1), f"limit of {LIMITS.max_output_side}"],
        ),
        (pb.Options(crop=True, crop_margin=10_001), "options.crop_margin", ["10001", "limit of 10000"]),
        (pb.Options(model="u2net_human_seg"), "options.model", ["'u2net_human_seg'", "u2netp, u2net"]),
        (pb.Options(roi=pb.Region(x2=pb.Length(percent=101))), "options.roi.x2.percent", ["101", "0 to 100"]),
        (pb.Options(roi=pb.Region(y1=pb.Length(percent=-1))), "options.roi.y1.percent", ["-1"]),
        (pb.Options(roi=pb.Region(x1=pb.Length(percent=float("nan")))), "options.roi.x1.percent", ["nan"]),
        (
            pb.Options(crop=True, crop_margins=pb.Margins(bottom=pb.Length(percent=-0.5))),
            "options.crop_margins.bottom.percent",
            ["-0.5", "a finite percentage, 0 or more"],
        ),
        (
            pb.Options(crop=True, crop_margins=pb.Margins(left=pb.Length(percent=float("inf")))),
            "options.crop_margins.left.percent",
            ["inf"],
        ),
        (pb.Options(scale_percent=9.9), "options.scale_percent", ["9.9", "10 to 100", "0 keeps"]),
        (pb.Options(scale_percent=100.5), "options.scale_percent", ["100.5"]),
        (pb.Options(scale_percent=float("inf")), "options.scale_percent", ["inf"]),
        (
            pb.Options(position=pb.Position(placement=7)),  # type: ignore[arg-type]
            "options.position.placement",
            ["7", "PLACEMENT_PERCENT"],
        ),
        (
            pb.Options(position=pb.Position(placement=pb.PLACEMENT_PERCENT, y_percent=120)),
            "options.position.y_percent",
            ["120", "0 to 100"],
        ),
        (
            pb.Options(position=pb.Position(placement=pb.PLACEMENT_CENTER, x_percent=30)),
            "options.position.x_percent",
            ["30", "only to PLACEMENT_PERCENT"],
        ),
        (
            pb.Options(format=pb.OUTPUT_FORMAT_MASK, bg_image=PNG_BYTES),
            "options.bg_image",
            ["no effect on OUTPUT_FORMAT_MASK"],
        ),
        (
            pb.Options(format=pb.OUTPUT_FORMAT_ZIP, bg_color=pb.Color(r=1)),
            "options.bg_color",
            ["no effect on OUTPUT_FORMAT_ZIP"],
        ),
        (pb.Options(bg_image=b"GIF89a....."), "options.bg_image", ["image/gif", "image/jpeg, image/png"]),
        (pb.Options(bg_image=b"hello"), "options.bg_image", ["not an image"]),
    ],
)
def test_invalid_options(options: pb.Options, field: str, words: list[str]) -> None:
    with pytest.raises(ServiceError) as caught:
        validate_options(options, LIMITS, MODELS)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.violations[0].field == field
    for word in words:
        assert word in caught.value.message


class _EchoSize(bgremove_pb2_grpc.BackgroundRemovalServicer):
    """Just enough of a servicer to drive read_stream_upload with grpc.aio's own request iterator."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    async def StreamRemoveBackground(
        self, request_iterator: AsyncIterator[pb.UploadRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ResultChunk]:
        try:
            upload = await read_stream_upload(request_iterator, self.limits)
        except ServiceError as err:
            await context.abort(err.code, err.message)
        yield pb.ResultChunk(header=pb.ResultHeader(size=len(upload.data), content_type=upload.content_type))
        yield pb.ResultChunk(chunk=hashlib.sha256(upload.data).digest())


async def test_over_a_real_grpc_stream() -> None:
    limits = Limits(max_chunk_bytes=1_000, idle_timeout_s=0.3)
    server = grpc.aio.server()
    bgremove_pb2_grpc.add_BackgroundRemovalServicer_to_server(_EchoSize(limits), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = bgremove_pb2_grpc.BackgroundRemovalStub(channel)
            answer = [m async for m in stub.StreamRemoveBackground(stream([header(), *chunks(PAYLOAD)]))]
            assert answer[0].header.size == len(PAYLOAD)
            assert answer[1].chunk == hashlib.sha256(PAYLOAD).digest()

            stalled = stub.StreamRemoveBackground(
                stream([header(), *chunks(PAYLOAD[:1000])], then_stall=True)
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stalled:
                    pass
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "idle timeout of 0.3 s" in (caught.value.details() or "")
    finally:
        await server.stop(None)


# --- buffers are released at once ---------------------------------------------------------------


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def test_cancelling_mid_upload_frees_its_buffer_at_once() -> None:
    """40 MiB arrive of 48 MiB declared, then the caller goes away: the pages are given back to
    the OS when the task is cancelled, without waiting for the garbage collector."""
    limits = Limits(max_upload_bytes=64 << 20, max_chunk_bytes=1 << 20, idle_timeout_s=30)
    arrived = asyncio.Event()
    block = bytes(range(256)) * 4096  # 1 MiB

    async def client() -> AsyncIterator[pb.UploadRequest]:
        yield header(total_size=48 << 20)
        for _ in range(40):
            yield pb.UploadRequest(chunk=block)
        arrived.set()
        await asyncio.Event().wait()

    before = rss_mib()
    reading = asyncio.create_task(read_stream_upload(client(), limits))
    await arrived.wait()
    await asyncio.sleep(0.05)
    holding = rss_mib()
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    after = rss_mib()
    assert holding - before > 35, (before, holding)
    assert after - before < 8, (before, holding, after)


async def test_a_refused_upload_frees_its_buffer_at_once() -> None:
    limits = Limits(max_upload_bytes=64 << 20, max_chunk_bytes=1 << 20, idle_timeout_s=30)
    block = b"\x07" * (1 << 20)
    messages = [header(total_size=40 << 20), *[pb.UploadRequest(chunk=block)] * 39, header()]
    before = rss_mib()
    with pytest.raises(ServiceError) as caught:
        await read_stream_upload(stream(messages), limits)
    assert "second header" in caught.value.message
    assert rss_mib() - before < 8


async def test_close_releases_a_streamed_upload() -> None:
    upload = await read_stream_upload(stream([header(), *chunks(PAYLOAD)]), LIMITS)
    assert isinstance(upload.data, mmap.mmap) and not upload.data.closed
    upload.close()
    assert upload.data.closed
    upload.close()  # twice is fine
    unary_upload(pb.RemoveBackgroundRequest(image=b"x", content_type="image/png"), LIMITS).close()


async def test_close_while_a_decode_still_reads_is_safe() -> None:
    """A cancelled call's decode may still run in a worker thread: closing must neither fail nor
    pull the memory from under it; the map is released when that reader lets go."""
    upload = await read_stream_upload(stream([header(), *chunks(PAYLOAD)]), LIMITS)
    assert isinstance(upload.data, mmap.mmap)
    view = memoryview(upload.data)  # what decode()'s reader holds
    upload.close()
    assert bytes(view[:16]) == PAYLOAD[:16]
    view.release()
    upload.data.close()
    assert upload.data.closed


async def test_a_bad_bg_image_is_refused_at_the_header_before_any_chunk() -> None:
    err = await refused([header(options=pb.Options(bg_image=b"GIF89a" + bytes(10)))], then_stall=True)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.violations[0].field == "options.bg_image"
