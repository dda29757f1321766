"""Property tests: whatever a client sends, the upload reader and the decoder answer with a
ServiceError of an expected status or a valid result; never another exception, never a hang."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.config import Limits
from bgremove_gateway.errors import ServiceError
from bgremove_gateway.pipeline.decode import SUPPORTED_CONTENT_TYPES, decode
from bgremove_gateway.pipeline.upload import read_stream_upload

LIMITS = Limits(max_upload_bytes=16_384, max_chunk_bytes=2_048, max_pixels=100_000, idle_timeout_s=0.02)
UPLOAD_STATUSES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
DECODE_STATUSES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
# A hang is a failure: far longer than any example needs, far shorter than the suite's timeout.
HANG_S = 5.0

CI = settings(
    max_examples=2_000,
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=3),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=False,
)
# A decompression-bomb warning escaping would be a failure; EXIF complaints are Pillow's to make.
no_bomb_warning = pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
quiet_exif = pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")


def _save(image: Image.Image, fmt: str, **params: Any) -> tuple[bytes, str]:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue(), {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}[fmt]


def _seed_images() -> list[tuple[bytes, str]]:
    """Small real images of every kind decode() handles, to truncate and mutate."""
    rgb = Image.fromarray(skdata.astronaut()).resize((48, 32))
    rgba = rgb.copy()
    rgba.putalpha(Image.linear_gradient("L").resize((48, 32)))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    frames = [Image.new("RGB", (16, 8), color) for color in ("red", "blue")]
    return [
        _save(rgb, "JPEG", quality=80),
        _save(rgb, "JPEG", progressive=True, exif=exif),
        _save(rgb.convert("CMYK"), "JPEG"),
        _save(rgb.convert("L"), "JPEG"),
        _save(rgb, "PNG"),
        _save(rgba, "PNG", optimize=True),
        _save(rgb.convert("P"), "PNG", transparency=0),
        _save(Image.fromarray(np.arange(48 * 32, dtype=np.uint16).reshape(32, 48) * 40), "PNG"),
        _save(rgb, "PNG", interlace=1),
        _save(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        _save(rgb, "WEBP", quality=50),
        _save(rgba, "WEBP", lossless=True),
        _save(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
    ]


SEEDS = _seed_images()
MAGIC = [
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"RIFF\x00\x01\x00\x00WEBPVP8 ",
    b"RIFF\xff\xff\xff\xffWEBPVP8X",
]


@st.composite
def image_bytes(draw: st.DrawFn) -> tuple[bytes, str]:
    """Real images, cut short, with bytes flipped, or random bytes after a valid signature."""
    data, content_type = draw(st.sampled_from(SEEDS))
    how = draw(st.sampled_from(["intact", "truncate", "flip", "header", "magic"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how in ("flip", "header"):
        mutable = bytearray(data)
        end = min(len(data), 96) if how == "header" else len(data)
        for _ in range(draw(st.integers(1, 8))):
            mutable[draw(st.integers(0, end - 1))] ^= draw(st.integers(1, 255))
        data = bytes(mutable)
    elif how == "magic":
        data = draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=600))
        content_type = draw(st.sampled_from(SUPPORTED_CONTENT_TYPES))
    return data, content_type


@dataclass(frozen=True)
class Stall:
    """The client stops sending without half-closing."""


Message = pb.UploadRequest | Stall


def _header(content_type: str, total: int, sha256: bytes = b"") -> pb.UploadRequest:
    return pb.UploadRequest(
        header=pb.UploadHeader(content_type=content_type, total_size=total, sha256=sha256)
    )


@st.composite
def well_formed(draw: st.DrawFn) -> list[Message]:
    """A plausible upload of plausible bytes, then a few ways of getting it slightly wrong."""
    data, content_type = draw(
        st.one_of(image_bytes(), st.tuples(st.binary(max_size=3_000), st.just("image/png")))
    )
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    # Each detail is right more often than not, so that a fair share of uploads reach decode().
    digest = hashlib.sha256(data).digest()
    sha = draw(st.sampled_from([b"", b"", digest, digest, hashlib.sha256(data + b"!").digest(), digest[:31]]))
    total = len(data) + draw(st.sampled_from([0, 0, 0, 0, 0, -1, 1, 10_000, 2**40]))
    content_type = draw(st.sampled_from([content_type] * 4 + [content_type.upper(), "image/gif", ""]))
    messages: list[Message] = [_header(content_type, max(0, total), sha)]
    messages += [pb.UploadRequest(chunk=piece) for piece in pieces]
    if draw(st.integers(0, 9)) == 0:
        messages.insert(draw(st.integers(0, len(messages))), draw(any_message()))
    return messages


def any_message() -> st.SearchStrategy[Message]:
    return st.one_of(
        st.builds(
            _header,
            st.sampled_from([*SUPPORTED_CONTENT_TYPES, "image/gif", "", "IMAGE/PNG; x=1"]),
            st.integers(0, 2 * LIMITS.max_upload_bytes),
            st.sampled_from([b"", b"\x00" * 32, b"\x00" * 5]),
        ),
        st.builds(lambda b: pb.UploadRequest(chunk=b), st.binary(max_size=LIMITS.max_chunk_bytes + 64)),
        st.just(pb.UploadRequest()),
        st.just(Stall()),
    )


async def _client(messages: Sequence[Message]) -> AsyncIterator[pb.UploadRequest]:
    for message in messages:
        if isinstance(message, Stall):
            await asyncio.Event().wait()
        else:
            yield message


async def _upload_then_decode(messages: Sequence[Message]) -> None:
    client = _client(messages)
    try:
        upload = await read_stream_upload(client, LIMITS)
    except ServiceError as err:
        assert err.code in UPLOAD_STATUSES, err
        assert err.message
        event(f"upload refused: {err.code.name}")
        return
    finally:
        await client.aclose()
    # Accepted: it must be exactly header + chunks, and exactly what was sent.
    first, *rest = messages
    assert isinstance(first, pb.UploadRequest) and first.WhichOneof("payload") == "header"
    sent = b"".join(m.chunk for m in rest if isinstance(m, pb.UploadRequest))
    assert bytes(upload.data) == sent and len(sent) == first.header.total_size
    assert upload.content_type in SUPPORTED_CONTENT_TYPES
    _decode_checked(upload.data, upload.content_type)


def _decode_checked(data: bytes | Any, content_type: str) -> None:
    try:
        decoded = decode(data, content_type, LIMITS)
    except ServiceError as err:
        assert err.code in DECODE_STATUSES, err
        event(f"decode refused: {err.code.name} {err.message.split(':')[0]}")
        return
    event("decoded")
    width, height = decoded.image.size
    assert decoded.image.mode in ("RGB", "RGBA")
    assert 0 < width * height <= LIMITS.max_pixels
    assert decoded.image.info == {}


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    # A private loop, not pytest-asyncio's: each example runs to completion on it.
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.run_until_complete(event_loop.shutdown_asyncgens())
    event_loop.close()


@no_bomb_warning
@quiet_exif
@CI
@given(messages=st.one_of(well_formed(), st.lists(any_message(), max_size=12)))
def test_any_stream_gets_a_result_or_an_expected_refusal(
    loop: asyncio.AbstractEventLoop, messages: list[Message]
) -> None:
    loop.run_until_complete(asyncio.wait_for(_upload_then_decode(messages), HANG_S))


@no_bomb_warning
@quiet_exif
@CI
@given(image=image_bytes())
def test_any_bytes_decode_or_get_an_expected_refusal(image: tuple[bytes, str]) -> None:
    _decode_checked(*image)


def test_seed_images_are_all_accepted_intact() -> None:
    # Otherwise the mutations above would start from images that are already refused.
    for data, content_type in SEEDS:
        assert decode(data, content_type, LIMITS).image.size in {(48, 32), (32, 48), (16, 8)}
