"""The model's mask to the final picture: alpha matte, region of interest, cut-out, crop, scale and
position, downscale, colour or image background.

Alpha is straight (not premultiplied), so wherever the matte is opaque the output keeps the
input's exact colour; only semi-transparent edges are blended, and only for JPEG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageChops, ImageOps

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.errors import invalid
from bgremove_gateway.pipeline.decode import DecodedImage
from bgremove_gateway.pipeline.upload import MAX_CROP_MARGIN

Box = tuple[int, int, int, int]  # left, top, right, bottom (exclusive)

# The subject is where alpha is at least half: the same threshold for bbox, crop and the header.
FOREGROUND_THRESHOLD: Final = 128
_WHITE: Final = (255, 255, 255)
# As for the model input (preprocess.py): the same result as plain LANCZOS, several times faster.
_REDUCING_GAP: Final = 3.0
# remove.bg's cap on each side of Options.crop_margins, as a fraction of the subject's size.
MAX_MARGIN_FRACTION: Final = 0.5


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


def _length(length: pb.Length, reference: int) -> int | None:
    """Pixels of a Length whose percent is of `reference`; None when neither is set."""
    kind = length.WhichOneof("value")
    if kind == "px":
        return length.px
    if kind == "percent":
        return round(length.percent * reference / 100)
    return None


def roi_box(roi: pb.Region, size: tuple[int, int]) -> Box:
    """Options.roi in pixels, clamped to the image; an unset corner is the image's own."""
    width, height = size
    x1, y1 = _length(roi.x1, width) or 0, _length(roi.y1, height) or 0
    x2, y2 = _length(roi.x2, width), _length(roi.y2, height)
    left, top = min(x1, width), min(y1, height)
    right = width if x2 is None else min(x2, width)
    bottom = height if y2 is None else min(y2, height)
    if right <= left or bottom <= top:
        raise invalid(
            "options.roi",
            f"options.roi is ({left}, {top}) to ({right}, {bottom}) pixels once clamped to the "
            f"{width}x{height} image: x2 must be greater than x1 and y2 greater than y1",
        )
    return left, top, right, bottom


def _keep_region(alpha: Image.Image, region: Box) -> Image.Image:
    """`alpha` with everything outside `region` transparent."""
    kept = Image.new("L", alpha.size, 0)
    kept.paste(alpha.crop(region), region[:2])
    return kept


def _margins(box: Box, margins: pb.Margins) -> tuple[int, int, int, int]:
    """Options.crop_margins in pixels (left, top, right, bottom), each side capped at half the
    subject and MAX_CROP_MARGIN, as remove.bg caps them."""
    width, height = box[2] - box[0], box[3] - box[1]

    def side(length: pb.Length, reference: int) -> int:
        return min(_length(length, reference) or 0, int(reference * MAX_MARGIN_FRACTION), MAX_CROP_MARGIN)

    return (
        side(margins.left, width),
        side(margins.top, height),
        side(margins.right, width),
        side(margins.bottom, height),
    )


def _crop_region(box: Box, options: pb.Options, size: tuple[int, int]) -> Box:
    if not options.HasField("crop_margins"):
        return _widen(box, options.crop_margin, size)
    left, top, right, bottom = _margins(box, options.crop_margins)
    width, height = size
    return (
        max(0, box[0] - left),
        max(0, box[1] - top),
        min(width, box[2] + right),
        min(height, box[3] + bottom),
    )


def placement(options: pb.Options) -> pb.Placement:
    """The effective placement: UNSPECIFIED is centred when the subject is scaled, else original."""
    chosen = options.position.placement
    if chosen != pb.PLACEMENT_UNSPECIFIED:
        return chosen
    return pb.PLACEMENT_CENTER if options.scale_percent else pb.PLACEMENT_ORIGINAL


def moves_subject(options: pb.Options) -> bool:
    """True when the subject is scaled or placed anew on its canvas (a second canvas in memory)."""
    return bool(options.scale_percent) or placement(options) != pb.PLACEMENT_ORIGINAL


def _place(
    image: Image.Image, alpha: Image.Image, box: Box, options: pb.Options
) -> tuple[Image.Image, Image.Image]:
    """The subject (its foreground box) scaled and placed on a transparent canvas of the same size."""
    canvas_w, canvas_h = image.size
    left, top, right, bottom = box
    width, height = right - left, bottom - top
    if options.scale_percent:
        # remove.bg's "relative to the total image size": at 100% the subject touches two edges.
        factor = options.scale_percent / 100 * min(canvas_w / width, canvas_h / height)
        size = (min(canvas_w, max(1, round(width * factor))), min(canvas_h, max(1, round(height * factor))))
    else:
        size = (width, height)
    free_w, free_h = canvas_w - size[0], canvas_h - size[1]
    where = placement(options)
    if where == pb.PLACEMENT_ORIGINAL:
        # The subject's centre stays where it was, as far as the canvas allows.
        x = round((left + right - size[0]) / 2)
        y = round((top + bottom - size[1]) / 2)
    elif where == pb.PLACEMENT_CENTER:
        x, y = free_w // 2, free_h // 2
    else:
        x = round(free_w * options.position.x_percent / 100)
        y = round(free_h * options.position.y_percent / 100)
    x, y = min(max(0, x), free_w), min(max(0, y), free_h)
    subject, matte = image.crop(box), alpha.crop(box)
    if size != (width, height):
        subject = subject.resize(size, Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)
        matte = matte.resize(size, Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)
    placed = Image.new(image.mode, image.size, 0)
    placed.paste(subject, (x, y))
    placed_alpha = Image.new("L", image.size, 0)
    placed_alpha.paste(matte, (x, y))
    return placed, placed_alpha


def cover(background: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`background` scaled to cover `size` (aspect kept) and centre-cropped to it, as remove.bg does."""
    if background.size == size:
        return background
    return ImageOps.fit(background, size, Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def _background(
    options: pb.Options, background: Image.Image | None, size: tuple[int, int]
) -> Image.Image | None:
    """The opaque RGB background the subject goes on, or None for a transparent cut-out."""
    if background is not None:
        return cover(background, size)
    if options.HasField("bg_color"):
        color = options.bg_color
        return Image.new("RGB", size, (color.r, color.g, color.b))
    if options.format == pb.OUTPUT_FORMAT_JPEG:
        return Image.new("RGB", size, _WHITE)
    return None


def _render(
    image: Image.Image, alpha: Image.Image, options: pb.Options, background: Image.Image | None
) -> tuple[Image.Image, npt.NDArray[np.uint8] | None]:
    if options.format == pb.OUTPUT_FORMAT_MASK:
        return alpha, None
    backdrop = (
        None if options.format == pb.OUTPUT_FORMAT_ZIP else _background(options, background, image.size)
    )
    if backdrop is not None:
        opaque = image if image.mode == "RGB" else image.convert("RGB")
        flat = Image.composite(opaque, backdrop, alpha)
        # PNG and WebP stay RGBA files (their encoders take RGBA), fully opaque.
        return (flat, None) if options.format == pb.OUTPUT_FORMAT_JPEG else (flat.convert("RGBA"), None)
    # Fully transparent pixels become transparent black rather than keeping their colour: the
    # removed background must not be recoverable from the file by dropping the alpha channel (and
    # PNGs come out much smaller). Pixels with any opacity keep their exact colour.
    return _cut_out(image, alpha)


def _scale_box(box: Box, old: tuple[int, int], new: tuple[int, int]) -> Box:
    """Smallest integer box that contains the scaled one (integer maths: no float rounding)."""
    (left, top, right, bottom), (ow, oh), (nw, nh) = box, old, new
    return left * nw // ow, top * nh // oh, min(nw, -(-right * nw // ow)), min(nh, -(-bottom * nh // oh))


def fitted_size(size: tuple[int, int], max_side: int, max_pixels: int) -> tuple[int, int]:
    """`size` scaled down (never up, aspect kept) to a longer side of at most max_side and at most
    max_pixels pixels; 0 means no limit."""
    width, height = size
    longest = max(width, height)
    if max_side and longest > max_side:
        width, height = max(1, round(width * max_side / longest)), max(1, round(height * max_side / longest))
    if max_pixels and width * height > max_pixels:
        factor = math.sqrt(max_pixels / (width * height))
        width, height = max(1, math.floor(width * factor)), max(1, math.floor(height * factor))
        # Float rounding may leave one row or column too many.
        while width * height > max_pixels and max(width, height) > 1:
            if width >= height:
                width -= 1
            else:
                height -= 1
    return width, height


def _fit(
    image: Image.Image, box: Box | None, max_side: int, max_pixels: int
) -> tuple[Image.Image, Box | None]:
    size = fitted_size(image.size, max_side, max_pixels)
    if size == image.size:
        return image, box
    resized = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)
    return resized, None if box is None else _scale_box(box, image.size, size)


def compose(
    decoded: DecodedImage,
    alpha: Image.Image,
    options: pb.Options,
    background: Image.Image | None = None,
) -> Cutout:
    """Applies the matte (times any alpha the input had) inside options.roi, then crop, then scale
    and position, then the background (options.bg_image, given decoded as `background`, or
    bg_color), then max_output_side and max_output_pixels."""
    image = decoded.image
    if alpha.mode != "L" or alpha.size != image.size:
        raise ValueError(f"alpha must be an 'L' image of {image.size}, got {alpha.mode!r} {alpha.size}")
    if image.mode == "RGBA":
        # Already-transparent pixels stay transparent whatever the model says.
        alpha = ImageChops.multiply(alpha, image.getchannel("A"))
    if options.HasField("roi"):
        alpha = _keep_region(alpha, roi_box(options.roi, image.size))
    box = _foreground_box(alpha)
    if options.crop and box is not None:
        region = _crop_region(box, options, image.size)
        image, alpha = image.crop(region), alpha.crop(region)
        left, top = region[0], region[1]
        box = (box[0] - left, box[1] - top, box[2] - left, box[3] - top)
    if box is not None and moves_subject(options):
        image, alpha = _place(image, alpha, box, options)
        box = _foreground_box(alpha)  # measured again: resampling may move the edge by a pixel
    rendered, pixels = _render(image, alpha, options, background)
    result, box = _fit(rendered, box, options.max_output_side, options.max_output_pixels)
    bbox = None if box is None else (box[0], box[1], box[2] - box[0], box[3] - box[1])
    return Cutout(
        image=result, bbox=bbox, input_size=decoded.image.size, pixels=pixels if result is rendered else None
    )
