"""Header dimensions read without a decoder: what decode() names a zero-size image by."""

from __future__ import annotations

import io
import mmap
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bgremove_gateway.pipeline.image_size import declared_size


def encoded(size: tuple[int, int], fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "teal").save(out, fmt, **params)
    return out.getvalue()


@pytest.mark.parametrize(
    ("fmt", "content_type", "params"),
    [
        ("JPEG", "image/jpeg", {}),
        ("JPEG", "image/jpeg", {"progressive": True}),
        ("JPEG", "image/jpeg", {"exif": Image.Exif().tobytes(), "icc_profile": b"\x00" * 200}),
        ("PNG", "image/png", {}),
        ("WEBP", "image/webp", {}),
    ],
)
@pytest.mark.parametrize("size", [(1, 1), (123, 45), (3000, 7)])
def test_sizes_match_what_pillow_reads(
    fmt: str, content_type: str, params: dict[str, Any], size: tuple[int, int]
) -> None:
    data = encoded(size, fmt, **params)
    assert declared_size(data, content_type) == size == Image.open(io.BytesIO(data)).size
    with mmap.mmap(-1, len(data)) as buffer:
        buffer[:] = data
        assert declared_size(buffer, content_type) == size


def test_formats_that_cannot_declare_zero_are_left_to_the_decoder() -> None:
    # Lossless WebP stores size - 1: no zero to find, so no answer is needed.
    assert declared_size(encoded((5, 5), "WEBP", lossless=True), "image/webp") is None
    assert declared_size(encoded((5, 5), "GIF"), "image/gif") is None


@pytest.mark.parametrize("content_type", ["image/jpeg", "image/png", "image/webp"])
def test_damaged_headers_give_no_answer(content_type: str) -> None:
    assert declared_size(b"", content_type) is None
    assert declared_size(b"\xff\xd8\xff\xe0\x00\x01", content_type) is None
    assert declared_size(b"\x89PNG\r\n\x1a\n" + b"\x00" * 8, content_type) is None


@settings(max_examples=3000, derandomize=True, database=None)
@given(st.sampled_from(["image/jpeg", "image/png", "image/webp"]), st.binary(max_size=256))
def test_any_bytes_give_a_size_or_none(content_type: str, data: bytes) -> None:
    prefix = {"image/jpeg": b"\xff\xd8", "image/png": b"\x89PNG\r\n\x1a\n", "image/webp": b"RIFF\0\0\0\0WEBP"}
    result = declared_size(prefix[content_type] + data, content_type)
    assert result is None or (len(result) == 2 and all(0 <= side < 2**32 for side in result))
