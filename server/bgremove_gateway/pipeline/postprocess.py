"""The model's mask to the final picture: alpha matte, cut-out, crop, downscale, colour background.

Alpha is straight (not premultiplied), so wherever the matte is opaque the output keeps the
input's exact colour; only semi-transparent edges are blended, and only for JPEG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageChops

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.pipeline.decode import DecodedImage

Box = tuple[int, int, int, int]  # left, top, right, bottom (exclusive)

# The subject is where alpha is at least half: the same threshold for bbox, crop and the header.
FOREGROUND_THRESHOLD: Final = 128
_WHITE: Final = (255, 255, 255)
# As for the model input (preprocess.py): the same result as plain LANCZOS, several times faster.
_REDUCING_GAP: Final = 3.0


@dataclass(frozen=True)
class Cutout:
    image: Image.Image  # RGBA cut-out, "L" matte (MASK), or RGB on the background colour (JPEG)
    bbox: tuple[int, int, int, int] | None  # foreground x, y, w, h in output pixels; None if empty
    input_size: tuple[int, int]  # (w, h) after EXIF orientation
    # `image`'s own memory as [H, W, 4] uint8 when it is an RGBA cut-out made here, so the PNG
    # encoder reads it in place instead of copying the image out first.
    pixels: npt.NDArray[np.uint8] | None = None


# The mask is upsampled with OpenCV's bicubic, not the LANCZOS rembg uses: a fraction of a level
# from it on average, about 10x faster (docs/decisions/code-resampling.md). OpenCV's own thread
# pool stays off: the gateway already runs one request per core; more would take turns with ONNX
# Runtime's.
cv2.setNumThreads(1)


def mask_to_alpha(mask: npt.NDArray[np.uint8], size: tuple[int, int]) -> Image.Image:
    """The model's square uint8 mask as an "L" matte of `size` (w, h), upsampled bicubically
    (no aspect kept: the model saw the image squashed to a square)."""
    if mask.dtype != np.uint8 or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"expected a square uint8 mask, got {mask.dtype} of shape {mask.shape}")
    matte = cv2.resize(np.ascontiguousarray(mask), size, interpolation=cv2.INTER_CUBIC)
    return Image.fromarray(matte)


# Rows of the cut-out made at a time: each band's temporaries (its colours, its zero test) stay in
# the cache and under the allocator's mmap threshold (docs/decisions/code-cutout.md).
_CUT_OUT_BAND_PIXELS: Final = 256 * 1024


def _cut_out(image: Image.Image, alpha: Image.Image) -> tuple[Image.Image, npt.NDArray[np.uint8]]:
    """RGBA with `alpha`; RGB kept where alpha > 0 and zeroed where it is 0; also its pixels as
    [H, W, 4]. Per band of rows: Pillow's pixels copied out four bytes a pixel as it stores them
    (RGB images are RGBX inside Pillow, so this is a plain copy, where unpacking to 3 bytes and
    shuffling into 4 is not), the alpha channel written over the fourth byte, then one multiply on
    whole 32-bit pixels: the fastest way tried (docs/decisions/code-cutout.md)."""
    width, height = image.size
    raw_mode = "RGBA" if image.mode == "RGBA" else "RGBX"  # an RGBA source's alpha is in `alpha`
    matte = np.asarray(alpha)
    pixels = np.empty((height, width, 4), np.uint8)
    words = pixels.view(np.uint32)[..., 0]
    rows = max(1, _CUT_OUT_BAND_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        colour = image.crop((0, top, width, bottom)).tobytes("raw", raw_mode)
        band = matte[top:bottom]
        pixels[top:bottom] = np.frombuffer(colour, np.uint8).reshape(bottom - top, width, 4)
        pixels[top:bottom, :, 3] = band
        np.multiply(words[top:bottom], band != 0, out=words[top:bottom])
    return Image.frombuffer("RGBA", image.size, pixels, "raw", "RGBA", 0, 1), pixels


def _foreground_box(alpha: Image.Image) -> Box | None:
    # OpenCV's threshold and bounding box: a quarter of the time of Pillow's point() and getbbox().
    _, foreground = cv2.threshold(np.asarray(alpha), FOREGROUND_THRESHOLD - 1, 255, cv2.THRESH_BINARY)
    x, y, width, height = cv2.boundingRect(foreground)
    return None if width == 0 else (x, y, x + width, y + height)


def _widen(box: Box, margin: int, size: tuple[int, int]) -> Box:
    left, top, right, bottom = box
    width, height = size
    return (
        max(0, left - margin),
        max(0, top - margin),
        min(width, right + margin),
        min(height, bottom + margin),
    )


def _render(
    image: Image.Image, alpha: Image.Image, options: pb.Options
) -> tuple[Image.Image, npt.NDArray[np.uint8] | None]:
    if options.format == pb.OUTPUT_FORMAT_MASK:
        return alpha, None
    if options.format == pb.OUTPUT_FORMAT_JPEG:
        color = options.bg_color
        rgb = (color.r, color.g, color.b) if options.HasField("bg_color") else _WHITE
        background = Image.new("RGB", image.size, rgb)
        opaque = image if image.mode == "RGB" else image.convert("RGB")
        return Image.composite(opaque, background, alpha), None
    # Fully transparent pixels become transparent black rather than keeping their colour: the
    # removed background must not be recoverable from the file by dropping the alpha channel (and
    # PNGs come out much smaller). Pixels with any opacity keep their exact colour.
    return _cut_out(image, alpha)


def _scale_box(box: Box, old: tuple[int, int], new: tuple[int, int]) -> Box:
    """Smallest integer box that contains the scaled one (integer maths: no float rounding)."""
    (left, top, right, bottom), (ow, oh), (nw, nh) = box, old, new
    return left * nw // ow, top * nh // oh, min(nw, -(-right * nw // ow)), min(nh, -(-bottom * nh // oh))


def _fit(image: Image.Image, box: Box | None, max_side: int) -> tuple[Image.Image, Box | None]:
    """Downscale (never up) so the longer side is at most max_side; 0 means no limit."""
    width, height = image.size
    longest = max(width, height)
    if max_side == 0 or longest <= max_side:
        return image, box
    size = (max(1, round(width * max_side / longest)), max(1, round(height * max_side / longest)))
    resized = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)
    return resized, None if box is None else _scale_box(box, image.size, size)


def compose(
    decoded: DecodedImage,
    alpha: Image.Image,
    options: pb.Options,
) -> Cutout:
    """Applies the matte (times any alpha the input had), then crop, then max_output_side."""
    image = decoded.image
    if alpha.mode != "L" or alpha.size != image.size:
        raise ValueError(f"alpha must be an 'L' image of {image.size}, got {alpha.mode!r} {alpha.size}")
    if image.mode == "RGBA":
        # Already-transparent pixels stay transparent whatever the model says.
        alpha = ImageChops.multiply(alpha, image.getchannel("A"))
    box = _foreground_box(alpha)
    if options.crop and box is not None:
        region = _widen(box, options.crop_margin, image.size)
        image, alpha = image.crop(region), alpha.crop(region)
        left, top = region[0], region[1]
        box = (box[0] - left, box[1] - top, box[2] - left, box[3] - top)
    rendered, pixels = _render(image, alpha, options)
    result, box = _fit(rendered, box, options.max_output_side)
    bbox = None if box is None else (box[0], box[1], box[2] - box[0], box[3] - box[1])
    return Cutout(
        image=result, bbox=bbox, input_size=decoded.image.size, pixels=pixels if result is rendered else None
    )
