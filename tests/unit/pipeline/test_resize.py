"""The model-input resize is Pillow's LANCZOS: the same filter, windows and fixed-point weights,
equal to Pillow's output but for float rounding (one level, in a few values in 100,000)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from skimage import data as skdata

from bgremove_gateway.pipeline import resize

LANCZOS = Image.Resampling.LANCZOS


def photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    image = Image.fromarray(skdata.chelsea()).resize((width, height), Image.Resampling.BICUBIC)
    return image.convert(mode)


def assert_pillows_but_rounding(ours: npt.NDArray[np.uint8], pillow: Image.Image) -> None:
    expected = np.asarray(pillow, dtype=np.int16).reshape(ours.shape)
    diff = np.abs(ours.astype(np.int16) - expected)
    assert diff.max() <= 1
    assert np.count_nonzero(diff) <= max(1, diff.size // 10_000), np.count_nonzero(diff)


@pytest.mark.parametrize(
    ("source", "size", "box"),
    [
        ((1226, 816), (320, 320), None),  # a 1 MP photo to the model input
        ((1225, 816), (320, 320), None),
        ((2452, 1631), (320, 320), None),  # 4 MP without the reducing gap's box filter
        ((3001, 1999), (333, 517), None),  # odd sizes, the two axes scaled unlike
        ((10_000, 3), (320, 320), None),  # one axis shrunk 31x, the other stretched 107x
        ((50, 40), (64, 64), None),  # upscaling: the filter is not stretched
        ((320, 320), (320, 320), None),
        ((613, 408), (320, 320), (0.0, 0.0, 612.5, 407.5)),  # what a reduced photo's box looks like
        ((1226, 816), (200, 300), (100.25, 50.5, 1000.75, 700.0)),
    ],
)
def test_matches_pillow_but_rounding(
    source: tuple[int, int], size: tuple[int, int], box: tuple[float, float, float, float] | None
) -> None:
    image = photo(*source)
    ours = resize.resize(image, size, box)
    assert ours.shape == (size[1], size[0], 3) and ours.dtype == np.uint8
    assert_pillows_but_rounding(ours, image.resize(size, LANCZOS, box=box))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA"])
def test_each_band_resizes_on_its_own(mode: str) -> None:
    planes = [photo(700, 500).getchannel(i % 3).rotate(90 * i) for i in range(len(mode))]
    ours = resize.resize(Image.merge(mode, planes), (320, 320))
    assert ours.shape == (320, 320, len(mode))
    for i, plane in enumerate(planes):
        assert_pillows_but_rounding(ours[..., i], plane.resize((320, 320), LANCZOS))


def test_flat_colour_stays_exact_and_extremes_clip() -> None:
    flat = Image.new("RGB", (1224, 817), (0, 128, 255))
    assert (resize.resize(flat, (320, 320)) == (0, 128, 255)).all()
    # Lanczos overshoots at a hard edge; Pillow clips the overshoot to 0..255 in each pass.
    edge = np.zeros((40, 400, 3), np.uint8)
    edge[:, 200:] = 255
    out = resize.resize(Image.fromarray(edge), (37, 40))
    assert out.min() == 0 and out.max() == 255
    assert_pillows_but_rounding(out, Image.fromarray(edge).resize((37, 40), LANCZOS))


def test_one_pixel() -> None:
    assert (resize.resize(Image.new("RGB", (1, 1), (9, 9, 9)), (320, 320)) == 9).all()


def test_weights_are_cached_per_size() -> None:
    resize.weights.cache_clear()
    resize.row_bands.cache_clear()
    image = photo(1226, 816)
    for _ in range(3):
        resize.resize(image, (320, 320))
    across, down = resize.weights.cache_info(), resize.row_bands.cache_info()
    assert (across.misses, across.hits) == (2, 2)  # horizontal per call; vertical once, in row_bands
    assert (down.misses, down.hits) == (1, 2)


def test_vertical_bands_cover_every_output_row_with_its_whole_window() -> None:
    full = resize.weights(816, 0.0, 816.0, 320).toarray()
    rebuilt = np.zeros_like(full)
    for top, bottom, first, end, band in resize.row_bands(816, 0.0, 816.0, 320):
        rebuilt[top:bottom, first:end] = band.toarray()
    np.testing.assert_array_equal(rebuilt, full)
