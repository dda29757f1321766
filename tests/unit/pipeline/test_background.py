"""Options.bg_image: decoded with the upload's own checks, every refusal naming options.bg_image."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from bgremove_gateway.config import Limits
from bgremove_gateway.errors import ServiceError
from bgremove_gateway.pipeline.background import decode_background


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def test_a_jpeg_background_decodes_to_rgb_and_is_charged_before_its_pixels() -> None:
    seen: list[tuple[int, int, int]] = []
    background = decode_background(
        encoded(Image.new("RGB", (40, 30), (10, 200, 30)), "JPEG"),
        Limits(),
        lambda w, h, extra: seen.append((w, h, extra)),
    )
    assert (background.mode, background.size) == ("RGB", (40, 30))
    assert [(w, h) for w, h, _ in seen] == [(40, 30)]


def test_a_transparent_background_is_flattened_on_white() -> None:
    image = Image.new("RGBA", (4, 1), (200, 0, 0, 255))
    image.putpixel((1, 0), (200, 0, 0, 0))
    background = decode_background(encoded(image, "PNG"), Limits())
    assert background.mode == "RGB"
    assert np.asarray(background)[0].tolist() == [[200, 0, 0], [255, 255, 255], [200, 0, 0], [200, 0, 0]]


@pytest.mark.parametrize(
    ("data", "limits", "code", "words"),
    [
        (b"GIF89a" + b"\0" * 20, Limits(), grpc.StatusCode.INVALID_ARGUMENT, "not a supported image"),
        (
            b"\xff\xd8\xff\xe0" + b"\0" * 30,
            Limits(),
            grpc.StatusCode.INVALID_ARGUMENT,
            "corrupt or truncated",
        ),
        (
            encoded(Image.new("RGB", (100, 100)), "PNG"),
            Limits(max_pixels=9_999),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "100x100 = 10000 pixels, over the limit of 9999",
        ),
    ],
)
def test_refusals_name_options_bg_image(
    data: bytes, limits: Limits, code: grpc.StatusCode, words: str
) -> None:
    with pytest.raises(ServiceError) as caught:
        decode_background(data, limits)
    assert caught.value.code == code
    assert caught.value.message.startswith("options.bg_image") and words in caught.value.message
    assert [v.field for v in caught.value.violations] == ["options.bg_image"]
