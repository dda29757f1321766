"""remove.bg's image options in postprocess: roi, crop margins, scale, position, output pixel cap,
colour and image backgrounds, and the foreground box the header reports after all of them."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.errors import ServiceError
from bgremove_gateway.pipeline.decode import DecodedImage
from bgremove_gateway.pipeline.postprocess import compose, cover, fitted_size

W, H = 200, 120
SUBJECT = (50, 30, 110, 90)  # left, top, right, bottom of the opaque block: 60 x 60


def photo() -> DecodedImage:
    pixels = np.ascontiguousarray(skdata.astronaut()[:H, :W])
    return DecodedImage(image=Image.fromarray(pixels), source_format="PNG")


def alpha_block(box: tuple[int, int, int, int] = SUBJECT, size: tuple[int, int] = (W, H)) -> Image.Image:
    alpha = Image.new("L", size, 0)
    alpha.paste(255, box)
    return alpha


def px(value: int) -> pb.Length:
    return pb.Length(px=value)


def pct(value: float) -> pb.Length:
    return pb.Length(percent=value)


def foreground_of(image: Image.Image) -> tuple[int, int, int, int] | None:
    """x, y, w, h of alpha >= 128 in an RGBA or L result, measured on the pixels."""
    alpha = np.asarray(image.getchannel("A") if image.mode == "RGBA" else image)
    ys, xs = np.nonzero(alpha >= 128)
    if xs.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


# --- roi ----------------------------------------------------------------------------------------


def test_roi_keeps_only_the_subject_inside_it() -> None:
    roi = pb.Region(x1=px(0), y1=px(0), x2=px(80), y2=pct(100))  # cuts the block at x = 80
    cutout = compose(photo(), alpha_block(), pb.Options(roi=roi))
    alpha = np.asarray(cutout.image)[..., 3]
    assert (alpha[:, 80:] == 0).all(), "nothing outside the region survives"
    assert (alpha[30:90, 50:80] == 255).all(), "the subject inside it is kept"
    assert cutout.bbox == (50, 30, 30, 60)


def test_roi_in_percent_of_width_and_height_and_unset_corners_are_the_images() -> None:
    roi = pb.Region(x1=pct(30), y1=pct(50))  # from (60, 60) to the bottom-right corner
    cutout = compose(photo(), alpha_block(), pb.Options(roi=roi))
    assert cutout.bbox == (60, 60, 50, 30)
    assert cutout.image.size == (W, H)


def test_roi_is_clamped_to_the_image() -> None:
    roi = pb.Region(x1=px(100), y1=px(0), x2=px(5000), y2=px(5000))
    assert compose(photo(), alpha_block(), pb.Options(roi=roi)).bbox == (100, 30, 10, 60)


@pytest.mark.parametrize(
    "roi",
    [
        pb.Region(x1=px(100), x2=px(100)),  # empty
        pb.Region(x1=pct(60), x2=pct(40)),  # reversed
        pb.Region(x1=px(W + 10)),  # starts right of the image: empty once clamped
        pb.Region(y1=px(10), y2=px(5)),
    ],
)
def test_an_empty_roi_is_refused_naming_the_field_and_the_image_size(roi: pb.Region) -> None:
    with pytest.raises(ServiceError) as caught:
        compose(photo(), alpha_block(), pb.Options(roi=roi))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.violations[0].field == "options.roi"
    assert f"{W}x{H} image" in caught.value.message


def test_roi_outside_the_subject_leaves_no_subject() -> None:
    roi = pb.Region(x1=px(0), y1=px(0), x2=px(40), y2=px(20))
    cutout = compose(photo(), alpha_block(), pb.Options(roi=roi, crop=True))
    assert cutout.bbox is None and cutout.image.size == (W, H)
    assert (np.asarray(cutout.image)[..., 3] == 0).all()


# --- crop_margins -------------------------------------------------------------------------------


def test_crop_margins_in_percent_of_the_subject() -> None:
    decoded = photo()
    margins = pb.Margins(top=pct(10), right=pct(10), bottom=pct(10), left=pct(10))  # 6 px of 60
    cutout = compose(decoded, alpha_block(), pb.Options(crop=True, crop_margins=margins))
    assert cutout.image.size == (72, 72)
    assert cutout.bbox == (6, 6, 60, 60)
    np.testing.assert_array_equal(
        np.asarray(cutout.image)[6:66, 6:66, :3], np.asarray(decoded.image)[30:90, 50:110]
    )


def test_crop_margins_per_side_each_capped_at_half_the_subject() -> None:
    # left 100 px on a 60 px wide subject: 30; top 5 px; right 20% = 12; bottom 0 (unset).
    margins = pb.Margins(top=px(5), right=pct(20), left=px(100))
    cutout = compose(photo(), alpha_block(), pb.Options(crop=True, crop_margins=margins))
    assert cutout.image.size == (30 + 60 + 12, 5 + 60)
    assert cutout.bbox == (30, 5, 60, 60)


def test_crop_margins_win_over_crop_margin_and_stop_at_the_image_edge() -> None:
    margins = pb.Margins(top=pct(50), right=pct(50), bottom=pct(50), left=pct(50))  # 30 px each
    options = pb.Options(crop=True, crop_margin=1, crop_margins=margins)
    cutout = compose(photo(), alpha_block(), options)
    # 50 - 30 = 20 .. 110 + 30 = 140 wide; 30 - 30 = 0 .. 90 + 30 = 120 (the image's bottom) high
    assert cutout.image.size == (120, 120)
    assert cutout.bbox == (30, 30, 60, 60)


def test_crop_margins_over_half_the_subject_are_capped_there() -> None:
    huge = pb.Length(percent=400)
    margins = pb.Margins(top=huge, right=pb.Length(px=2**32 - 1), bottom=huge, left=huge)
    cutout = compose(photo(), alpha_block(box=(80, 40, 100, 60)), pb.Options(crop=True, crop_margins=margins))
    assert cutout.image.size == (40, 40) and cutout.bbox == (10, 10, 20, 20)


def test_crop_margins_without_crop_do_nothing() -> None:
    options = pb.Options(crop_margins=pb.Margins(top=px(5)))
    assert compose(photo(), alpha_block(), options).image.size == (W, H)


def test_crop_margins_are_ignored_without_a_subject() -> None:
    margins = pb.Margins(top=px(5))
    cutout = compose(photo(), Image.new("L", (W, H), 0), pb.Options(crop=True, crop_margins=margins))
    assert cutout.image.size == (W, H) and cutout.bbox is None


# --- scale and position -------------------------------------------------------------------------


def test_scale_100_fills_the_canvas_and_centres_the_subject() -> None:
    cutout = compose(photo(), alpha_block(), pb.Options(scale_percent=100))
    assert cutout.image.size == (W, H), "the canvas keeps the output size"
    # 60x60 scaled by min(200/60, 120/60) = 2: 120x120, centred horizontally.
    assert cutout.bbox == foreground_of(cutout.image)
    x, y, w, h = cutout.bbox or (0, 0, 0, 0)
    assert abs(x - 40) <= 1 and y == 0 and abs(w - 120) <= 1 and h == 120


def test_scale_50_is_half_the_canvas() -> None:
    cutout = compose(photo(), alpha_block(), pb.Options(scale_percent=50))
    # factor 0.5 x 2 = 1: the subject keeps its size and its exact colours, centred.
    assert cutout.bbox == (70, 30, 60, 60)
    np.testing.assert_array_equal(
        np.asarray(cutout.image)[30:90, 70:130, :3], np.asarray(photo().image)[30:90, 50:110]
    )


@pytest.mark.parametrize(
    ("position", "expected_xy"),
    [
        (pb.Position(placement=pb.PLACEMENT_PERCENT, x_percent=0, y_percent=100), (0, 60)),
        (pb.Position(placement=pb.PLACEMENT_PERCENT, x_percent=100, y_percent=0), (140, 0)),
        (pb.Position(placement=pb.PLACEMENT_PERCENT, x_percent=25, y_percent=50), (35, 30)),
        (pb.Position(placement=pb.PLACEMENT_CENTER), (70, 30)),
        (pb.Position(placement=pb.PLACEMENT_ORIGINAL), (50, 30)),
    ],
)
def test_position_moves_the_subject_within_the_free_space(
    position: pb.Position, expected_xy: tuple[int, int]
) -> None:
    decoded = photo()
    cutout = compose(decoded, alpha_block(), pb.Options(position=position))
    x, y = expected_xy
    assert cutout.bbox == (x, y, 60, 60)
    out = np.asarray(cutout.image)
    np.testing.assert_array_equal(out[y : y + 60, x : x + 60, :3], np.asarray(decoded.image)[30:90, 50:110])
    assert out[..., 3].sum() == 255 * 60 * 60, "nothing else is visible"


def test_scale_with_original_position_keeps_the_subjects_centre() -> None:
    options = pb.Options(scale_percent=25, position=pb.Position(placement=pb.PLACEMENT_ORIGINAL))
    cutout = compose(photo(), alpha_block(), options)
    # 60 x 0.25 x 2 = 30 px, centred on the block's centre (80, 60).
    assert cutout.bbox == (65, 45, 30, 30)


def test_scale_and_position_apply_to_the_cropped_canvas() -> None:
    margins = pb.Margins(top=px(10), right=px(10), bottom=px(10), left=px(10))
    options = pb.Options(
        crop=True,
        crop_margins=margins,
        scale_percent=50,
        position=pb.Position(placement=pb.PLACEMENT_PERCENT, x_percent=0, y_percent=0),
    )
    cutout = compose(photo(), alpha_block(), options)
    assert cutout.image.size == (80, 80)
    assert cutout.bbox == (0, 0, 40, 40) == foreground_of(cutout.image)


@pytest.mark.parametrize(
    "options",
    [
        pb.Options(scale_percent=37, crop=True),
        pb.Options(scale_percent=90, position=pb.Position(placement=pb.PLACEMENT_PERCENT, x_percent=70)),
        pb.Options(
            roi=pb.Region(x1=pct(10), x2=pct(45)),
            crop=True,
            crop_margins=pb.Margins(left=pct(20), bottom=px(7)),
            scale_percent=64,
        ),
        pb.Options(format=pb.OUTPUT_FORMAT_MASK, scale_percent=13, crop=True),
        pb.Options(format=pb.OUTPUT_FORMAT_WEBP, position=pb.Position(placement=pb.PLACEMENT_CENTER)),
    ],
)
def test_the_reported_box_is_where_the_subject_is(options: pb.Options) -> None:
    cutout = compose(photo(), alpha_block(box=(33, 17, 101, 77)), options)
    assert cutout.bbox is not None
    assert cutout.bbox == foreground_of(cutout.image)


def test_position_without_a_subject_changes_nothing() -> None:
    options = pb.Options(scale_percent=50)
    cutout = compose(photo(), Image.new("L", (W, H), 0), options)
    assert cutout.bbox is None and cutout.image.size == (W, H)


# --- max_output_pixels --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "max_side", "max_pixels", "expected"),
    [
        ((200, 120), 0, 0, (200, 120)),
        ((200, 120), 0, 24_000, (200, 120)),  # exactly at the cap
        ((200, 120), 0, 50_000, (200, 120)),  # never up
        ((200, 120), 0, 6_000, (100, 60)),
        ((200, 120), 50, 6_000, (50, 30)),  # the side is the tighter limit
        ((200, 120), 150, 1_500, (50, 30)),  # the pixel cap is
        ((4000, 3000), 0, 250_000, (577, 433)),  # remove.bg's preview
        ((5000, 1), 0, 10, (10, 1)),
    ],
)
def test_fitted_size(
    size: tuple[int, int], max_side: int, max_pixels: int, expected: tuple[int, int]
) -> None:
    fitted = fitted_size(size, max_side, max_pixels)
    assert fitted == expected
    assert max_pixels == 0 or fitted[0] * fitted[1] <= max(max_pixels, 1)


def test_max_output_pixels_downscales_the_result_and_its_box() -> None:
    cutout = compose(photo(), alpha_block(), pb.Options(max_output_pixels=6_000))
    assert cutout.image.size == (100, 60)
    assert cutout.bbox == (25, 15, 30, 30)


# --- backgrounds --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [pb.OUTPUT_FORMAT_PNG, pb.OUTPUT_FORMAT_WEBP])
def test_bg_color_makes_png_and_webp_opaque_on_it(fmt: int) -> None:
    decoded = photo()
    options = pb.Options(format=fmt, bg_color=pb.Color(r=0, g=0, b=255))  # type: ignore[arg-type]
    cutout = compose(decoded, alpha_block(), options)
    out = np.asarray(cutout.image)
    assert cutout.image.mode == "RGBA" and (out[..., 3] == 255).all()
    assert (out[:30, :, :3] == [0, 0, 255]).all()
    np.testing.assert_array_equal(out[30:90, 50:110, :3], np.asarray(decoded.image)[30:90, 50:110])
    assert cutout.bbox == (50, 30, 60, 60)


def test_mask_ignores_bg_color_as_before() -> None:
    options = pb.Options(format=pb.OUTPUT_FORMAT_MASK, bg_color=pb.Color(r=9))
    assert np.array_equal(
        np.asarray(compose(photo(), alpha_block(), options).image), np.asarray(alpha_block())
    )


def halves(size: tuple[int, int]) -> Image.Image:
    """Red left half, blue right half."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return image


@pytest.mark.parametrize("fmt", [pb.OUTPUT_FORMAT_PNG, pb.OUTPUT_FORMAT_JPEG, pb.OUTPUT_FORMAT_WEBP])
def test_bg_image_covers_the_canvas_and_the_subject_goes_on_it(fmt: int) -> None:
    decoded = photo()
    options = pb.Options(format=fmt, bg_color=pb.Color(g=255))  # type: ignore[arg-type]
    cutout = compose(decoded, alpha_block(), options, halves((50, 50)))
    out = np.asarray(cutout.image.convert("RGB"))
    assert (np.asarray(cutout.image.convert("RGBA"))[..., 3] == 255).all(), "opaque"
    # 50x50 scaled by max(200/50, 120/50) = 4 to 200x200, centre-cropped to 200x120: halves at x = 100.
    # (LANCZOS rings for a few pixels either side of the seam.)
    for rows in (out[:30], out[90:]):
        assert (rows[:, :85] == [255, 0, 0]).all() and (rows[:, 115:] == [0, 0, 255]).all()
    assert (out[:30] != [0, 255, 0]).any(axis=-1).all(), "the image takes precedence over bg_color"
    np.testing.assert_array_equal(out[30:90, 50:110], np.asarray(decoded.image)[30:90, 50:110])


def test_bg_image_fits_the_final_canvas_after_crop() -> None:
    cutout = compose(photo(), alpha_block(), pb.Options(crop=True), halves((10, 20)))
    assert cutout.image.size == (60, 60)
    out = np.asarray(cutout.image)
    assert (out[..., 3] == 255).all()


@pytest.mark.parametrize(
    ("size", "target"), [((50, 50), (200, 120)), ((300, 100), (64, 64)), ((7, 7), (7, 7))]
)
def test_cover_fills_the_target_exactly(size: tuple[int, int], target: tuple[int, int]) -> None:
    assert cover(halves(size), target).size == target


def test_zip_renders_the_cut_out() -> None:
    png = compose(photo(), alpha_block(), pb.Options(format=pb.OUTPUT_FORMAT_PNG))
    zipped = compose(photo(), alpha_block(), pb.Options(format=pb.OUTPUT_FORMAT_ZIP))
    assert np.array_equal(np.asarray(png.image), np.asarray(zipped.image))
    assert zipped.bbox == png.bbox


def test_default_options_are_untouched_by_the_new_ones() -> None:
    # Every new option at its zero value gives the very same pixels as before they existed.
    plain = compose(photo(), alpha_block(), pb.Options(crop=True, crop_margin=4))
    explicit = pb.Options(
        crop=True,
        crop_margin=4,
        scale_percent=0,
        max_output_pixels=0,
        position=pb.Position(placement=pb.PLACEMENT_UNSPECIFIED),
    )
    again = compose(photo(), alpha_block(), explicit)
    assert np.array_equal(np.asarray(plain.image), np.asarray(again.image)) and plain.bbox == again.bbox
    assert again.pixels is not None, "the PNG encoder still reads the cut-out in place"
