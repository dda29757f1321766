"""upload → decode → preprocess → infer → postprocess → encode, one span per step.

CPU-bound steps run in a bounded thread pool (Pillow, numpy, scipy and OpenCV release the GIL), so
the event loop keeps serving other streams while one image is decoded or encoded: decode and
preprocess in one hop, postprocess and encode in another, each step still its own span and timing.
Large PNG and WebP encodes go to worker processes (encode_pool.py): their encoders hold the GIL
throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from opentelemetry import trace

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.config import Settings
from bgremove_gateway.pipeline.background import decode_background
from bgremove_gateway.pipeline.contract import MODEL_INPUT_SIZE
from bgremove_gateway.pipeline.decode import DecodedImage, decode
from bgremove_gateway.pipeline.encode import Encoded, encode
from bgremove_gateway.pipeline.encode_pool import EncodePool
from bgremove_gateway.pipeline.postprocess import Cutout, compose, mask_to_alpha
from bgremove_gateway.pipeline.preprocess import to_model_input
from bgremove_gateway.pipeline.upload import Upload, read_stream_upload, unary_upload, validate_options
from bgremove_gateway.runtime import metrics
from bgremove_gateway.runtime.budget import Ticket, bg_image_bytes_estimate, image_bytes_estimate

tracer = trace.get_tracer("bgremove.gateway")
T = TypeVar("T")


async def settle(work: asyncio.Future[T]) -> None:
    """Waits until `work` has ended, whatever it raised, however often this task is cancelled."""
    while not work.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([work])
    if not work.cancelled():
        work.exception()  # retrieved, so asyncio does not log it as never retrieved


class Abandoned(Exception):
    """A hop's later step not started: its caller had left (only settle() sees this)."""


class Steps:
    """The steps of one executor hop, each its own span and step timing; the first one's time
    includes the wait for a free thread, as when each step was a hop of its own."""

    def __init__(self) -> None:
        self.queued = time.perf_counter()
        self.queued_ns = time.time_ns()
        # Set when the caller left: the hop's later steps are not started.
        self.abandoned = threading.Event()
        self._first = True

    def run(self, step: str, fn: Callable[[], T]) -> T:
        if self.abandoned.is_set():
            raise Abandoned(step)
        started, started_ns = (self.queued, self.queued_ns) if self._first else (None, None)
        self._first = False
        with tracer.start_as_current_span(step, start_time=started_ns), metrics.timed_step(step, started):
            return fn()


class Inference(Protocol):
    """TritonPool in the gateway; one TritonInference works too."""

    async def infer(
        self, model: str, image: npt.NDArray[np.uint8], *, timeout_s: float | None = None
    ) -> npt.NDArray[np.uint8]: ...


@dataclass(frozen=True)
class Result:
    header: pb.ResultHeader
    data: bytes


@dataclass
class TicketBudget:
    """An upload charged to its call's ticket (see upload.UploadBudget)."""

    ticket: Ticket
    total_size: int = 0

    def declared(self, total_size: int) -> None:
        self.total_size = total_size
        self.ticket.fits(total_size, f"an upload of {total_size} bytes")

    def received(self, nbytes: int) -> None:
        self.ticket.reserve(nbytes, f"an upload of {self.total_size} bytes")


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        inference: Inference,
        executor: ThreadPoolExecutor,
        encoder: EncodePool | None = None,
    ) -> None:
        self.settings = settings
        # Large PNG/WebP encodes in worker processes (encode_pool.py); None: all in-process.
        self.encoder = encoder
        self.inference = inference
        self.executor = executor
        self.models: Sequence[str] = (settings.default_model,)
        # Each served model's input side, as Triton reports it (the server keeps it current).
        self.input_sizes: Mapping[str, int] = {}

    def input_size(self, model: str) -> int:
        """The side `model`'s input is resized to: MODEL_INPUT_SIZE until Triton has said otherwise."""
        return self.input_sizes.get(model, MODEL_INPUT_SIZE)

    async def _cpu(self, fn: Callable[[Steps], T]) -> T:
        """Runs `fn` in the executor, in this call's context (the parent of its steps' spans)."""
        steps = Steps()
        work = asyncio.get_running_loop().run_in_executor(
            self.executor, contextvars.copy_context().run, fn, steps
        )
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # A thread cannot be stopped: the call keeps its memory and stream slot until the
            # work really ends, so admission never counts memory that is still in use as free.
            steps.abandoned.set()
            await settle(work)
            raise

    async def receive(
        self, requests: AsyncIterator[pb.UploadRequest], ticket: Ticket | None = None
    ) -> Upload:
        """Reads and checks a streamed upload: protocol, sizes, checksum, options. Each chunk is
        charged to the memory budget as it arrives, up to the declared size."""

        with tracer.start_as_current_span("validate") as span, metrics.timed_step("validate"):
            budget = None if ticket is None else TicketBudget(ticket)
            upload = await read_stream_upload(requests, self.settings.limits, budget)
            self._check(upload, span)
        return upload

    def receive_unary(self, request: pb.RemoveBackgroundRequest, ticket: Ticket | None = None) -> Upload:
        with tracer.start_as_current_span("validate") as span, metrics.timed_step("validate"):
            upload = unary_upload(request, self.settings.limits)
            if ticket is not None:
                # Options.bg_image came in the same message.
                held = len(upload.data) + len(upload.options.bg_image)
                ticket.reserve(held, f"an image of {len(upload.data)} bytes")
            self._check(upload, span)
        return upload

    def _check(self, upload: Upload, span: trace.Span) -> None:
        validate_options(upload.options, self.settings.limits, self.models)
        span.set_attribute("bgremove.upload.bytes", len(upload.data))
        span.set_attribute("bgremove.upload.content_type", upload.content_type)

    async def run(
        self, upload: Upload, *, timeout_s: float | None = None, ticket: Ticket | None = None
    ) -> Result:
        options = upload.options
        model = options.model or self.settings.default_model
        limits = self.settings.limits

        def admit(width: int, height: int, extra_bytes: int) -> None:
            # From decode's worker thread, once the header gave the size and before any pixel;
            # extra_bytes: the metadata (and WebP's copies of the file) the parser will hold.
            if ticket is not None:
                ticket.reserve(
                    image_bytes_estimate(width, height, options.format, options) + extra_bytes,
                    f"a {width}x{height} image",
                )

        def admit_background(width: int, height: int, extra_bytes: int) -> None:
            if ticket is not None:
                ticket.reserve(
                    bg_image_bytes_estimate(width, height) + extra_bytes, f"a {width}x{height} bg_image"
                )

        def postprocess(mask: npt.NDArray[np.uint8]) -> Cutout:
            background = (
                decode_background(options.bg_image, limits, admit_background) if options.bg_image else None
            )
            return compose(decoded, mask_to_alpha(mask, (width, height)), options, background)

        def decode_and_preprocess(steps: Steps) -> tuple[DecodedImage, npt.NDArray[np.uint8]]:
            image = steps.run("decode", lambda: decode(upload.data, upload.content_type, limits, admit))
            pixels = image.image.width * image.image.height
            trace.get_current_span().set_attribute("bgremove.image.pixels", pixels)
            metrics.observe_megapixels(pixels)
            return image, steps.run("preprocess", lambda: to_model_input(image.image, size))

        encoder = self.encoder.encode if self.encoder is not None else encode

        def postprocess_and_encode(steps: Steps) -> tuple[Cutout, Encoded]:
            cut = steps.run("postprocess", lambda: postprocess(mask))
            return cut, steps.run("encode", lambda: encoder(cut, options.format))

        size = self.input_size(model)
        decoded, tensor = await self._cpu(decode_and_preprocess)
        width, height = decoded.image.size
        with tracer.start_as_current_span("infer", kind=trace.SpanKind.CLIENT), metrics.timed_step("infer"):
            mask = await self.inference.infer(model, tensor, timeout_s=timeout_s)
        cutout, encoded = await self._cpu(postprocess_and_encode)
        header = pb.ResultHeader(
            width=cutout.image.width,
            height=cutout.image.height,
            content_type=encoded.content_type,
            size=len(encoded.data),
            model=model,
            input_width=width,
            input_height=height,
        )
        if cutout.bbox is not None:
            x, y, w, h = cutout.bbox
            header.foreground.CopyFrom(pb.BoundingBox(x=x, y=y, width=w, height=h))
        return Result(header=header, data=encoded.data)
