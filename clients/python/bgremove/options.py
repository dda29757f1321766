"""What the caller asks for, checked here so a typo fails locally instead of after an upload.

Lengths, regions, margins, scale and position take remove.bg's text forms as well as numbers:
"30px" or 30 is pixels, "10%" a percentage; a region is "x1 y1 x2 y2"; margins are one, two
(top/bottom, left/right) or four (top, right, bottom, left) lengths.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from PIL import ImageColor

from bgremove.v1 import bgremove_pb2 as pb

OutputFormatName = Literal["png", "webp", "mask", "jpeg", "zip"]
Rgb = tuple[int, int, int]
# Pixels as an int (or "30px", "30"), or a percentage as "10%".
LengthSpec = int | str
BgImage = bytes | str | os.PathLike[str]

FORMATS: tuple[str, ...] = get_args(OutputFormatName)

_FORMAT_TO_PROTO: dict[str, pb.OutputFormat] = {
    "png": pb.OUTPUT_FORMAT_PNG,
    "webp": pb.OUTPUT_FORMAT_WEBP,
    "mask": pb.OUTPUT_FORMAT_MASK,
    "jpeg": pb.OUTPUT_FORMAT_JPEG,
    "zip": pb.OUTPUT_FORMAT_ZIP,
}

# File extension a result of each format is saved under.
EXTENSIONS: dict[str, str] = {"png": "png", "webp": "webp", "mask": "png", "jpeg": "jpg", "zip": "zip"}
# Formats with no background for bg_color or bg_image to fill.
_NO_BACKGROUND = frozenset({"mask", "zip"})
# remove.bg's bounds on scale, which the server enforces too (margins it caps, at 50% of the subject).
MIN_SCALE_PERCENT, MAX_SCALE_PERCENT = 10.0, 100.0


def parse_color(value: Rgb | str) -> Rgb:
    """An opaque sRGB colour from (r, g, b), "#rrggbb", "#rgb", "rgb(...)" or a CSS name such as "white".

    Raises ValueError naming the accepted forms; colours with transparency are refused because the
    background they are for is opaque.
    """
    if isinstance(value, str):
        try:
            parsed = ImageColor.getrgb(value.strip())
        except ValueError:
            raise ValueError(
                f"bg_color {value!r} is not a colour: use '#rrggbb', '#rgb', 'rgb(r, g, b)' or a CSS name"
            ) from None
        if len(parsed) == 4 and parsed[3] != 255:
            raise ValueError(f"bg_color {value!r} is translucent: the background must be opaque")
        return parsed[0], parsed[1], parsed[2]
    if len(value) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in value):
        raise ValueError(f"bg_color {value!r} must be three integers 0..255 (r, g, b)")
    return value[0], value[1], value[2]


def _percent(text: str, name: str, high: float = 100.0) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= high):
        span = f"from 0% to {high:g}%" if math.isfinite(high) else "of 0% or more"
        raise ValueError(f"{name} {text + '%'!r} must be a percentage {span}")
    return value


def parse_length(value: LengthSpec, name: str, max_percent: float = 100.0) -> pb.Length:
    """30, "30" or "30px": pixels; "10%": a percentage (0..max_percent, which may be math.inf)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name} {value} must be 0 or more pixels")
        return pb.Length(px=value)
    text = str(value).strip().lower()
    if text.endswith("%"):
        return pb.Length(percent=_percent(text[:-1].strip(), name, max_percent))
    digits = text.removesuffix("px").strip()
    if not digits.isdigit():
        raise ValueError(
            f"{name} {value!r} is not a length: use pixels (30 or '30px') or a percentage ('10%')"
        )
    return pb.Length(px=int(digits))


def _parts(value: str | Sequence[LengthSpec], counts: tuple[int, ...], name: str) -> list[LengthSpec]:
    parts: list[LengthSpec] = list(value.replace(",", " ").split() if isinstance(value, str) else value)
    if len(parts) not in counts:
        wanted = " or ".join(str(c) for c in counts)
        raise ValueError(f"{name} {value!r} has {len(parts)} values; it takes {wanted}")
    return parts


def parse_roi(value: str | Sequence[LengthSpec]) -> pb.Region:
    """ "x1 y1 x2 y2" (or four lengths): x in pixels or % of the width, y of the height."""
    x1, y1, x2, y2 = (parse_length(p, "roi") for p in _parts(value, (4,), "roi"))
    return pb.Region(x1=x1, y1=y1, x2=x2, y2=y2)


def parse_margins(value: str | Sequence[LengthSpec]) -> pb.Margins:
    """One length for every side, two (top/bottom, left/right) or four (top, right, bottom, left);
    percentages are of the subject's size. The server caps each side at 50% of the subject."""
    sides = [parse_length(p, "crop_margin", math.inf) for p in _parts(value, (1, 2, 4), "crop_margin")]
    if len(sides) == 1:
        sides *= 4
    elif len(sides) == 2:
        sides *= 2
    top, right, bottom, left = sides
    return pb.Margins(top=top, right=right, bottom=bottom, left=left)


def parse_scale(value: float | str) -> float:
    """ "original" (0), or the subject's size relative to the canvas: 10..100, "50" or "50%"."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "original":
            return 0.0
        try:
            value = float(text.removesuffix("%"))
        except ValueError:
            raise ValueError(f"scale {text!r} is not 'original' or a percentage from 10% to 100%") from None
    if value != 0 and not (math.isfinite(value) and MIN_SCALE_PERCENT <= value <= MAX_SCALE_PERCENT):
        raise ValueError(f"scale {value:g} must be 'original' (0) or 10% to 100%")
    return float(value)


def parse_position(value: str | Sequence[float]) -> pb.Position:
    """ "original", "center", one percentage for both axes ("50%") or two (horizontal, vertical)
    of the free space: 0% is left/top, 100% right/bottom."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "original":
            return pb.Position(placement=pb.PLACEMENT_ORIGINAL)
        if text in ("center", "centre"):
            return pb.Position(placement=pb.PLACEMENT_CENTER)
        parts = text.replace(",", " ").split()
        if not 1 <= len(parts) <= 2 or not all(p.endswith("%") for p in parts):
            raise ValueError(
                f"position {value!r} is not 'original', 'center', or one or two percentages "
                "('50%', '20% 80%')"
            )
        numbers = [_percent(p[:-1], "position") for p in parts]
    else:
        numbers = [_percent(str(v), "position") for v in value]
        if not 1 <= len(numbers) <= 2:
            raise ValueError(f"position {value!r} takes one or two percentages")
    x, y = numbers[0], numbers[-1]
    return pb.Position(placement=pb.PLACEMENT_PERCENT, x_percent=x, y_percent=y)


@dataclass(frozen=True)
class RemoveOptions:
    """How the result is produced; every field maps onto bgremove.v1.Options."""

    format: OutputFormatName = "png"
    # Background the subject is composited on (opaque result): JPEG's, white when None; PNG and
    # WebP keep a transparent background when None.
    bg_color: Rgb | str | None = None
    # Crop to the subject's bounding box, widened by crop_margin: pixels as an int (the same on
    # every side, stopping at the image's edge), or remove.bg's forms ("10%", "20px 5%", four values).
    crop: bool = False
    crop_margin: int | str = 0
    # Scale down so the longer side is at most this many pixels; 0 keeps the input size.
    max_output_side: int = 0
    # A model the server lists in GetServiceInfo; empty selects its default.
    model: str = ""
    # Only the subject inside this region is kept: "x1 y1 x2 y2" in pixels or percent.
    roi: str | Sequence[LengthSpec] | None = None
    # The subject's size relative to the canvas, "10%".."100%"; None or "original" keeps it.
    scale: float | str | None = None
    # Where the subject goes: "original", "center", or percentages of the free space.
    position: str | Sequence[float] | None = None
    # An image (bytes, or a file's path) under the subject, resized to cover the result; never in
    # the repr, so no image bytes reach a log line or a traceback.
    bg_image: BgImage | None = field(default=None, repr=False)
    # Scale down so the result has at most this many pixels (0.25 MP: remove.bg's preview); 0: no cap.
    max_output_pixels: int = 0

    def __post_init__(self) -> None:
        if self.format not in _FORMAT_TO_PROTO:
            raise ValueError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        for name in ("bg_color", "bg_image"):
            if getattr(self, name) is not None and self.format in _NO_BACKGROUND:
                raise ValueError(f"{name} does not apply to format {self.format!r}: it has no background")
        if self.bg_color is not None:
            parse_color(self.bg_color)
        if isinstance(self.crop_margin, int):
            if self.crop_margin < 0:
                raise ValueError(f"crop_margin must be 0 or more pixels, got {self.crop_margin}")
        else:
            parse_margins(self.crop_margin)
        if self.crop_margin not in (0, "") and not self.crop:
            raise ValueError("crop_margin needs crop=True")
        if self.max_output_side < 0:
            raise ValueError(
                f"max_output_side must be 0 (keep size) or more pixels, got {self.max_output_side}"
            )
        if self.max_output_pixels < 0:
            raise ValueError(f"max_output_pixels must be 0 (no cap) or more, got {self.max_output_pixels}")
        if self.roi is not None:
            parse_roi(self.roi)
        if self.scale is not None:
            parse_scale(self.scale)
        if self.position is not None:
            parse_position(self.position)

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]

    def to_proto(self) -> pb.Options:
        """The wire message; a bg_image path is read here."""
        message = pb.Options(
            format=_FORMAT_TO_PROTO[self.format],
            crop=self.crop,
            max_output_side=self.max_output_side,
            model=self.model,
            max_output_pixels=self.max_output_pixels,
        )
        if isinstance(self.crop_margin, int):
            message.crop_margin = self.crop_margin
        elif self.crop_margin:
            message.crop_margins.CopyFrom(parse_margins(self.crop_margin))
        if self.bg_color is not None:
            r, g, b = parse_color(self.bg_color)
            message.bg_color.CopyFrom(pb.Color(r=r, g=g, b=b))
        if self.roi is not None:
            message.roi.CopyFrom(parse_roi(self.roi))
        if self.scale is not None:
            message.scale_percent = parse_scale(self.scale)
        if self.position is not None:
            message.position.CopyFrom(parse_position(self.position))
        if self.bg_image is not None:
            image = self.bg_image
            message.bg_image = bytes(image) if isinstance(image, bytes) else Path(image).read_bytes()
        return message
