"""What the caller asks for, checked here so a typo fails locally instead of after an upload."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from PIL import ImageColor

from bgremove.v1 import bgremove_pb2 as pb

OutputFormatName = Literal["png", "webp", "mask", "jpeg"]
Rgb = tuple[int, int, int]

FORMATS: tuple[str, ...] = get_args(OutputFormatName)

_FORMAT_TO_PROTO: dict[str, pb.OutputFormat] = {
    "png": pb.OUTPUT_FORMAT_PNG,
    "webp": pb.OUTPUT_FORMAT_WEBP,
    "mask": pb.OUTPUT_FORMAT_MASK,
    "jpeg": pb.OUTPUT_FORMAT_JPEG,
}

# File extension a result of each format is saved under.
EXTENSIONS: dict[str, str] = {"png": "png", "webp": "webp", "mask": "png", "jpeg": "jpg"}


def parse_color(value: Rgb | str) -> Rgb:
    """An opaque sRGB colour from (r, g, b), "#rrggbb", "#rgb", "rgb(...)" or a CSS name such as "white".

    Raises ValueError naming the accepted forms; colours with transparency are refused because the
    JPEG background they are for has no alpha channel.
    """
    if isinstance(value, str):
        try:
            parsed = ImageColor.getrgb(value.strip())
        except ValueError:
            raise ValueError(
                f"bg_color {value!r} is not a colour: use '#rrggbb', '#rgb', 'rgb(r, g, b)' or a CSS name"
            ) from None
        if len(parsed) == 4 and parsed[3] != 255:
            raise ValueError(f"bg_color {value!r} is translucent: the JPEG background must be opaque")
        return parsed[0], parsed[1], parsed[2]
    if len(value) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in value):
        raise ValueError(f"bg_color {value!r} must be three integers 0..255 (r, g, b)")
    return value[0], value[1], value[2]


@dataclass(frozen=True)
class RemoveOptions:
    """How the result is produced; every field maps onto bgremove.v1.Options."""

    format: OutputFormatName = "png"
    # Background the subject is composited on; only the JPEG format has one (white when None).
    bg_color: Rgb | str | None = None
    # Crop to the subject's bounding box, widened by crop_margin pixels on each side.
    crop: bool = False
    crop_margin: int = 0
    # Scale down so the longer side is at most this many pixels; 0 keeps the input size.
    max_output_side: int = 0
    # A model the server lists in GetServiceInfo; empty selects its default.
    model: str = ""

    def __post_init__(self) -> None:
        if self.format not in _FORMAT_TO_PROTO:
            raise ValueError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.bg_color is not None:
            if self.format != "jpeg":
                raise ValueError(f"bg_color applies to format 'jpeg' only, not {self.format!r}")
            parse_color(self.bg_color)
        if self.crop_margin < 0:
            raise ValueError(f"crop_margin must be 0 or more pixels, got {self.crop_margin}")
        if self.crop_margin and not self.crop:
            raise ValueError("crop_margin needs crop=True")
        if self.max_output_side < 0:
            raise ValueError(
                f"max_output_side must be 0 (keep size) or more pixels, got {self.max_output_side}"
            )

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]

    def to_proto(self) -> pb.Options:
        message = pb.Options(
            format=_FORMAT_TO_PROTO[self.format],
            crop=self.crop,
            crop_margin=self.crop_margin,
            max_output_side=self.max_output_side,
            model=self.model,
        )
        if self.bg_color is not None:
            r, g, b = parse_color(self.bg_color)
            message.bg_color.CopyFrom(pb.Color(r=r, g=g, b=b))
        return message
