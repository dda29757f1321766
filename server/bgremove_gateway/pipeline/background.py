"""Options.bg_image to pixels: decoded with every check the upload gets, flattened to opaque RGB."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Final

from PIL import Image

from bgremove_gateway.config import Limits
from bgremove_gateway.errors import FieldViolation, ServiceError, invalid
from bgremove_gateway.pipeline.decode import (
    SUPPORTED_CONTENT_TYPES,
    SUPPORTED_LIST,
    decode,
    sniff_content_type,
)

FIELD: Final = "options.bg_image"
# A background's own transparency is filled with white: the result on it is opaque.
_WHITE: Final = (255, 255, 255)


def decode_background(
    data: bytes, limits: Limits, on_size: Callable[[int, int, int], None] | None = None
) -> Image.Image:
    """`data` as an RGB image. The same structure, pixel and metadata limits as the upload's apply
    (decode.decode), and `on_size` charges its memory; a refusal names options.bg_image."""
    content_type = sniff_content_type(data)
    if content_type not in SUPPORTED_CONTENT_TYPES:
        raise invalid(FIELD, f"{FIELD} is not a supported image; supported: {SUPPORTED_LIST}")
    try:
        image = decode(data, content_type, limits, on_size).image
    except ServiceError as err:
        message = f"{FIELD}: {err.message}"
        raise replace(err, message=message, violations=[FieldViolation(FIELD, message)]) from None
    if image.mode == "RGB":
        return image
    flat = Image.new("RGB", image.size, _WHITE)
    flat.paste(image, mask=image.getchannel("A"))
    return flat
