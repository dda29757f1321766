"""The servicer in process: a real grpc.aio server on loopback with the interceptor that closes
response streams (service/calls.py), the real Pipeline, and a fixed mask in place of Triton.

Every call ends with the memory budget, the stream count and the idle-trim count back at zero,
whether it succeeded, was refused, or the caller went away mid-result or mid-inference."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import grpc
import numpy as np
import numpy.typing as npt
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from bgremove_gateway import __version__
from bgremove_gateway.config import Limits, Settings
from bgremove_gateway.errors import NOT_READY_RETRY_AFTER_S
from bgremove_gateway.pipeline.contract import MODEL_INPUT_SIZE
from bgremove_gateway.pipeline.flow import Pipeline
from bgremove_gateway.pipeline.upload import MAX_CROP_MARGIN
from bgremove_gateway.runtime.budget import MemoryBudget
from bgremove_gateway.runtime.memory import IdleTrim
from bgremove_gateway.service.calls import CallLifecycle
from bgremove_gateway.service.servicer import BackgroundRemovalServicer, ServingState
from bgremove_gateway.tools.load import upload_messages

LIMITS = Limits(result_chunk_bytes=1024)
MiB = 1 << 20


class FixedMask:
    """Stands in for Triton: the same mask for every image, the subject a centred square. With
    `hold` set, each call waits for it first (a model that is still running)."""

    def __init__(self) -> None:
        self.mask = np.zeros((MODEL_INPUT_SIZE, MODEL_INPUT_SIZE), np.uint8)
        quarter = MODEL_INPUT_SIZE // 4
        self.mask[quarter:-quarter, quarter:-quarter] = 255
        self.hold: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.calls = 0
        self.sizes: dict[str, int] = {}  # models with another input side than MODEL_INPUT_SIZE

    async def infer(
        self, model: str, image: npt.NDArray[np.uint8], *, timeout_s: float | None = None
    ) -> npt.NDArray[np.uint8]:
        side = self.sizes.get(model, MODEL_INPUT_SIZE)
        assert image.shape == (side, side, 3) and image.dtype == np.uint8
        self.calls += 1
        self.started.set()
        if self.hold is not None:
            await self.hold.wait()
        # The same centred square at the model's own size.
        return (
            self.mask
            if side == MODEL_INPUT_SIZE
            else cv2.resize(self.mask, (side, side), interpolation=cv2.INTER_NEAREST)
        )


class AccessLines(logging.Handler):
    """The access log's records, one per call."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass
class Service:
    stub: pb_grpc.BackgroundRemovalStub
    state: ServingState
    budget: MemoryBudget
    idle: IdleTrim
    model: FixedMask
    access: AccessLines
    trims: list[int] = field(default_factory=list)
    pipeline: Pipeline | None = None

    async def settled(self) -> None:
        """Waits until every call has released what it held (the release runs as the call ends,
        which a client may see a moment before)."""
        deadline = time.monotonic() + 5
        while (self.budget.streams, self.budget.reserved_bytes, self.idle.in_flight) != (0, 0, 0):
            assert time.monotonic() < deadline, (self.budget.streams, self.budget.reserved_bytes)
            await asyncio.sleep(0.01)


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    """Built as service/server.py builds it, less access control, tracing and Triton."""
    settings = Settings(limits=LIMITS, memory_budget_bytes=512 * MiB, max_concurrent_streams=4)
    state = ServingState(ready=True, models=["u2netp"])
    budget = MemoryBudget(settings.memory_budget_bytes, settings.max_concurrent_streams)
    trims: list[int] = []
    idle = IdleTrim(delay_s=0.05, trim=lambda: trims.append(1))
    model = FixedMask()
    access = AccessLines()
    access_log = logging.getLogger("bgremove.access")
    access_log.addHandler(access)
    level = access_log.level
    access_log.setLevel(logging.INFO)
    server = grpc.aio.server(interceptors=[CallLifecycle()])
    with ThreadPoolExecutor(2, thread_name_prefix="test-cpu") as executor:
        pipeline = Pipeline(settings, model, executor)
        pb_grpc.add_BackgroundRemovalServicer_to_server(
            BackgroundRemovalServicer(pipeline, state, budget, idle), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield Service(
                    pb_grpc.BackgroundRemovalStub(channel),
                    state,
                    budget,
                    idle,
                    model,
                    access,
                    trims,
                    pipeline,
                )
        finally:
            await server.stop(None)
            access_log.removeHandler(access)
            access_log.setLevel(level)


def jpeg(width: int, height: int, *, noise: bool = False) -> bytes:
    rng = np.random.default_rng(7)
    if noise:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    else:
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
        pixels[..., 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


PHOTO = jpeg(400, 300)


def details(err: grpc.aio.AioRpcError) -> tuple[list[tuple[str, str]], float | None]:
    """The BadRequest field violations and the RetryInfo delay a refusal carried."""
    status = rpc_status.from_call(err)
    assert status is not None, "the refusal carried no google.rpc.Status"
    violations: list[tuple[str, str]] = []
    retry: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry = info.retry_delay.ToNanoseconds() / 1e9
    return violations, retry


def messages(
    data: bytes, options: pb.Options | None = None, content_type: str = "image/jpeg"
) -> Iterator[pb.UploadRequest]:
    return upload_messages(data, content_type, options, chunk=16 * 1024)


def access_line(service: Service, method: str) -> dict[str, str]:
    (line,) = [line for line in service.access.lines if f"method={method} " in line]
    return dict(part.split("=", 1) for part in line.split())


# --- successes ------------------------------------------------------------------------------------


async def test_a_streamed_result_is_a_header_then_chunks_that_add_up(service: Service) -> None:
    answer = [m async for m in service.stub.StreamRemoveBackground(messages(PHOTO))]
    assert answer[0].WhichOneof("payload") == "header"
    header = answer[0].header
    chunks = [m.chunk for m in answer[1:]]
    assert all(m.WhichOneof("payload") == "chunk" for m in answer[1:])
    assert sum(len(c) for c in chunks) == header.size > LIMITS.result_chunk_bytes
    assert all(len(c) == LIMITS.result_chunk_bytes for c in chunks[:-1])
    assert 0 < len(chunks[-1]) <= LIMITS.result_chunk_bytes
    assert (header.width, header.height, header.input_width, header.input_height) == (400, 300, 400, 300)
    assert (header.content_type, header.model) == ("image/png", "u2netp")
    # The fixed mask's square, scaled from the model's 320x320 to the photo.
    assert (header.foreground.x, header.foreground.y) == (100, 75)
    assert (header.foreground.width, header.foreground.height) == (200, 150)
    with Image.open(io.BytesIO(b"".join(chunks))) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "RGBA", (400, 300))
    await service.settled()
    line = access_line(service, "StreamRemoveBackground")
    assert (line["status"], line["bytes_in"], line["bytes_out"]) == ("OK", str(len(PHOTO)), str(header.size))


async def test_the_unary_call_answers_in_one_message(service: Service) -> None:
    options = pb.Options(format=pb.OUTPUT_FORMAT_MASK)
    request = pb.RemoveBackgroundRequest(image=PHOTO, content_type="image/jpeg", options=options)
    response = await service.stub.RemoveBackground(request)
    assert response.header.size == len(response.image)
    assert (response.header.width, response.header.height) == (400, 300)
    with Image.open(io.BytesIO(response.image)) as image:
        assert (image.mode, image.size) == ("L", (400, 300))
    await service.settled()
    assert access_line(service, "RemoveBackground")["status"] == "OK"


async def test_a_unary_result_too_large_for_one_message_is_refused_in_words(service: Service) -> None:
    service.model.mask[:] = 255  # all subject: the noise's PNG is 3 bytes a pixel, over 4 MiB
    photo = jpeg(1600, 1200, noise=True)
    options = pb.Options(format=pb.OUTPUT_FORMAT_PNG, bg_color=pb.Color(r=255, g=255, b=255))
    request = pb.RemoveBackgroundRequest(image=photo, content_type="image/jpeg", options=options)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.stub.RemoveBackground(request)
    err = caught.value
    limit = LIMITS.largest_answer_bytes
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"over the {limit} bytes one RemoveBackground answer can carry" in (err.details() or "")
    assert "StreamRemoveBackground" in (err.details() or "")
    await service.settled()
    assert access_line(service, "RemoveBackground")["status"] == "RESOURCE_EXHAUSTED"
    # The same photo streams.
    answer = [m async for m in service.stub.StreamRemoveBackground(messages(photo, options=options))]
    assert answer[0].header.size > limit


async def test_service_info_reports_the_models_the_limits_and_the_formats(service: Service) -> None:
    info = await service.stub.GetServiceInfo(pb.GetServiceInfoRequest())
    assert [(m.name, m.input_size, m.ready) for m in info.models] == [("u2netp", MODEL_INPUT_SIZE, True)]
    assert info.default_model == "u2netp"
    assert info.limits == pb.Limits(
        max_upload_bytes=LIMITS.max_upload_bytes,
        max_chunk_bytes=LIMITS.max_chunk_bytes,
        max_pixels=LIMITS.max_pixels,
        max_unary_bytes=LIMITS.max_unary_bytes,
        idle_timeout_ms=int(LIMITS.idle_timeout_s * 1000),
        upload_timeout_ms=int(LIMITS.upload_timeout_s * 1000),
        max_jpeg_scans=LIMITS.max_jpeg_scans,
        max_jpeg_scan_pixels=LIMITS.max_jpeg_scan_pixels,
        max_image_segments=LIMITS.max_image_segments,
        max_metadata_bytes=LIMITS.max_metadata_bytes,
        result_chunk_bytes=LIMITS.result_chunk_bytes,
        max_output_side=LIMITS.max_output_side,
        max_crop_margin=MAX_CROP_MARGIN,
        max_bg_image_bytes=LIMITS.max_bg_image_bytes,
    )
    assert list(info.output_formats) == [
        pb.OUTPUT_FORMAT_PNG,
        pb.OUTPUT_FORMAT_WEBP,
        pb.OUTPUT_FORMAT_MASK,
        pb.OUTPUT_FORMAT_JPEG,
        pb.OUTPUT_FORMAT_ZIP,
    ]
    assert list(info.input_content_types) == ["image/jpeg", "image/png", "image/webp"]
    assert info.version == __version__
    service.state.ready = False
    info = await service.stub.GetServiceInfo(pb.GetServiceInfoRequest())
    assert [(m.name, m.ready) for m in info.models] == [("u2netp", False)]


async def test_each_model_gets_images_at_the_input_size_triton_reports(service: Service) -> None:
    """A model whose Triton metadata says 64 gets 64x64 images and its 64x64 mask becomes a full-size
    matte; GetServiceInfo reports each model's own size."""
    assert service.pipeline is not None
    service.state.models = ["tiny", "u2netp"]
    service.pipeline.models = ("tiny", "u2netp")
    service.pipeline.input_sizes = {"tiny": 64}
    service.model.sizes = {"tiny": 64}
    info = await service.stub.GetServiceInfo(pb.GetServiceInfoRequest())
    assert [(m.name, m.input_size, m.ready) for m in info.models] == [
        ("tiny", 64, True),
        ("u2netp", MODEL_INPUT_SIZE, True),
    ]
    for model in ("tiny", "u2netp"):
        options = pb.Options(format=pb.OUTPUT_FORMAT_MASK, model=model)
        request = pb.RemoveBackgroundRequest(image=PHOTO, content_type="image/jpeg", options=options)
        response = await service.stub.RemoveBackground(request)
        assert response.header.model == model
        with Image.open(io.BytesIO(response.image)) as image:
            assert (image.mode, image.size) == ("L", (400, 300))
            matte = np.asarray(image)
        # The centred square, wherever the mask came from.
        assert matte[150, 200] == 255 and matte[5, 5] == 0
    assert service.model.calls == 2


# --- refusals -------------------------------------------------------------------------------------


Send = Callable[[pb_grpc.BackgroundRemovalStub], "grpc.aio.Call"]


@pytest.mark.parametrize(
    ("send", "code", "field_name", "words"),
    [
        pytest.param(
            lambda stub: stub.StreamRemoveBackground(messages(PHOTO, content_type="image/gif")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "header.content_type",
            "'image/gif' is not supported",
            id="stream-unsupported-type",
        ),
        pytest.param(
            lambda stub: stub.StreamRemoveBackground(
                messages(PHOTO, pb.Options(crop_margin=MAX_CROP_MARGIN + 1))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "options.crop_margin",
            f"over the limit of {MAX_CROP_MARGIN} pixels",
            id="stream-bad-option",
        ),
        pytest.param(
            lambda stub: stub.RemoveBackground(
                pb.RemoveBackgroundRequest(
                    image=b"\0" * (LIMITS.max_unary_bytes + 1), content_type="image/png"
                )
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "image",
            f"over the unary limit of {LIMITS.max_unary_bytes} bytes",
            id="unary-too-large",
        ),
        pytest.param(
            lambda stub: stub.RemoveBackground(
                pb.RemoveBackgroundRequest(image=b"GIF89a" + b"\0" * 64, content_type="image/jpeg")
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "image",
            "image/gif images are not supported",
            id="unary-not-supported",
        ),
    ],
)
async def test_a_refusal_is_its_status_with_the_field_in_bad_request(
    service: Service, send: Send, code: grpc.StatusCode, field_name: str, words: str
) -> None:
    call = send(service.stub)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if isinstance(call, grpc.aio.StreamStreamCall):
            async for _ in call:
                pass
        else:
            await call
    err = caught.value
    assert err.code() == code, err.details()
    assert words in (err.details() or "")
    violations, retry = details(err)
    assert [f for f, _ in violations] == [field_name] and retry is None
    assert violations[0][1] == err.details()
    await service.settled()
    assert service.model.calls == 0
    method = "StreamRemoveBackground" if isinstance(call, grpc.aio.StreamStreamCall) else "RemoveBackground"
    assert access_line(service, method)["status"] == code.name


@pytest.mark.parametrize("method", ["StreamRemoveBackground", "RemoveBackground"])
async def test_not_ready_is_unavailable_with_a_retry_hint(service: Service, method: str) -> None:
    service.state.ready, service.state.reason = False, "the model is loading"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if method == "StreamRemoveBackground":
            async for _ in service.stub.StreamRemoveBackground(messages(PHOTO)):
                pass
        else:
            await service.stub.RemoveBackground(
                pb.RemoveBackgroundRequest(image=PHOTO, content_type="image/jpeg")
            )
    err = caught.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert err.details() == "the service is not ready: the model is loading"
    assert details(err) == ([], NOT_READY_RETRY_AFTER_S)
    await service.settled()
    assert access_line(service, method)["status"] == "UNAVAILABLE"


async def test_the_stream_cap_refuses_the_call_over_it_and_frees_with_the_others(service: Service) -> None:
    service.model.hold = asyncio.Event()
    held = [service.stub.StreamRemoveBackground(messages(PHOTO)) for _ in range(4)]
    reads = [asyncio.ensure_future(call.read()) for call in held]
    deadline = time.monotonic() + 5
    while service.budget.streams < 4:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in service.stub.StreamRemoveBackground(messages(PHOTO)):
            pass
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many concurrent streams: 4 open, the limit is 4" in (caught.value.details() or "")
    service.model.hold.set()
    for call, read in zip(held, reads, strict=True):
        assert (await read).WhichOneof("payload") == "header"
        while await call.read() is not grpc.aio.EOF:
            pass
        assert await call.code() == grpc.StatusCode.OK
    await service.settled()


# --- the caller goes away -------------------------------------------------------------------------


async def test_a_cancel_mid_result_releases_everything(service: Service) -> None:
    # Noise neither JPEG nor PNG compresses: a result of ~4 MB, 4096 chunks of 1 KiB.
    photo = jpeg(1024, 1024, noise=True)
    service.model.mask = np.full_like(service.model.mask, 255)
    call = service.stub.StreamRemoveBackground(messages(photo))
    first = await call.read()
    assert first.WhichOneof("payload") == "header" and first.header.size > 1000 * LIMITS.result_chunk_bytes
    second = await call.read()
    assert len(second.chunk) == LIMITS.result_chunk_bytes
    assert service.budget.streams == 1 and service.budget.reserved_bytes > 0
    assert call.cancel()
    await service.settled()
    line = access_line(service, "StreamRemoveBackground")
    assert line["status"] == "CANCELLED"
    assert 0 < int(line["bytes_out"]) < first.header.size, "the result was cut short, not sent whole"


async def test_a_cancel_while_the_model_runs_releases_everything(service: Service) -> None:
    service.model.hold = asyncio.Event()
    call = service.stub.RemoveBackground(pb.RemoveBackgroundRequest(image=PHOTO, content_type="image/jpeg"))
    await asyncio.wait_for(service.model.started.wait(), 5)
    assert service.budget.streams == 1 and service.budget.reserved_bytes > 0
    assert call.cancel()
    await service.settled()
    assert access_line(service, "RemoveBackground")["status"] == "CANCELLED"
    # The idle trim ran once the last call had gone.
    deadline = time.monotonic() + 5
    while not service.trims:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
