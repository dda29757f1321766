"""remove.bg's request parameters mapped onto pb.Options, their syntax checked here.

What each value means for the image (the region, the margins, the placement) is the pipeline's to
apply and check against the image; here a value is refused when it cannot be read, with a message
that says what was sent and what is accepted. docs/http-api.md lists every parameter.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Final

from PIL import ImageColor

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.errors import invalid, too_large
from bgremove_gateway.http.form import Form

IMAGE_SOURCES: Final = ("image_file", "image_file_b64", "image_url")
BG_IMAGE_SOURCES: Final = ("bg_image_file", "bg_image_file_b64", "bg_image_url")
# remove.bg's size names and the most output pixels each gives; 0: the service's own limits.
SIZES: Final[dict[str, int]] = {
    "preview": 250_000,
    "small": 250_000,
    "regular": 250_000,
    "medium": 1_500_000,
    "hd": 4_000_000,
    "full": 0,
    "4k": 0,
    "auto": 0,
}
# Accepted so remove.bg clients work unchanged; one U2-Net model serves every kind of subject.
TYPES: Final = ("auto", "person", "product", "car", "animal", "graphic", "transportation")
FORMATS: Final[dict[str, pb.OutputFormat]] = {
    "png": pb.OUTPUT_FORMAT_PNG,
    "jpg": pb.OUTPUT_FORMAT_JPEG,
    "jpeg": pb.OUTPUT_FORMAT_JPEG,
    "webp": pb.OUTPUT_FORMAT_WEBP,
    "zip": pb.OUTPUT_FORMAT_ZIP,
}
CHANNELS: Final = ("rgba", "alpha")
# Accepted and documented as without effect (docs/http-api.md).
NO_EFFECT: Final = ("type_level", "add_shadow", "shadow_type", "shadow_opacity", "semitransparency")
PARAMETERS: Final = (
    *IMAGE_SOURCES,
    *BG_IMAGE_SOURCES,
    "size",
    "type",
    "format",
    "roi",
    "crop",
    "crop_margin",
    "scale",
    "position",
    "channels",
    "bg_color",
    *NO_EFFECT,
)
TRUE: Final = ("true", "1", "yes")
FALSE: Final = ("false", "0", "no", "")
_LENGTH = re.compile(r"^(?P<number>\d+(?:\.\d+)?)(?P<unit>px|%)?$")
_PERCENT = re.compile(r"^(?P<number>\d+(?:\.\d+)?)%$")
_HEX = re.compile(r"^#?(?P<hex>[0-9a-fA-F]{3}|[0-9a-fA-F]{4}|[0-9a-fA-F]{6}|[0-9a-fA-F]{8})$")
MAX_PX: Final = 2**32 - 1


@dataclass
class RemoveBgRequest:
    image: bytes | None  # None: image_url is set
    image_url: str | None
    bg_image_url: str | None
    options: pb.Options
    # format=auto: PNG when the result has transparency, JPEG when it has a background.
    auto_format: bool

    def settle_format(self) -> None:
        """Decides format=auto once every background is known (bg_image_url is fetched later)."""
        if self.auto_format:
            opaque = self.options.HasField("bg_color") or bool(self.options.bg_image)
            self.options.format = pb.OUTPUT_FORMAT_JPEG if opaque else pb.OUTPUT_FORMAT_PNG


def _choice(name: str, value: str, choices: tuple[str, ...] | list[str]) -> str:
    value = value.strip().lower()
    if value not in choices:
        raise invalid(name, f"{name} {value!r} is not one of {', '.join(choices)}")
    return value


def parse_bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise invalid(name, f"{name} {value!r} is not a boolean: send true or false")


def parse_length(name: str, text: str) -> pb.Length:
    """ "30px", "30" (pixels) or "10%" (0 to 100)."""
    m = _LENGTH.match(text.strip())
    if m is None:
        raise invalid(name, f"{name} value {text!r} is not a length: write 30px, 30 or 10%")
    number = float(m.group("number"))
    if m.group("unit") == "%":
        if number > 100:
            raise invalid(name, f"{name} value {text!r} is over 100%")
        return pb.Length(percent=number)
    if not number.is_integer() or number > MAX_PX:
        raise invalid(name, f"{name} value {text!r} is not a whole number of pixels")
    return pb.Length(px=int(number))


def parse_roi(text: str) -> pb.Region:
    values = text.split()
    if len(values) != 4:
        raise invalid("roi", f"roi {text!r} must be four lengths, x1 y1 x2 y2 (e.g. 0% 0% 100% 100%)")
    x1, y1, x2, y2 = (parse_length("roi", v) for v in values)
    return pb.Region(x1=x1, y1=y1, x2=x2, y2=y2)


def parse_margins(text: str) -> pb.Margins:
    """CSS order: one value for all sides, two for top/bottom and left/right, four clockwise."""
    values = [parse_length("crop_margin", v) for v in text.split()]
    if len(values) == 1:
        top = right = bottom = left = values[0]
    elif len(values) == 2:
        top = bottom = values[0]
        right = left = values[1]
    elif len(values) == 4:
        top, right, bottom, left = values
    else:
        raise invalid(
            "crop_margin", f"crop_margin {text!r} must be 1, 2 or 4 lengths (e.g. 10px, 10% 20px, 1 2 3 4)"
        )
    return pb.Margins(top=top, right=right, bottom=bottom, left=left)


def _percent(name: str, text: str, low: float = 0.0) -> float:
    m = _PERCENT.match(text.strip())
    if m is None or not low <= float(m.group("number")) <= 100:
        raise invalid(name, f"{name} value {text!r} is not a percentage from {low:g}% to 100%")
    return float(m.group("number"))


def parse_scale(text: str) -> float:
    """ "original" (0: the subject keeps its size) or "10%" to "100%"."""
    if text.strip().lower() == "original":
        return 0.0
    return _percent("scale", text, low=10.0)


def parse_position(text: str) -> pb.Position:
    value = text.strip().lower()
    if value == "original":
        return pb.Position(placement=pb.PLACEMENT_ORIGINAL)
    if value == "center":
        return pb.Position(placement=pb.PLACEMENT_CENTER)
    parts = value.split()
    if len(parts) not in (1, 2):
        raise invalid("position", f"position {text!r} must be original, center, x% or x% y%")
    x = _percent("position", parts[0])
    y = _percent("position", parts[-1])
    return pb.Position(placement=pb.PLACEMENT_PERCENT, x_percent=x, y_percent=y)


def parse_color(text: str) -> pb.Color:
    """A hex colour (81d4fa, fff, #81d4fa) or a CSS colour name (green)."""
    value = text.strip().lower()
    m = _HEX.match(value)
    if m is not None:
        digits = m.group("hex")
        if len(digits) in (4, 8):
            raise invalid(
                "bg_color",
                f"bg_color {text!r} has alpha; backgrounds are opaque here: send 3 or 6 hex digits",
            )
        if len(digits) == 3:
            digits = "".join(c * 2 for c in digits)
        return pb.Color(r=int(digits[0:2], 16), g=int(digits[2:4], 16), b=int(digits[4:6], 16))
    if value in ImageColor.colormap:
        r, g, b = ImageColor.getrgb(value)[:3]
        return pb.Color(r=r, g=g, b=b)
    raise invalid(
        "bg_color", f"bg_color {text!r} is neither a hex colour (81d4fa, fff) nor a CSS colour name"
    )


def decode_b64(name: str, text: str, max_bytes: int) -> bytes:
    """Standard base64, with or without a data: URL prefix; spaces read as "+" (a form body that was
    not URL-encoded turns "+" into spaces)."""
    payload = text.strip()
    if payload.startswith("data:"):
        payload = payload.partition(",")[2]
    payload = payload.replace(" ", "+").replace("\n", "").replace("\r", "")
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise too_large(name, f"{name} decodes to over the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(name, f"{name} is not valid base64") from None
    if not data:
        raise invalid(name, f"{name} is empty")
    return data


def _one_source(form: Form, names: tuple[str, ...], required: bool) -> str | None:
    given = [n for n in names if n in form.fields or n in form.files]
    if len(given) > 1:
        raise invalid(names[0], f"send one of {', '.join(names)}, not {' and '.join(given)}")
    if not given:
        if required:
            raise invalid(names[0], f"no image: send one of {', '.join(names)}")
        return None
    return given[0]


def _file(form: Form, name: str, max_bytes: int) -> bytes:
    """A file parameter: a multipart part."""
    if name not in form.files:
        raise invalid(
            name, f"{name} must be a multipart/form-data file part; in other bodies send {name}_b64"
        )
    data = form.files[name]
    if not data:
        raise invalid(name, f"{name} is empty")
    if len(data) > max_bytes:
        raise too_large(name, f"{name} of {len(data)} bytes is over the limit of {max_bytes} bytes")
    return data


def _source(form: Form, names: tuple[str, ...], max_bytes: int, required: bool) -> bytes | str | None:
    """The bytes of a file or base64 source, the text of a URL source, or None."""
    name = _one_source(form, names, required)
    if name is None:
        return None
    if name.endswith("_url"):
        if name in form.files:
            raise invalid(name, f"{name} must be a text field, not a file")
        return form.fields[name].strip()
    if name.endswith("_b64"):
        if name in form.files:
            raise invalid(name, f"{name} must be a text field holding base64, not a file")
        return decode_b64(name, form.fields[name], max_bytes)
    return _file(form, name, max_bytes)


def parse_request(form: Form, max_image_bytes: int) -> RemoveBgRequest:
    """The request's image sources and options; ServiceError (INVALID_ARGUMENT or over a size) for
    the first value that cannot be read."""
    unknown = sorted((set(form.fields) | set(form.files)) - set(PARAMETERS))
    if unknown:
        raise invalid(unknown[0], f"unknown parameter {unknown[0]!r}; accepted: {', '.join(PARAMETERS)}")
    image = _source(form, IMAGE_SOURCES, max_image_bytes, required=True)
    bg = _source(form, BG_IMAGE_SOURCES, max_image_bytes, required=False)
    options = _options(form.fields)
    if isinstance(bg, bytes):
        options.bg_image = bg
    fmt = form.fields.get("format", "auto").strip().lower() or "auto"
    if fmt != "auto" and fmt not in FORMATS:
        raise invalid("format", f"format {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    channels = _choice("channels", form.fields.get("channels", "rgba") or "rgba", CHANNELS)
    if channels == "alpha":
        if fmt not in ("auto", "png"):
            raise invalid("channels", f"channels=alpha answers a PNG matte; format {fmt!r} cannot carry it")
        options.format = pb.OUTPUT_FORMAT_MASK
    elif fmt != "auto":
        options.format = FORMATS[fmt]
    return RemoveBgRequest(
        image=image if isinstance(image, bytes) else None,
        image_url=image if isinstance(image, str) else None,
        bg_image_url=bg if isinstance(bg, str) else None,
        options=options,
        auto_format=fmt == "auto" and channels == "rgba",
    )


def _options(fields: dict[str, str]) -> pb.Options:
    options = pb.Options()
    if "size" in fields:
        options.max_output_pixels = SIZES[_choice("size", fields["size"], list(SIZES))]
    if "type" in fields:
        _choice("type", fields["type"], TYPES)
    if fields.get("roi", "").strip():
        options.roi.CopyFrom(parse_roi(fields["roi"]))
    if "crop" in fields:
        options.crop = parse_bool("crop", fields["crop"])
    if fields.get("crop_margin", "").strip():
        options.crop_margins.CopyFrom(parse_margins(fields["crop_margin"]))
    if fields.get("scale", "").strip():
        options.scale_percent = parse_scale(fields["scale"])
    if fields.get("position", "").strip():
        options.position.CopyFrom(parse_position(fields["position"]))
    if fields.get("bg_color", "").strip():
        options.bg_color.CopyFrom(parse_color(fields["bg_color"]))
    for name in ("add_shadow", "semitransparency"):
        if name in fields:
            parse_bool(name, fields[name])
    return options
