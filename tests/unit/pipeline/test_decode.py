"""Decoding: what is refused (with which status and message) and every image kind that must work."""

from __future__ import annotations

import io
import mmap
import struct
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms, ImageFile, PngImagePlugin
from skimage import data as skdata

from bgremove_gateway.config import Limits
from bgremove_gateway.errors import ServiceError
from bgremove_gateway.pipeline.costs import inspect_cost
from bgremove_gateway.pipeline.decode import decode, sniff_content_type
from e2e_helpers import phone_metadata

LIMITS = Limits()
SUPPORTED = "image/jpeg, image/png, image/webp"


def encoded(image: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def refused(data: bytes, content_type: str, limits: Limits = LIMITS) -> ServiceError:
    # Any warning (DecompressionBombWarning above all) would be a leak: make it fail the test.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ServiceError) as caught:
            decode(data, content_type, limits)
    return caught.value


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def png16(pixels: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG (Pillow cannot write 16-bit colour), pixels uint16 [h, w, channels]."""
    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real 16x16 JPEG whose frame header (SOF0) is patched to claim width x height."""
    data = bytearray(encoded(Image.new("RGB", (16, 16), "red"), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def photo() -> Image.Image:
    return Image.fromarray(skdata.astronaut())


# --- type checks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "content_type"), [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")]
)
def test_sniff_supported_types(fmt: str, content_type: str) -> None:
    assert sniff_content_type(encoded(Image.new("RGB", (2, 2)), fmt)) == content_type


@pytest.mark.parametrize(
    ("fmt", "content_type"), [("GIF", "image/gif"), ("BMP", "image/bmp"), ("TIFF", "image/tiff")]
)
def test_unsupported_formats_are_named_and_refused(fmt: str, content_type: str) -> None:
    data = encoded(Image.new("RGB", (8, 8), "blue"), fmt)
    assert sniff_content_type(data) == content_type
    err = refused(data, "image/png")
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{content_type} images are not supported" in err.message
    assert SUPPORTED in err.message


@pytest.mark.parametrize("data", [b"hello, this is not an image", b"\x00" * 100, b"\xff\xd8", b"%PDF-1.7\n"])
def test_bytes_that_are_not_an_image(data: bytes) -> None:
    assert sniff_content_type(data) is None
    err = refused(data, "image/jpeg")
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an image" in err.message and SUPPORTED in err.message


def test_empty_data() -> None:
    err = refused(b"", "image/jpeg")
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an image" in err.message


def test_declared_type_must_match_the_bytes() -> None:
    err = refused(encoded(Image.new("RGB", (4, 4)), "PNG"), "image/webp")
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "content_type is image/webp but the data is image/png" in err.message


def test_plants_fixture_is_a_png_named_jpg(peer_fixtures: Path) -> None:
    data = (peer_fixtures / "plants-1.jpg").read_bytes()
    err = refused(data, "image/jpeg")
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "content_type is image/jpeg but the data is image/png" in err.message
    decoded = decode(data, "image/png", LIMITS)
    assert decoded.source_format == "PNG"
    assert decoded.image.mode == "RGBA"
    assert decoded.image.size == (987, 1481)
    with Image.open(io.BytesIO(data)) as direct:
        np.testing.assert_array_equal(np.asarray(decoded.image), np.asarray(direct))


# --- size limits ---------------------------------------------------------------------------------


def test_pixel_limit_names_both_numbers() -> None:
    data = encoded(Image.new("RGB", (100, 100)), "PNG")
    err = refused(data, "image/png", Limits(max_pixels=9_999))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "100x100 = 10000 pixels" in err.message and "limit of 9999 pixels" in err.message
    assert decode(data, "image/png", Limits(max_pixels=10_000)).image.size == (100, 100)


@pytest.mark.parametrize(
    ("data", "content_type"),
    [(png_header_only(60_000, 60_000), "image/png"), (jpeg_with_size(65_000, 65_000), "image/jpeg")],
)
def test_pixel_limit_is_checked_from_the_header_before_decoding(data: bytes, content_type: str) -> None:
    # No pixel data follows these headers: reaching the decoder would report corruption instead.
    err = refused(data, content_type)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the limit of 64000000 pixels" in err.message


def test_decompression_bomb_handling_does_not_depend_on_pillows_global() -> None:
    before = Image.MAX_IMAGE_PIXELS
    assert before is not None
    # Past twice Pillow's own limit, where Image.open would raise DecompressionBombError: with a
    # larger configured limit the header is accepted, and the missing data is what is reported.
    side = int((3 * before) ** 0.5)
    err = refused(png_header_only(side, side), "image/png", Limits(max_pixels=4 * before))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message == "image data is corrupt or truncated"
    # Between Pillow's warning threshold and our smaller limit: our check, no warning.
    side = int((1.5 * before) ** 0.5)
    err = refused(png_header_only(side, side), "image/png", Limits(max_pixels=before))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert before == Image.MAX_IMAGE_PIXELS


def webp_with_size(width: int, height: int) -> bytes:
    """A real lossy WebP whose key-frame header is patched to claim width x height."""
    data = bytearray(encoded(Image.new("RGB", (16, 8), "red"), "WEBP"))
    assert data[12:16] == b"VP8 " and data[23:26] == b"\x9d\x01\x2a"
    data[26:30] = struct.pack("<HH", width, height)
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "content_type", "size"),
    [
        (png_header_only(0, 10), "image/png", "0x10"),
        (png_header_only(10, 0), "image/png", "10x0"),
        (jpeg_with_size(0, 16), "image/jpeg", "0x16"),
        (jpeg_with_size(16, 0), "image/jpeg", "16x0"),
        (webp_with_size(0, 8), "image/webp", "0x8"),
    ],
)
def test_zero_size_is_named_as_such(data: bytes, content_type: str, size: str) -> None:
    err = refused(data, content_type)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message == f"image declares {size} pixels: width and height must be at least 1"


# --- corrupt data --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "content_type"), [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")]
)
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_images_are_refused(fmt: str, content_type: str, keep: float) -> None:
    data = encoded(photo(), fmt)
    err = refused(data[: int(len(data) * keep)], content_type)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message == "image data is corrupt or truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_header_cut_short() -> None:
    err = refused(encoded(photo(), "PNG")[:20], "image/png")
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "corrupt or truncated" in err.message


def test_damaged_png_data() -> None:
    data = bytearray(encoded(photo(), "PNG"))
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    err = refused(bytes(data), "image/png")
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "corrupt" in err.message


@pytest.mark.parametrize(
    ("magic", "content_type"),
    [
        (b"\xff\xd8\xff\xe0", "image/jpeg"),
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"RIFF\x00\x10\x00\x00WEBPVP8 ", "image/webp"),
    ],
)
def test_valid_magic_followed_by_garbage(magic: bytes, content_type: str) -> None:
    garbage = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    err = refused(magic + garbage, content_type)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "corrupt" in err.message


# --- image kinds that must work --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size"),
    [("anime-girl-1.jpg", (850, 601)), ("car-1.jpg", (480, 360)), ("cloth-1.jpg", (739, 1134))],
)
def test_rembg_photos(peer_fixtures: Path, name: str, size: tuple[int, int]) -> None:
    decoded = decode((peer_fixtures / name).read_bytes(), "image/jpeg", LIMITS)
    assert decoded.source_format == "JPEG"
    assert (decoded.image.mode, decoded.image.size) == ("RGB", size)
    assert decoded.image.info == {}


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket"])
def test_lossless_formats_decode_to_the_exact_pixels(name: str) -> None:
    pixels = getattr(skdata, name)()
    for fmt, content_type in [("PNG", "image/png"), ("WEBP", "image/webp")]:
        data = encoded(Image.fromarray(pixels), fmt, lossless=True)
        decoded = decode(data, content_type, LIMITS)
        assert decoded.source_format == fmt
        assert decoded.image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(decoded.image), pixels)


def test_jpeg_photo_decodes_close_to_the_source() -> None:
    pixels = skdata.coffee()
    decoded = decode(encoded(Image.fromarray(pixels), "JPEG", quality=95), "image/jpeg", LIMITS)
    assert decoded.image.size == (pixels.shape[1], pixels.shape[0])
    assert np.abs(np.asarray(decoded.image).astype(int) - pixels).mean() < 3


@pytest.mark.parametrize("size", [(1, 1), (10_000, 3), (3, 10_000)])
@pytest.mark.parametrize(
    ("fmt", "content_type"), [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")]
)
def test_extreme_shapes(size: tuple[int, int], fmt: str, content_type: str) -> None:
    decoded = decode(encoded(Image.new("RGB", size, (200, 40, 40)), fmt), content_type, LIMITS)
    assert decoded.image.size == size


def test_greyscale() -> None:
    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    decoded = decode(encoded(grey, "PNG"), "image/png", LIMITS)
    assert decoded.image.mode == "RGB"
    rgb = np.asarray(decoded.image)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], np.asarray(grey))


def test_greyscale_with_alpha() -> None:
    la = Image.merge("LA", (Image.new("L", (8, 8), 90), Image.linear_gradient("L").resize((8, 8))))
    decoded = decode(encoded(la, "PNG"), "image/png", LIMITS)
    assert decoded.image.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(decoded.image.getchannel("A")), np.asarray(la.getchannel("A")))
    assert set(np.asarray(decoded.image.convert("RGB")).ravel()) == {90}


def test_palette_without_transparency() -> None:
    palette = Image.new("P", (4, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
    palette.putdata([0, 1, 2, 3])
    decoded = decode(encoded(palette, "PNG"), "image/png", LIMITS)
    assert decoded.image.mode == "RGB"
    assert list(decoded.image.get_flattened_data()) == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30)]


def test_palette_with_transparency() -> None:
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.putdata([0, 1, 2])
    decoded = decode(encoded(palette, "PNG", transparency=bytes([0, 128, 255])), "image/png", LIMITS)
    assert decoded.image.mode == "RGBA"
    assert list(decoded.image.get_flattened_data()) == [(255, 0, 0, 0), (0, 255, 0, 128), (0, 0, 255, 255)]


def test_rgb_png_with_a_transparent_colour_key() -> None:
    image = Image.new("RGB", (2, 1), (1, 2, 3))
    image.putpixel((1, 0), (9, 9, 9))
    decoded = decode(encoded(image, "PNG", transparency=(1, 2, 3)), "image/png", LIMITS)
    assert decoded.image.mode == "RGBA"
    assert list(decoded.image.get_flattened_data()) == [(1, 2, 3, 0), (9, 9, 9, 255)]


def test_bilevel() -> None:
    image = Image.new("1", (2, 1))
    image.putpixel((1, 0), 1)
    decoded = decode(encoded(image, "PNG"), "image/png", LIMITS)
    assert list(decoded.image.get_flattened_data()) == [(0, 0, 0), (255, 255, 255)]


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 128, 129, 257, 32_896, 65_280, 65_535]], dtype=np.uint16)
    decoded = decode(png16(values[..., None], color_type=0), "image/png", LIMITS)
    assert decoded.image.mode == "RGB"
    assert np.asarray(decoded.image)[0, :, 0].tolist() == [0, 0, 1, 1, 128, 254, 255]


def test_sixteen_bit_colour_with_alpha() -> None:
    pixels = np.array([[[65_535, 0, 32_896, 65_535], [0, 65_535, 0, 0]]], dtype=np.uint16)
    decoded = decode(png16(pixels, color_type=6), "image/png", LIMITS)
    assert decoded.image.mode == "RGBA"
    assert list(decoded.image.get_flattened_data()) == [(255, 0, 128, 255), (0, 255, 0, 0)]


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # pure cyan
    decoded = decode(encoded(cmyk, "JPEG", quality=100), "image/jpeg", LIMITS)
    assert decoded.image.mode == "RGB"
    r, g, b = decoded.image.getpixel((4, 4))  # type: ignore[misc]
    assert r < 10 and g > 245 and b > 245


def test_rgba_keeps_its_alpha_exactly() -> None:
    rgba = Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 48, 4), dtype=np.uint8))
    for fmt, content_type in [("PNG", "image/png"), ("WEBP", "image/webp")]:
        decoded = decode(encoded(rgba, fmt, lossless=True, exact=True), content_type, LIMITS)
        assert decoded.image.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(decoded.image), np.asarray(rgba))


@pytest.mark.parametrize(("fmt", "content_type"), [("PNG", "image/png"), ("WEBP", "image/webp")])
def test_animation_decodes_its_first_frame(fmt: str, content_type: str) -> None:
    frames = [Image.new("RGB", (20, 10), color) for color in ("red", "blue", "green")]
    data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, lossless=True)
    with Image.open(io.BytesIO(data)) as check:
        assert getattr(check, "n_frames", 1) == 3  # really animated
    decoded = decode(data, content_type, LIMITS)
    assert decoded.image.size == (20, 10)
    assert decoded.image.getpixel((10, 5)) == (255, 0, 0)


def exif_rotated_jpeg() -> tuple[bytes, Image.Image]:
    """A 60x40 JPEG whose EXIF says 'rotate 90 degrees clockwise to display', with GPS tags, an
    ICC profile and XMP. The stored pixels have a red block in the top-left corner."""
    image = Image.new("RGB", (60, 40), "white")
    image.paste((255, 0, 0), (0, 0, 20, 10))
    return encoded(image, "JPEG", quality=95, **phone_metadata()), image


def test_exif_orientation_is_applied_and_metadata_dropped() -> None:
    data, _ = exif_rotated_jpeg()
    with Image.open(io.BytesIO(data)) as check:  # the fixture really carries it all
        assert {"exif", "icc_profile", "xmp"} <= check.info.keys()
        assert check.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    decoded = decode(data, "image/jpeg", LIMITS)
    assert decoded.image.size == (40, 60)
    # Rotating clockwise moves the stored top-left corner to the top-right.
    assert decoded.image.getpixel((35, 5))[0] > 200 > decoded.image.getpixel((35, 5))[1]  # type: ignore[index]
    assert decoded.image.getpixel((5, 5)) == (255, 255, 255)
    assert decoded.image.info == {}
    assert len(decoded.image.getexif()) == 0


def test_on_size_gets_the_size_and_the_metadata_bytes_before_decoding() -> None:
    data, _ = exif_rotated_jpeg()
    seen: list[tuple[int, int, int]] = []
    decode(data, "image/jpeg", LIMITS, lambda w, h, extra: seen.append((w, h, extra)))
    # The stored size (before the EXIF turn) and what Pillow keeps of the EXIF, ICC profile and XMP.
    assert seen == [(60, 40, inspect_cost(data, "image/jpeg", LIMITS).held_bytes)]
    assert seen[0][2] > 1000


def test_upright_photo_keeps_its_pixels_and_drops_the_file_and_metadata() -> None:
    image = Image.new("RGB", (60, 40), "white")
    image.paste((255, 0, 0), (0, 0, 20, 10))
    metadata = phone_metadata()
    exif = metadata["exif"]
    assert isinstance(exif, Image.Exif)
    exif[ExifTags.Base.Orientation] = 1
    data = encoded(image, "JPEG", quality=95, **metadata)
    decoded = decode(data, "image/jpeg", LIMITS)
    # A plain image over the decoder's pixels, not the JPEG file object with its markers.
    assert type(decoded.image) is Image.Image
    assert decoded.image.info == {}
    assert len(decoded.image.getexif()) == 0
    with Image.open(io.BytesIO(data)) as reference:
        assert decoded.image.tobytes() == reference.convert("RGB").tobytes()


@pytest.mark.parametrize(("orientation", "size"), [(1, (6, 4)), (3, (6, 4)), (5, (4, 6)), (8, (4, 6))])
def test_every_orientation_turns_the_size(orientation: int, size: tuple[int, int]) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    data = encoded(Image.new("RGB", (6, 4)), "PNG", exif=exif)
    assert decode(data, "image/png", LIMITS).image.size == size


def test_broken_exif_does_not_refuse_the_photo() -> None:
    # Orientation 6 plus an ImageWidth tag holding text: Pillow's exif_transpose raises on this
    # while re-serialising the EXIF; cameras and editors do write such blocks.
    exif = bytes.fromhex(
        "4578696600004d4d002a000000080002010000020000000800000026011200030000000100060000000000"
        "005465737443616d00"
    )
    decoded = decode(encoded(Image.new("RGB", (8, 4)), "JPEG", exif=exif), "image/jpeg", LIMITS)
    assert decoded.image.size == (4, 8)


def test_png_and_webp_metadata_is_dropped() -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "SecretCam"
    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", "secret")
    image = Image.new("RGB", (8, 8))
    for data, content_type in [
        (encoded(image, "PNG", icc_profile=icc, exif=exif, pnginfo=text), "image/png"),
        (encoded(image, "WEBP", icc_profile=icc, exif=exif, xmp=b"<x/>"), "image/webp"),
    ]:
        with Image.open(io.BytesIO(data)) as check:
            assert "icc_profile" in check.info
        decoded = decode(data, content_type, LIMITS)
        assert decoded.image.info == {}
        assert len(decoded.image.getexif()) == 0


def test_every_buffer_type_decodes_the_same() -> None:
    data = encoded(photo(), "PNG")
    mapped = mmap.mmap(-1, len(data))
    mapped[:] = data
    buffers: list[Any] = [data, bytearray(data), memoryview(data), mapped]
    results = [np.asarray(decode(buffer, "image/png", LIMITS).image) for buffer in buffers]
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])
    mapped.close()  # the decoder holds no view of the buffer once it returns


def test_concurrent_decodes_match_serial_ones() -> None:
    images = [
        (encoded(Image.fromarray(getattr(skdata, name)()), fmt), content_type)
        for name in ("astronaut", "chelsea", "coffee")
        for fmt, content_type in [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")]
    ]
    run: Callable[[tuple[bytes, str]], bytes] = lambda item: decode(*item, LIMITS).image.tobytes()  # noqa: E731
    serial = [run(item) for item in images]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(run, images)) == serial
