"""From the model's mask to the final picture: matte, colours, bbox, crop, downscale, JPEG background."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.pipeline.decode import DecodedImage
from bgremove_gateway.pipeline.postprocess import compose, mask_to_alpha

W, H = 200, 120
SUBJECT = (50, 30, 110, 90)  # left, top, right, bottom of the opaque block in `alpha_block`


def photo(size: tuple[int, int] = (W, H)) -> DecodedImage:
    pixels = skdata.astronaut()[: size[1], : size[0]]
    return DecodedImage(image=Image.fromarray(np.ascontiguousarray(pixels)), source_format="PNG")


def alpha_block(size: tuple[int, int] = (W, H), box: tuple[int, int, int, int] = SUBJECT) -> Image.Image:
    alpha = Image.new("L", size, 0)
    alpha.paste(255, box)
    return alpha


def array(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_mask_to_alpha_resizes_to_the_input_size() -> None:
    mask = np.zeros((320, 320), dtype=np.uint8)
    mask[:, 160:] = 255
    alpha = mask_to_alpha(mask, (1000, 250))
    assert (alpha.mode, alpha.size) == ("L", (1000, 250))
    values = array(alpha)
    assert (values[:, :480] == 0).all() and (values[:, 520:] == 255).all()


@pytest.mark.parametrize("side", [64, 160, 1024])
def test_mask_to_alpha_takes_any_model_size(side: int) -> None:
    mask = np.zeros((side, side), dtype=np.uint8)
    mask[:, side // 2 :] = 255
    values = array(mask_to_alpha(mask, (1000, 250)))
    assert values.shape == (250, 1000)
    assert (values[:, :480] == 0).all() and (values[:, 520:] == 255).all()


@pytest.mark.parametrize("size", [(517, 211), (1226, 816), (4000, 3000)])
def test_mask_to_alpha_keeps_an_edge_where_it_is(size: tuple[int, int]) -> None:
    # A vertical edge halfway across the mask (and a horizontal one halfway down) must stay
    # halfway across the matte: a half-pixel slip of the upsample's grid would move the cut-out's
    # outline by up to 6 pixels on a 4000-pixel-wide photo.
    width, height = size
    mask = np.zeros((320, 320), dtype=np.uint8)
    mask[:, 160:] = 255
    row = array(mask_to_alpha(mask, size))[height // 2].astype(int)
    assert abs(int(np.argmax(row >= 128)) - width / 2) <= 1
    column = array(mask_to_alpha(mask.T.copy(), size))[:, width // 2].astype(int)
    assert abs(int(np.argmax(column >= 128)) - height / 2) <= 1
    # Away from the edge the matte is exactly transparent or opaque, with no ringing.
    margin = 3 * width // 320
    assert (row[: width // 2 - margin] == 0).all() and (row[width // 2 + margin :] == 255).all()


def test_mask_to_alpha_stays_within_a_few_levels_of_rembgs_lanczos() -> None:
    # A disc whose rim ramps over 1.5 mask pixels, as sharp as U2-Net's edges get: the matte rembg
    # makes (LANCZOS) and ours differ by a few levels on the rim and nowhere else. (BILINEAR would
    # be 25 levels off there, NEAREST 119.)
    yy, xx = np.mgrid[:320, :320]
    radius = np.hypot(yy - 170, xx - 160)
    mask = (255 * np.clip((100 - radius) / 1.5 + 0.5, 0, 1)).round().astype(np.uint8)
    size = (1224, 817)
    ours = array(mask_to_alpha(mask, size)).astype(int)
    rembg = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.LANCZOS)).astype(int)
    diff = np.abs(ours - rembg)
    assert diff.mean() < 0.1 and diff.max() <= 12
    assert ((ours >= 128) == (rembg >= 128)).mean() > 0.999


@pytest.mark.parametrize(
    "mask",
    [np.zeros((320, 320), np.float32), np.zeros((1, 320, 320), np.uint8), np.zeros((320, 160), np.uint8)],
)
def test_mask_to_alpha_refuses_a_wrong_mask(mask: np.ndarray) -> None:
    with pytest.raises(ValueError, match="square uint8 mask"):
        mask_to_alpha(mask, (10, 10))


def test_cutout_keeps_opaque_colours_exactly_and_clears_transparent_ones() -> None:
    decoded = photo()
    alpha_values = np.random.default_rng(2).integers(0, 256, (H, W), dtype=np.uint8)
    alpha_values[:40] = 255
    alpha_values[-20:] = 0
    cutout = compose(decoded, Image.fromarray(alpha_values), pb.Options(format=pb.OUTPUT_FORMAT_PNG))
    assert (cutout.image.mode, cutout.image.size, cutout.input_size) == ("RGBA", (W, H), (W, H))
    out, src = array(cutout.image), array(decoded.image)
    np.testing.assert_array_equal(out[..., 3], alpha_values)
    visible = alpha_values > 0
    np.testing.assert_array_equal(out[..., :3][visible], src[visible])  # straight alpha, untouched colour
    assert (out[..., :3][~visible] == 0).all()  # the removed background is not in the file


@pytest.mark.parametrize(
    ("options", "has_pixels"),
    [
        (pb.Options(format=pb.OUTPUT_FORMAT_PNG), True),
        (pb.Options(format=pb.OUTPUT_FORMAT_WEBP, crop=True), True),
        (pb.Options(format=pb.OUTPUT_FORMAT_PNG, max_output_side=100), False),
        (pb.Options(format=pb.OUTPUT_FORMAT_MASK), False),
        (pb.Options(format=pb.OUTPUT_FORMAT_JPEG), False),
    ],
)
def test_pixels_for_the_encoder_are_exactly_the_cutouts(options: pb.Options, has_pixels: bool) -> None:
    cutout = compose(photo(), alpha_block(), options)
    if not has_pixels:
        assert cutout.pixels is None
        return
    assert cutout.pixels is not None and cutout.pixels.dtype == np.uint8
    np.testing.assert_array_equal(cutout.pixels, array(cutout.image))


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_cutout_of_any_source_mode_has_its_colours_and_the_combined_alpha(mode: str) -> None:
    size = (640, 480)
    rng = np.random.default_rng(3)
    source = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)).convert(mode)
    matte = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    matte[::7] = 0
    cutout = compose(DecodedImage(source, "PNG"), Image.fromarray(matte), pb.Options())
    out, src = array(cutout.image), array(source)
    alpha = matte.astype(int) if mode == "RGB" else (matte.astype(int) * src[..., 3] + 127) // 255
    assert np.abs(out[..., 3].astype(int) - alpha).max() <= 1  # Pillow's multiply rounds its own way
    visible = out[..., 3] > 0
    np.testing.assert_array_equal(out[..., :3][visible], src[..., :3][visible])
    assert (out[..., :3][~visible] == 0).all()
    ys, xs = np.nonzero(out[..., 3] >= 128)
    assert cutout.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


def test_source_alpha_is_multiplied_with_the_matte() -> None:
    source = Image.new("RGBA", (4, 1), (10, 20, 30, 255))
    source.putalpha(Image.frombytes("L", (4, 1), bytes([255, 128, 0, 128])))
    matte = Image.frombytes("L", (4, 1), bytes([255, 255, 255, 128]))
    cutout = compose(DecodedImage(source, "PNG"), matte, pb.Options())
    assert array(cutout.image)[0, :, 3].tolist() == [255, 128, 0, 64]
    assert array(source)[0, :, 3].tolist() == [255, 128, 0, 128]  # the decoded image is not modified


def test_bbox_uses_alpha_at_least_half() -> None:
    alpha = Image.new("L", (W, H), 127)  # just below half everywhere: background
    alpha.paste(128, (20, 10, 21, 11))
    alpha.paste(200, (150, 100, 160, 105))
    assert compose(photo(), alpha, pb.Options()).bbox == (20, 10, 140, 95)


def test_no_subject_gives_no_bbox_and_crop_keeps_the_whole_image() -> None:
    cutout = compose(photo(), Image.new("L", (W, H), 100), pb.Options(crop=True, crop_margin=5))
    assert cutout.bbox is None
    assert cutout.image.size == (W, H)


def test_crop_to_the_subject_with_a_margin() -> None:
    decoded = photo()
    cutout = compose(decoded, alpha_block(), pb.Options(crop=True, crop_margin=10))
    assert cutout.image.size == (60 + 20, 60 + 20)
    assert cutout.bbox == (10, 10, 60, 60)
    assert cutout.input_size == (W, H)
    np.testing.assert_array_equal(array(cutout.image)[10:70, 10:70, :3], array(decoded.image)[30:90, 50:110])


def test_crop_margin_is_clamped_to_the_image() -> None:
    cutout = compose(photo(), alpha_block(box=(0, 100, 30, H)), pb.Options(crop=True, crop_margin=50))
    assert cutout.image.size == (80, 70)  # 0..80 wide, 50..120 high
    assert cutout.bbox == (0, 50, 30, 20)


def test_crop_without_margin_is_the_bbox() -> None:
    cutout = compose(photo(), alpha_block(), pb.Options(crop=True))
    assert cutout.image.size == (60, 60)
    assert cutout.bbox == (0, 0, 60, 60)


def test_max_output_side_downscales_keeping_the_aspect_and_scales_the_bbox() -> None:
    cutout = compose(photo(), alpha_block(), pb.Options(max_output_side=100))
    assert cutout.image.size == (100, 60)
    assert cutout.bbox == (25, 15, 30, 30)
    assert cutout.input_size == (W, H)


def test_max_output_side_bbox_still_encloses_an_unevenly_scaled_subject() -> None:
    cutout = compose(photo(), alpha_block(box=(33, 17, 101, 77)), pb.Options(max_output_side=70))
    assert cutout.image.size == (70, 42)
    x, y, w, h = cutout.bbox or (0, 0, 0, 0)
    # 33..101 x 0.35 = 11.55..35.35, 17..77 x 0.35 = 5.95..26.95: the box rounds outwards.
    assert (x, y, x + w, y + h) == (11, 5, 36, 27)


def test_max_output_side_never_upscales() -> None:
    for side in (0, W, 5000):
        assert compose(photo(), alpha_block(), pb.Options(max_output_side=side)).image.size == (W, H)


def test_max_output_side_applies_after_crop() -> None:
    cutout = compose(photo(), alpha_block(), pb.Options(crop=True, crop_margin=20, max_output_side=50))
    assert cutout.image.size == (50, 50)
    assert cutout.bbox == (10, 10, 30, 30)


def test_downscaled_cutout_does_not_bleed_background_into_edges() -> None:
    # Pillow resizes RGBA with premultiplied alpha: a transparent red background must not tint
    # the edge of a white subject.
    source = Image.new("RGB", (100, 100), (255, 0, 0))
    source.paste((255, 255, 255), (25, 25, 75, 75))
    alpha = alpha_block((100, 100), (25, 25, 75, 75))
    cutout = compose(DecodedImage(source, "PNG"), alpha, pb.Options(max_output_side=30))
    out = array(cutout.image)
    visible = out[..., 3] > 0
    assert (out[..., 0][visible] == 255).all()
    assert out[..., 1][visible].min() >= 250


def test_mask_format_returns_the_matte() -> None:
    alpha = alpha_block()
    cutout = compose(photo(), alpha, pb.Options(format=pb.OUTPUT_FORMAT_MASK, crop=True))
    assert cutout.image.mode == "L"
    np.testing.assert_array_equal(array(cutout.image), array(alpha)[30:90, 50:110])


def test_jpeg_composites_on_white_by_default() -> None:
    decoded = photo()
    cutout = compose(decoded, alpha_block(), pb.Options(format=pb.OUTPUT_FORMAT_JPEG))
    out = array(cutout.image)
    assert cutout.image.mode == "RGB"
    assert (out[:30] == 255).all()
    np.testing.assert_array_equal(out[30:90, 50:110], array(decoded.image)[30:90, 50:110])


def test_jpeg_composites_on_the_requested_colour_black_included() -> None:
    for color in [pb.Color(r=0, g=0, b=0), pb.Color(r=10, g=200, b=30)]:
        options = pb.Options(format=pb.OUTPUT_FORMAT_JPEG, bg_color=color)
        out = array(compose(photo(), alpha_block(), options).image)
        assert out[0, 0].tolist() == [color.r, color.g, color.b]


def test_jpeg_blends_semi_transparent_edges() -> None:
    source = Image.new("RGB", (2, 1), (200, 100, 0))
    alpha = Image.frombytes("L", (2, 1), bytes([255, 128]))
    options = pb.Options(format=pb.OUTPUT_FORMAT_JPEG, bg_color=pb.Color(r=0, g=0, b=200))
    out = array(compose(DecodedImage(source, "JPEG"), alpha, options).image)
    assert out[0, 0].tolist() == [200, 100, 0]
    assert np.abs(out[0, 1].astype(int) - [100, 50, 100]).max() <= 1


def test_rgba_source_composited_for_jpeg_uses_its_alpha_too() -> None:
    source = Image.new("RGBA", (2, 1), (200, 100, 0, 0))
    options = pb.Options(format=pb.OUTPUT_FORMAT_JPEG)
    out = array(compose(DecodedImage(source, "PNG"), Image.new("L", (2, 1), 255), options).image)
    assert (out == 255).all()


def test_alpha_of_the_wrong_size_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="alpha must be"):
        compose(photo(), Image.new("L", (W + 1, H)), pb.Options())
