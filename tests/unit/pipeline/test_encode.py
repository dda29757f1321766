"""Encoding: each format decodes back to what compose() made, and nothing of the input's metadata leaks."""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.config import Limits
from bgremove_gateway.pipeline.decode import DecodedImage, decode
from bgremove_gateway.pipeline.encode import encode
from bgremove_gateway.pipeline.postprocess import Cutout, compose
from e2e_helpers import phone_metadata

ALL_FORMATS = [
    pb.OUTPUT_FORMAT_UNSPECIFIED,
    pb.OUTPUT_FORMAT_PNG,
    pb.OUTPUT_FORMAT_WEBP,
    pb.OUTPUT_FORMAT_MASK,
    pb.OUTPUT_FORMAT_JPEG,
]


def cutout_for(fmt: int, **options: Any) -> Cutout:
    source = DecodedImage(Image.fromarray(skdata.astronaut()), "PNG")
    alpha = np.random.default_rng(5).integers(0, 256, (512, 512), dtype=np.uint8)
    alpha[:100] = 0
    alpha[-100:] = 255
    return compose(source, Image.fromarray(alpha), pb.Options(format=fmt, **options))  # type: ignore[arg-type]


def reopen(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("fmt", [pb.OUTPUT_FORMAT_UNSPECIFIED, pb.OUTPUT_FORMAT_PNG])
@pytest.mark.parametrize(
    "options", [{}, {"crop": True}, {"max_output_side": 300}], ids=["whole", "crop", "fit"]
)
def test_png_is_a_lossless_rgba_cutout(fmt: pb.OutputFormat, options: dict[str, Any]) -> None:
    cutout = cutout_for(fmt, **options)
    encoded = encode(cutout, fmt)
    assert encoded.content_type == "image/png"
    back = reopen(encoded.data)
    assert (back.format, back.mode) == ("PNG", "RGBA")
    np.testing.assert_array_equal(np.asarray(back), np.asarray(cutout.image))


def test_webp_is_a_lossless_rgba_cutout() -> None:
    cutout = cutout_for(pb.OUTPUT_FORMAT_WEBP)
    encoded = encode(cutout, pb.OUTPUT_FORMAT_WEBP)
    assert encoded.content_type == "image/webp"
    back = reopen(encoded.data)
    assert (back.format, back.mode) == ("WEBP", "RGBA")
    out, expected = np.asarray(back), np.asarray(cutout.image)
    np.testing.assert_array_equal(out[..., 3], expected[..., 3])
    visible = expected[..., 3] > 0
    np.testing.assert_array_equal(out[visible], expected[visible])


def test_mask_is_a_greyscale_png() -> None:
    cutout = cutout_for(pb.OUTPUT_FORMAT_MASK)
    encoded = encode(cutout, pb.OUTPUT_FORMAT_MASK)
    assert encoded.content_type == "image/png"
    back = reopen(encoded.data)
    assert (back.format, back.mode) == ("PNG", "L")
    np.testing.assert_array_equal(np.asarray(back), np.asarray(cutout.image))


def test_jpeg_is_quality_90_rgb() -> None:
    cutout = cutout_for(pb.OUTPUT_FORMAT_JPEG, bg_color=pb.Color(r=0, g=128, b=0))
    encoded = encode(cutout, pb.OUTPUT_FORMAT_JPEG)
    assert encoded.content_type == "image/jpeg"
    back = reopen(encoded.data)
    assert (back.format, back.mode, back.size) == ("JPEG", "RGB", (512, 512))
    reference = io.BytesIO()
    cutout.image.save(reference, "JPEG", quality=90)
    assert isinstance(back, JpegImagePlugin.JpegImageFile)
    assert back.quantization == reopen(reference.getvalue()).quantization  # type: ignore[attr-defined]
    # Where the matte is opaque (the bottom rows) the JPEG shows the photo itself.
    difference = np.abs(np.asarray(back)[-90:].astype(int) - np.asarray(cutout.image)[-90:])
    assert difference.mean() < 3


def test_unspecified_is_png() -> None:
    cutout = cutout_for(pb.OUTPUT_FORMAT_PNG)
    assert encode(cutout, pb.OUTPUT_FORMAT_UNSPECIFIED) == encode(cutout, pb.OUTPUT_FORMAT_PNG)


def test_a_cutout_made_for_another_format_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="OUTPUT_FORMAT_JPEG needs a RGB image, got RGBA"):
        encode(cutout_for(pb.OUTPUT_FORMAT_PNG), pb.OUTPUT_FORMAT_JPEG)
    with pytest.raises(ValueError, match="unknown output format 42"):
        encode(cutout_for(pb.OUTPUT_FORMAT_PNG), 42)  # type: ignore[arg-type]


def photo_with_metadata() -> bytes:
    """A 60x40 JPEG with EXIF orientation 6 (display rotated 90 degrees clockwise), camera and GPS
    tags, an ICC profile and XMP: everything a phone puts in a photo."""
    out = io.BytesIO()
    Image.new("RGB", (60, 40), "white").save(out, "JPEG", **phone_metadata())
    data = out.getvalue()
    assert b"SecretCam" in data and b"secret-xmp" in data and b"acsp" in data  # ICC header signature
    return data


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_no_exif_xmp_or_icc_from_the_input_reaches_the_output(fmt: pb.OutputFormat) -> None:
    decoded = decode(photo_with_metadata(), "image/jpeg", Limits())
    assert decoded.image.size == (40, 60)  # orientation applied
    cutout = compose(decoded, Image.new("L", (40, 60), 255), pb.Options(format=fmt))
    data = encode(cutout, fmt).data
    back = reopen(data)
    assert back.size == (40, 60)
    assert not {"exif", "xmp", "XML:com.adobe.xmp", "icc_profile"} & back.info.keys()
    assert len(back.getexif()) == 0
    for secret in (b"SecretCam", b"secret-xmp", b"acsp", b"Exif\x00\x00"):
        assert secret not in data
    # Nor any container for them: PNG eXIf/iCCP/text chunks, WebP EXIF/ICCP/XMP chunks, JPEG APP1/APP2.
    for marker in (
        b"eXIf",
        b"iCCP",
        b"iTXt",
        b"tEXt",
        b"zTXt",
        b"EXIF",
        b"ICCP",
        b"XMP ",
        b"\xff\xe1",
        b"\xff\xe2",
    ):
        assert marker not in data


def test_zip_holds_the_colours_as_jpeg_and_the_matte_as_png() -> None:
    cutout = cutout_for(pb.OUTPUT_FORMAT_ZIP, crop=True)
    encoded = encode(cutout, pb.OUTPUT_FORMAT_ZIP)
    assert encoded.content_type == "application/zip"
    with zipfile.ZipFile(io.BytesIO(encoded.data)) as archive:
        assert archive.namelist() == ["color.jpg", "alpha.png"]
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
        color, alpha = reopen(archive.read("color.jpg")), reopen(archive.read("alpha.png"))
    rgba = np.asarray(cutout.image)
    assert (color.format, color.mode, color.size) == ("JPEG", "RGB", cutout.image.size)
    assert (alpha.format, alpha.mode, alpha.size) == ("PNG", "L", cutout.image.size)
    np.testing.assert_array_equal(np.asarray(alpha), rgba[..., 3])  # the matte is exact
    opaque = rgba[..., 3] == 255
    error = np.abs(np.asarray(color).astype(int) - rgba[..., :3].astype(int))[opaque]
    assert error.mean() < 3, "color.jpg is the subject's colours at quality 90"


def test_zip_is_the_same_bytes_for_the_same_result() -> None:
    # A fixed member timestamp: caches and checksums see equal results as equal.
    cutout = cutout_for(pb.OUTPUT_FORMAT_ZIP)
    assert encode(cutout, pb.OUTPUT_FORMAT_ZIP).data == encode(cutout, pb.OUTPUT_FORMAT_ZIP).data
