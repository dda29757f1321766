"""Bytes to pixels: identify the format by its magic bytes, check the size before decoding, decode.

Only JPEG, PNG and WebP are decoded, each by its own Pillow plugin class, so no other parser ever
sees untrusted bytes. Everything else Pillow knows is named (from its signature) and refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Final, cast

import grpc
import numpy as np
from PIL import ExifTags, Image, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from bgremove.upload import OCTET_STREAM
from bgremove.upload import sniff_content_type as sniff_supported
from bgremove_gateway.config import Limits
from bgremove_gateway.errors import ServiceError, invalid, too_large
from bgremove_gateway.pipeline.buffers import BufferLike, BufferReader
from bgremove_gateway.pipeline.costs import inspect_cost
from bgremove_gateway.pipeline.image_size import declared_size

SUPPORTED_CONTENT_TYPES: tuple[str, ...] = ("image/jpeg", "image/png", "image/webp")
# For the messages that refuse anything else.
SUPPORTED_LIST: Final = ", ".join(SUPPORTED_CONTENT_TYPES)

# Decoding with the plugin class directly, rather than Image.open(), skips Pillow's process-wide
# MAX_IMAGE_PIXELS check: limits.max_pixels is enforced here instead, per call, so the global is
# neither relied on nor mutated, and no DecompressionBombWarning/Error can escape.
_PLUGINS: Final[dict[str, type[ImageFile.ImageFile]]] = {
    "image/jpeg": JpegImagePlugin.JpegImageFile,
    "image/png": PngImagePlugin.PngImageFile,
    "image/webp": WebPImagePlugin.WebPImageFile,
}
_SOURCE_FORMATS: Final = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
# A common misspelling that browsers and HTTP libraries treat as image/jpeg.
_CONTENT_TYPE_ALIASES: Final = {"image/jpg": "image/jpeg"}
_SIXTEEN_BIT_MODES: Final = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

# EXIF orientation -> the transposition that shows the photo upright (the table
# ImageOps.exif_transpose uses). Not exif_transpose itself: it also rewrites the EXIF and XMP that
# decode() drops anyway, and raises on EXIF it cannot re-serialise, which would refuse photos that
# viewers show fine (docs/decisions/code-decode.md).
_UPRIGHT: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Registers every plugin now, once, rather than lazily from several worker threads at a time.
Image.init()


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # "RGB" or "RGBA", 8-bit, EXIF orientation applied, info empty
    source_format: str  # "JPEG" | "PNG" | "WEBP"


def sniff_content_type(data: BufferLike) -> str | None:
    """Media type named by the data's magic bytes: one of SUPPORTED_CONTENT_TYPES, another image
    type Pillow recognises (e.g. "image/gif"), or None when the data is no known image format."""
    head = bytes(memoryview(data)[:16])
    supported = sniff_supported(head)  # the client's check: one signature table for both sides
    if supported != OCTET_STREAM:
        return supported
    # Only the plugins' signature checks run here; their parsers never see the data.
    for name, (_, accept) in Image.OPEN.items():
        try:
            matched = accept is not None and accept(head)
        except Exception:
            continue
        # A str is Pillow's "nearly, but not this format" hint, not a match.
        if matched and not isinstance(matched, str):
            return Image.MIME.get(name, f"image/x-{name.lower()}")
    return None


def normalise_content_type(value: str) -> str:
    """Lower-case media type without parameters ("Image/JPEG; q=1" -> "image/jpeg")."""
    media_type = value.split(";", 1)[0].strip().lower()
    return _CONTENT_TYPE_ALIASES.get(media_type, media_type)


def _check_type(data: BufferLike, declared: str) -> str:
    sniffed = sniff_content_type(data)
    if sniffed is None:
        raise invalid(
            "image",
            f"data is not an image: its first bytes match none of the supported types {SUPPORTED_LIST}",
        )
    if sniffed not in SUPPORTED_CONTENT_TYPES:
        raise invalid("image", f"{sniffed} images are not supported; supported: {SUPPORTED_LIST}")
    if declared != sniffed:
        raise invalid("content_type", f"content_type is {declared} but the data is {sniffed}")
    return sniffed


def _corrupt() -> ServiceError:
    return invalid("image", "image data is corrupt or truncated")


def _to_8bit_rgb(image: Image.Image) -> Image.Image:
    """RGB, or RGBA when the source has any transparency; `image` itself when already so."""
    target = "RGBA" if image.has_transparency_data else "RGB"
    if image.mode == target:
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's I;16 -> L conversion clips at 255 instead of scaling; 65535 / 257 = 255, rounded.
        wide = np.asarray(image).astype(np.uint32)
        if image.mode == "I":
            np.clip(wide, 0, 65535, out=wide)
        grey = ((wide + 128) // 257).astype(np.uint8)
        return Image.fromarray(grey).convert(target)
    return image.convert(target)


def _oriented(source: ImageFile.ImageFile) -> Image.Image:
    """The decoded pixels as a plain image detached from the file, turned upright per EXIF.

    An upright photo keeps the decoder's own pixel memory (source.copy() would duplicate it: a
    full image's worth of memory and time); only the file object and its metadata are left behind."""
    method = _UPRIGHT.get(source.getexif().get(ExifTags.Base.Orientation, 1))
    return source._new(source.im) if method is None else source.transpose(method)


def decode(
    data: BufferLike,
    declared_content_type: str,
    limits: Limits,
    on_size: Callable[[int, int, int], None] | None = None,
) -> DecodedImage:
    """Decodes a JPEG, PNG or WebP that matches `declared_content_type` into 8-bit RGB or RGBA.

    Before any parser sees the bytes, their structure is checked against the scan, segment and
    metadata limits (costs.py). `on_size(width, height, extra_bytes)` runs after the pixel-count
    check and before decoding, extra_bytes being what the parser holds beyond the pixels
    (metadata, copies of the file); it may refuse the image by raising ServiceError (admission
    reserves memory there).

    Animated PNG (APNG) and animated WebP decode to their first frame, as do multi-picture JPEGs.
    The pixel count is checked from the header before any pixel is decoded. The result carries no
    metadata (EXIF, XMP, ICC profile, text chunks): orientation is applied, then it is dropped.
    """
    if len(data) == 0:
        raise invalid("image", "data is not an image: it is empty")
    content_type = _check_type(data, normalise_content_type(declared_content_type))
    # First: declared_size() steps through the JPEG header markers too, now known to be few.
    cost = inspect_cost(data, content_type, limits)
    declared = declared_size(data, content_type)
    if declared is not None and 0 in declared:
        raise invalid(
            "image",
            f"image declares {declared[0]}x{declared[1]} pixels: width and height must be at least 1",
        )
    try:
        with BufferReader(data) as reader:
            try:
                source = _PLUGINS[content_type](cast(IO[bytes], reader))
            except Exception as exc:
                raise _corrupt() from exc
            with source:
                # A zero width or height was refused above from the header bytes.
                width, height = source.size
                if width * height > limits.max_pixels:
                    raise too_large(
                        "image",
                        f"image is {width}x{height} = {width * height} pixels, "
                        f"over the limit of {limits.max_pixels} pixels",
                    )
                if on_size is not None:
                    on_size(width, height, cost.held_bytes)
                # LOAD_TRUNCATED_IMAGES stays False (Pillow's default): a short file is an error,
                # never an image with a grey bottom half.
                source.load()
                image = _to_8bit_rgb(_oriented(source))
    except ServiceError:
        raise
    except MemoryError:
        raise ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "not enough memory to decode the image now; retry later"
        ) from None
    except Exception as exc:
        # Any failure of the parser on these bytes (OSError, SyntaxError, ValueError, struct.error,
        # zlib.error, ...) means the same thing to the caller.
        raise _corrupt() from exc
    image.info = {}
    return DecodedImage(image=image, source_format=_SOURCE_FORMATS[content_type])
