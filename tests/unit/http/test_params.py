"""remove.bg's parameters as pb.Options, and the bodies they come in (multipart, form, JSON)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import grpc
import pytest

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.errors import ServiceError
from bgremove_gateway.http.form import Form, read_chunks, read_form
from bgremove_gateway.http.params import parse_request
from bgremove_gateway.http.responses import status_of

IMAGE = b"\xff\xd8\xff fake jpeg"


def parse(**fields: str) -> pb.Options:
    form = Form(files={"image_file": IMAGE})
    for k, v in fields.items():
        form.add_field(k, v)
    return parse_request(form, 1 << 20).options


def px(n: int) -> pb.Length:
    return pb.Length(px=n)


def pc(n: float) -> pb.Length:
    return pb.Length(percent=n)


@pytest.mark.parametrize(
    ("size", "pixels"), [("preview", 250_000), ("regular", 250_000), ("medium", 1_500_000), ("hd", 4_000_000)]
)
def test_size_caps_the_output_pixels(size: str, pixels: int) -> None:
    assert parse(size=size).max_output_pixels == pixels
    assert parse(size="full").max_output_pixels == parse(size="auto").max_output_pixels == 0


def test_roi_margins_scale_and_position() -> None:
    o = parse(roi="10px 5% 200 100%", crop="true", crop_margin="10px 5%", scale="50%", position="25% 75%")
    assert o.roi == pb.Region(x1=px(10), y1=pc(5), x2=px(200), y2=pc(100))
    assert o.crop
    assert o.crop_margins == pb.Margins(top=px(10), right=pc(5), bottom=px(10), left=pc(5))
    assert o.scale_percent == 50
    assert o.position == pb.Position(placement=pb.PLACEMENT_PERCENT, x_percent=25, y_percent=75)
    assert parse(crop_margin="1 2 3 4").crop_margins == pb.Margins(
        top=px(1), right=px(2), bottom=px(3), left=px(4)
    )
    assert parse(position="center").position.placement == pb.PLACEMENT_CENTER
    assert parse(position="40%").position == pb.Position(
        placement=pb.PLACEMENT_PERCENT, x_percent=40, y_percent=40
    )
    assert parse(scale="original").scale_percent == 0


@pytest.mark.parametrize(
    ("text", "rgb"), [("81d4fa", (0x81, 0xD4, 0xFA)), ("#fff", (255, 255, 255)), ("green", (0, 128, 0))]
)
def test_bg_color_hex_or_css_name(text: str, rgb: tuple[int, int, int]) -> None:
    c = parse(bg_color=text).bg_color
    assert (c.r, c.g, c.b) == rgb


@pytest.mark.parametrize(
    ("fields", "fmt"),
    [
        ({}, pb.OUTPUT_FORMAT_PNG),  # auto, transparent: PNG
        ({"bg_color": "red"}, pb.OUTPUT_FORMAT_JPEG),  # auto, opaque: JPEG
        ({"format": "jpg"}, pb.OUTPUT_FORMAT_JPEG),
        ({"format": "webp"}, pb.OUTPUT_FORMAT_WEBP),
        ({"format": "zip"}, pb.OUTPUT_FORMAT_ZIP),
        ({"channels": "alpha"}, pb.OUTPUT_FORMAT_MASK),
        ({"channels": "alpha", "format": "png"}, pb.OUTPUT_FORMAT_MASK),
    ],
)
def test_format_and_channels(fields: dict[str, str], fmt: int) -> None:
    form = Form(files={"image_file": IMAGE}, fields=dict(fields))
    request = parse_request(form, 1 << 20)
    request.settle_format()
    assert request.options.format == fmt


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"size": "8k"}, "size"),
        ({"type": "dog"}, "type"),
        ({"roi": "1 2 3"}, "roi"),
        ({"roi": "1 2 3 101%"}, "roi"),
        ({"crop": "maybe"}, "crop"),
        ({"crop_margin": "1 2 3"}, "crop_margin"),
        ({"crop_margin": "1.5px"}, "crop_margin"),
        ({"scale": "9%"}, "scale"),
        ({"scale": "101%"}, "scale"),
        ({"position": "left"}, "position"),
        ({"bg_color": "81d4fa77"}, "bg_color"),
        ({"channels": "rgb"}, "channels"),
        ({"channels": "alpha", "format": "jpg"}, "channels"),
        ({"image_file_b64": "AAAA"}, "image_file"),  # two sources
        ({"colour": "red"}, "colour"),
    ],
)
def test_unreadable_values_are_400_naming_the_parameter(fields: dict[str, str], named: str) -> None:
    with pytest.raises(ServiceError) as err:
        parse(**fields)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert named in err.value.message
    assert status_of(err.value).status == 400


def test_no_effect_parameters_are_accepted() -> None:
    assert parse(type="person", add_shadow="true", semitransparency="false", type_level="1") == pb.Options()


def test_base64_with_data_url_and_spaces_for_plus() -> None:
    data = bytes(range(250)) * 4
    text = base64.b64encode(data).decode()
    assert "+" in text
    for sent in (text, "data:image/jpeg;base64," + text, text.replace("+", " ")):
        form = Form(fields={"image_file_b64": sent})
        assert parse_request(form, 1 << 20).image == data
    with pytest.raises(ServiceError) as err:
        parse_request(Form(fields={"image_file_b64": text}), 100)
    assert status_of(err.value).status == 413


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


MULTIPART = (
    b'--b\r\nContent-Disposition: form-data; name="size"\r\n\r\npreview\r\n'
    b'--b\r\nContent-Disposition: form-data; name="image_file"; filename="x.jpg"\r\n'
    b"Content-Type: image/jpeg\r\n\r\n" + IMAGE + b"\r\n--b--\r\n"
)


async def test_multipart_split_anywhere_parses_the_same() -> None:
    for cut in (1, 7, 50, len(MULTIPART) - 3):
        form = await read_form("multipart/form-data; boundary=b", chunks(MULTIPART[:cut], MULTIPART[cut:]))
        assert form.fields == {"size": "preview"} and form.files == {"image_file": IMAGE}


@pytest.mark.parametrize(
    ("content_type", "body", "text"),
    [
        ("multipart/form-data", MULTIPART, "boundary"),
        ("multipart/form-data; boundary=b", MULTIPART[:-8], "closing boundary"),
        (
            "multipart/form-data; boundary=b",
            MULTIPART.replace(b'name="size"', b'name="image_file"'),
            "more than once",
        ),
        ("application/json", b"[1]", "object"),
        ("application/json", b'{"a": [1]}', "string, number or boolean"),
        ("application/x-www-form-urlencoded", b"a=1&&&=", "malformed"),
    ],
)
async def test_malformed_bodies_say_what_is_wrong(content_type: str, body: bytes, text: str) -> None:
    with pytest.raises(ServiceError) as err:
        await read_form(content_type, chunks(body))
    assert text in err.value.message and status_of(err.value).status == 400


async def test_body_limit_counts_streamed_chunks_and_charges_the_budget() -> None:
    charged: list[int] = []
    with pytest.raises(ServiceError) as err:
        async for _ in read_chunks(chunks(b"x" * 600, b"y" * 600), 1000, 5.0, charged.append):
            pass
    assert status_of(err.value).status == 413 and "1200 bytes so far" in err.value.message
    assert charged == [600]  # the chunk over the limit was never kept


async def test_body_timeout_is_408() -> None:
    async def trickle() -> AsyncIterator[bytes]:
        import asyncio

        yield b"x"
        await asyncio.sleep(10)
        yield b"y"

    with pytest.raises(ServiceError) as err:
        async for _ in read_chunks(trickle(), 1000, 0.2, lambda n: None):
            pass
    assert status_of(err.value).status == 408 and "0.2 s" in err.value.message


async def test_image_file_is_a_file_with_or_without_a_filename() -> None:
    binary = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\xc3\x28"  # not UTF-8
    body = b'--b\r\nContent-Disposition: form-data; name="image_file"\r\n\r\n' + binary + b"\r\n--b--\r\n"
    form = await read_form("multipart/form-data; boundary=b", chunks(body))
    assert parse_request(form, 1 << 20).image == binary


async def test_image_file_in_a_json_body_says_to_send_base64() -> None:
    form = await read_form("application/json", chunks(b'{"image_file": "abc"}'))
    with pytest.raises(ServiceError, match="image_file_b64"):
        parse_request(form, 1 << 20)
