"""The final picture to bytes in the requested format, with no metadata from the input.

Nothing from the upload's EXIF/XMP/ICC reaches the output: decode() already dropped it, and the
savers below are given no exif, icc_profile, xmp or pnginfo.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Any, Final

import fpng
import numpy as np
import numpy.typing as npt
from PIL import Image

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.pipeline.postprocess import Cutout

# The output formats by the names `--format` takes (bgremove.options, which the client keeps apart
# from the server, uses the same), in the order GetServiceInfo lists them.
OUTPUT_FORMATS: Final[dict[str, pb.OutputFormat]] = {
    "png": pb.OUTPUT_FORMAT_PNG,
    "webp": pb.OUTPUT_FORMAT_WEBP,
    "mask": pb.OUTPUT_FORMAT_MASK,
    "jpeg": pb.OUTPUT_FORMAT_JPEG,
    "zip": pb.OUTPUT_FORMAT_ZIP,
}

# Fastest settings for a few more bytes: RGBA PNG goes to fpng (10x faster than Pillow's fastest
# level), the greyscale MASK, which fpng cannot write, to Pillow at level 1, lossless WebP at
# method 0 (docs/decisions/code-encoding.md).
_PNG_OPTIONS: Final[dict[str, Any]] = {"compress_level": 1}
_WEBP_OPTIONS: Final[dict[str, Any]] = {"lossless": True, "method": 0, "quality": 0}
_JPEG_OPTIONS: Final[dict[str, Any]] = {"quality": 90}

# format -> (Pillow saver, image mode compose() produced for it, media type, saver options)
_FORMATS: Final[dict[int, tuple[str, str, str, dict[str, Any]]]] = {
    pb.OUTPUT_FORMAT_UNSPECIFIED: ("PNG", "RGBA", "image/png", _PNG_OPTIONS),
    pb.OUTPUT_FORMAT_PNG: ("PNG", "RGBA", "image/png", _PNG_OPTIONS),
    pb.OUTPUT_FORMAT_WEBP: ("WEBP", "RGBA", "image/webp", _WEBP_OPTIONS),
    pb.OUTPUT_FORMAT_MASK: ("PNG", "L", "image/png", _PNG_OPTIONS),
    pb.OUTPUT_FORMAT_JPEG: ("JPEG", "RGB", "image/jpeg", _JPEG_OPTIONS),
    pb.OUTPUT_FORMAT_ZIP: ("ZIP", "RGBA", "application/zip", {}),
}
# remove.bg's format=zip names; a fixed timestamp, so equal results are equal bytes.
ZIP_COLOR_NAME: Final = "color.jpg"
ZIP_ALPHA_NAME: Final = "alpha.png"
_ZIP_DATE: Final = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Encoded:
    data: bytes
    content_type: str


def encode(cutout: Cutout, fmt: pb.OutputFormat) -> Encoded:
    """Encodes `cutout` (made by compose() for the same format); UNSPECIFIED means PNG."""
    if cutout.pixels is not None and fmt in (pb.OUTPUT_FORMAT_PNG, pb.OUTPUT_FORMAT_UNSPECIFIED):
        return encode_rgba_png(cutout.pixels)
    return encode_image(cutout.image, fmt)


def encode_image(image: Image.Image, fmt: pb.OutputFormat) -> Encoded:
    if fmt not in _FORMATS:
        raise ValueError(f"unknown output format {fmt}")
    saver, mode, content_type, options = _FORMATS[fmt]
    if image.mode != mode:
        raise ValueError(f"{pb.OutputFormat.Name(fmt)} needs a {mode} image, got {image.mode}")
    if saver == "PNG" and mode == "RGBA":
        return encode_rgba_png(np.asarray(image))
    if saver == "ZIP":
        return Encoded(data=encode_zip(image), content_type=content_type)
    out = io.BytesIO()
    image.save(out, saver, **options)
    return Encoded(data=out.getvalue(), content_type=content_type)


def encode_rgba_png(pixels: npt.NDArray[np.uint8]) -> Encoded:
    """An RGBA cut-out as PNG straight from an [H, W, 4] uint8 array (no copy into an Image)."""
    return Encoded(data=fpng.from_ndarray(pixels), content_type="image/png")


def encode_zip(image: Image.Image) -> bytes:
    """An RGBA cut-out as remove.bg's ZIP: color.jpg (its colours, opaque; black where it is fully
    transparent) and alpha.png (its 8-bit matte). Stored, not deflated: both are compressed already."""
    color, alpha = io.BytesIO(), io.BytesIO()
    image.convert("RGB").save(color, "JPEG", **_JPEG_OPTIONS)
    image.getchannel("A").save(alpha, "PNG", **_PNG_OPTIONS)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, member in ((ZIP_COLOR_NAME, color), (ZIP_ALPHA_NAME, alpha)):
            archive.writestr(zipfile.ZipInfo(name, date_time=_ZIP_DATE), member.getvalue())
    return out.getvalue()
