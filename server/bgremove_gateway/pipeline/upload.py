"""Receiving an image: the streamed upload protocol, the unary request, and the options both carry.

Every refusal is a ServiceError naming the problem and the limit, raised as early as the protocol
allows: an oversize declaration before any chunk is read, an overrun as soon as the chunk arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import mmap
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.config import Limits
from bgremove_gateway.errors import ServiceError, invalid, too_large
from bgremove_gateway.pipeline.decode import (
    SUPPORTED_CONTENT_TYPES,
    SUPPORTED_LIST,
    normalise_content_type,
    sniff_content_type,
)

SHA256_BYTES = 32
MAX_CROP_MARGIN = 10_000
MAX_COLOR_CHANNEL = 255
# remove.bg's bounds on scale: 10%..100% ("original" is 0 here).
MIN_SCALE_PERCENT = 10.0
MAX_SCALE_PERCENT = 100.0
# Formats with no background to put an image or colour on.
_NO_BACKGROUND = {pb.OUTPUT_FORMAT_MASK: "OUTPUT_FORMAT_MASK", pb.OUTPUT_FORMAT_ZIP: "OUTPUT_FORMAT_ZIP"}


@dataclass(frozen=True)
class Upload:
    # Streamed uploads land in an anonymous memory map (see read_stream_upload); copying it into
    # bytes would double peak memory for the largest images, and decode() reads both in place.
    data: bytes | mmap.mmap
    content_type: str
    options: pb.Options

    def close(self) -> None:
        """Returns a streamed upload's pages to the OS now. A decode still running in a worker
        thread (its caller cancelled) holds a view of the map: then the map is released when that
        view is, a moment later, instead of now."""
        if isinstance(self.data, mmap.mmap):
            with contextlib.suppress(BufferError):
                self.data.close()


def check_content_type(field_name: str, value: str) -> str:
    if not value.strip():
        raise invalid(field_name, f"{field_name} is missing; supported: {SUPPORTED_LIST}")
    content_type = normalise_content_type(value)
    if content_type not in SUPPORTED_CONTENT_TYPES:
        raise invalid(field_name, f"{field_name} {value!r} is not supported; supported: {SUPPORTED_LIST}")
    return content_type


def _check_header(header: pb.UploadHeader, limits: Limits) -> str:
    content_type = check_content_type("header.content_type", header.content_type)
    if header.total_size == 0:
        raise invalid(
            "header.total_size",
            f"header.total_size is 0: declare the exact number of image bytes "
            f"(1 to {limits.max_upload_bytes})",
        )
    if header.total_size > limits.max_upload_bytes:
        raise too_large(
            "header.total_size",
            f"upload of {header.total_size} bytes is over the limit of {limits.max_upload_bytes} bytes",
        )
    _check_total_with_background(
        header.total_size, header.options, limits.max_upload_bytes, "header.total_size", "upload"
    )
    _check_background(header.options, limits)  # before any chunk is read
    if header.sha256 and len(header.sha256) != SHA256_BYTES:
        raise invalid(
            "header.sha256",
            f"header.sha256 is {len(header.sha256)} bytes; a SHA-256 digest is {SHA256_BYTES} bytes",
        )
    return content_type


async def _next_message(
    messages: AsyncIterator[pb.UploadRequest], limits: Limits, deadline: float
) -> pb.UploadRequest | None:
    """The next message, or None when the client half-closed; a stalled or trickling client is cut
    off at the idle timeout or the whole-upload timeout, whichever comes first."""
    left = deadline - asyncio.get_running_loop().time()
    try:
        return await asyncio.wait_for(anext(messages), timeout=max(0.0, min(limits.idle_timeout_s, left)))
    except StopAsyncIteration:
        return None
    except asyncio.TimeoutError:  # not the builtin on Python 3.10
        # DEADLINE_EXCEEDED, not CANCELLED or ABORTED: the operation ran out of time, and a client
        # on a slow link may retry; the message tells it apart from the client's own deadline.
        if left <= limits.idle_timeout_s:
            message = (
                f"upload too slow: not complete within the upload timeout of {limits.upload_timeout_s:g} s"
            )
        else:
            message = f"upload stalled: no message within the idle timeout of {limits.idle_timeout_s:g} s"
        raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, message) from None


class UploadBudget(Protocol):
    """Admission's view of an upload: refuse a declaration that can never fit, then charge bytes as
    they arrive, so a stream that declares much and sends little holds little."""

    def declared(self, total_size: int) -> None: ...

    def received(self, nbytes: int) -> None: ...


async def read_stream_upload(
    requests: AsyncIterator[pb.UploadRequest], limits: Limits, budget: UploadBudget | None = None
) -> Upload:
    """Reads one header then chunks until the client half-closes, checking size and checksum.
    `budget` sees the checked header before any buffer exists, then every chunk before it is kept."""
    deadline = asyncio.get_running_loop().time() + limits.upload_timeout_s
    messages = aiter(requests)
    first = await _next_message(messages, limits, deadline)
    if first is None:
        raise invalid("header", "stream ended before the header: send an UploadRequest with header first")
    kind = first.WhichOneof("payload")
    if kind != "header":
        what = "a chunk" if kind == "chunk" else "an empty UploadRequest"
        raise invalid("header", f"first message must carry the header, got {what}")
    header = first.header
    content_type = _check_header(header, limits)
    if budget is not None:
        background = len(header.options.bg_image)
        budget.declared(header.total_size + background)
        if background:
            budget.received(background)  # it came with the header
    # Preallocated once and filled in place: no list of chunks to join, so peak memory is the image
    # once. An anonymous map rather than bytearray(total): bytearray zero-fills (commits) every page
    # up front, while the map's pages are committed only as chunks fill them, which is also when
    # the budget is charged. Anonymous, so nothing reaches the disk.
    buffer = mmap.mmap(-1, header.total_size)
    try:
        await _receive_chunks(messages, header, buffer, limits, deadline, budget)
    except BaseException:
        buffer.close()  # release the memory now, not when the traceback is collected
        raise
    return Upload(data=buffer, content_type=content_type, options=header.options)


async def _receive_chunks(
    messages: AsyncIterator[pb.UploadRequest],
    header: pb.UploadHeader,
    buffer: mmap.mmap,
    limits: Limits,
    deadline: float,
    budget: UploadBudget | None,
) -> None:
    total = header.total_size
    digest = hashlib.sha256() if header.sha256 else None
    received = 0
    while (message := await _next_message(messages, limits, deadline)) is not None:
        kind = message.WhichOneof("payload")
        if kind == "header":
            raise invalid("header", "a second header arrived: send the header exactly once, first")
        if kind != "chunk":
            raise invalid("chunk", "an UploadRequest carried neither header nor chunk")
        chunk = message.chunk
        size = len(chunk)
        if size == 0:
            raise invalid(
                "chunk", f"empty chunk: every chunk carries 1 to {limits.max_chunk_bytes} image bytes"
            )
        if size > limits.max_chunk_bytes:
            raise too_large(
                "chunk", f"chunk of {size} bytes is over the limit of {limits.max_chunk_bytes} bytes"
            )
        if received + size > limits.max_upload_bytes:
            raise too_large(
                "chunk",
                f"upload is over the limit of {limits.max_upload_bytes} bytes "
                f"({received + size} bytes so far)",
            )
        if received + size > total:
            raise invalid(
                "header.total_size",
                f"received more than the {total} bytes declared in header.total_size "
                f"({received + size} bytes so far)",
            )
        if budget is not None:
            budget.received(size)
        buffer[received : received + size] = chunk
        if digest is not None:
            digest.update(chunk)
        received += size
    if received == 0:
        raise invalid("chunk", f"upload carried no image bytes; header.total_size declared {total}")
    if received != total:
        raise invalid(
            "header.total_size",
            f"stream ended after {received} bytes but header.total_size declared {total}",
        )
    if digest is not None and digest.digest() != header.sha256:
        raise invalid("header.sha256", "header.sha256 does not match the SHA-256 of the bytes received")


def unary_upload(request: pb.RemoveBackgroundRequest, limits: Limits) -> Upload:
    content_type = check_content_type("content_type", request.content_type)
    data = request.image
    if not data:
        raise invalid("image", "image is empty")
    if len(data) > limits.max_unary_bytes:
        raise too_large(
            "image",
            f"image of {len(data)} bytes is over the unary limit of {limits.max_unary_bytes} bytes; "
            f"use StreamRemoveBackground for larger images (up to {limits.max_upload_bytes} bytes)",
        )
    _check_total_with_background(
        len(data), request.options, limits.max_unary_bytes, "image", "unary request's image"
    )
    return Upload(data=data, content_type=content_type, options=request.options)


def _check_total_with_background(
    size: int, options: pb.Options, limit: int, field_name: str, what: str
) -> None:
    """Options.bg_image counts toward the call's own byte limit: the image and its background
    together are what the call holds."""
    extra = len(options.bg_image)
    if extra and size + extra > limit:
        raise too_large(
            field_name,
            f"{what} of {size} bytes plus an options.bg_image of {extra} bytes is {size + extra} bytes, "
            f"over the limit of {limit} bytes"
            + ("; use StreamRemoveBackground" if field_name == "image" else ""),
        )


def _check_percent(
    field_name: str, value: float, low: float, high: float = math.inf, zero_too: bool = False
) -> None:
    """A finite percentage in low..high (or exactly 0 when zero_too)."""
    if zero_too and value == 0:
        return
    if not (math.isfinite(value) and low <= value <= high):
        span = (
            f"{low:g} to {high:g} percent" if math.isfinite(high) else f"a finite percentage, {low:g} or more"
        )
        extra = " (0 keeps the original)" if zero_too else ""
        raise invalid(field_name, f"{field_name} is {value:g}; it must be {span}{extra}")


def _check_geometry(options: pb.Options) -> None:
    """roi, crop_margins, scale_percent and position: each value on its own (the roi against the
    image's size is checked once it is decoded, in postprocess.roi_box)."""
    # Any px is fine: roi corners are clamped to the image, and each margin is capped at half the
    # subject and MAX_CROP_MARGIN (remove.bg caps them too); crop_margins without crop do nothing.
    for field_name, lengths in (("options.roi", options.roi), ("options.crop_margins", options.crop_margins)):
        for part in lengths.DESCRIPTOR.fields:
            length = getattr(lengths, part.name)
            if length.WhichOneof("value") == "percent":
                high = 100.0 if field_name == "options.roi" else math.inf
                _check_percent(f"{field_name}.{part.name}.percent", length.percent, 0.0, high)
    _check_percent("options.scale_percent", options.scale_percent, MIN_SCALE_PERCENT, MAX_SCALE_PERCENT, True)
    position = options.position
    if position.placement not in pb.Placement.values():
        known = ", ".join(pb.Placement.keys())
        raise invalid(
            "options.position.placement",
            f"options.position.placement {position.placement} is not one of {known}",
        )
    for axis in ("x_percent", "y_percent"):
        value = getattr(position, axis)
        if position.placement == pb.PLACEMENT_PERCENT:
            _check_percent(f"options.position.{axis}", value, 0.0, 100.0)
        elif value != 0:
            raise invalid(
                f"options.position.{axis}",
                f"options.position.{axis} is {value:g} but applies only to PLACEMENT_PERCENT",
            )


def _check_background(options: pb.Options, limits: Limits) -> None:
    data = options.bg_image
    background = "options.bg_image" if data else "options.bg_color" if options.HasField("bg_color") else None
    # bg_color with MASK was accepted (and ignored) before bg_image existed: it still is.
    ignored_before = not data and options.format == pb.OUTPUT_FORMAT_MASK
    if background is not None and options.format in _NO_BACKGROUND and not ignored_before:
        raise invalid(background, f"{background} has no effect on {_NO_BACKGROUND[options.format]}")
    if not data:
        return
    if len(data) > limits.max_bg_image_bytes:
        raise too_large(
            "options.bg_image",
            f"options.bg_image of {len(data)} bytes is over the limit of {limits.max_bg_image_bytes} bytes",
        )
    kind = sniff_content_type(data)
    if kind not in SUPPORTED_CONTENT_TYPES:
        what = "not an image" if kind is None else kind
        raise invalid("options.bg_image", f"options.bg_image is {what}; supported: {SUPPORTED_LIST}")


def validate_options(options: pb.Options, limits: Limits, models: Sequence[str]) -> None:
    if options.format not in pb.OutputFormat.values():
        known = ", ".join(pb.OutputFormat.keys())
        raise invalid("options.format", f"options.format {options.format} is not one of {known}")
    if options.HasField("bg_color"):
        color = options.bg_color
        for channel in ("r", "g", "b"):
            value = getattr(color, channel)
            if value > MAX_COLOR_CHANNEL:
                raise invalid(
                    f"options.bg_color.{channel}",
                    f"options.bg_color.{channel} is {value}; each channel is 0 to {MAX_COLOR_CHANNEL}",
                )
    if options.max_output_side > limits.max_output_side:
        raise invalid(
            "options.max_output_side",
            f"options.max_output_side {options.max_output_side} is over the limit of "
            f"{limits.max_output_side} pixels (0 keeps the input size)",
        )
    if options.crop_margin > MAX_CROP_MARGIN:
        raise invalid(
            "options.crop_margin",
            f"options.crop_margin {options.crop_margin} is over the limit of {MAX_CROP_MARGIN} pixels",
        )
    _check_geometry(options)
    _check_background(options, limits)
    if options.model and options.model not in models:
        raise invalid(
            "options.model",
            f"options.model {options.model!r} is not served; served models: {', '.join(models)}",
        )
