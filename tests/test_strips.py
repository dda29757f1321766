"""Strip-parallel resize gives Pillow's own result: equal but for rounding (one level, rarely)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from bgremove_gateway import strips

LANCZOS = Image.Resampling.LANCZOS


@pytest.fixture(scope="module")
def helpers() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def assert_same_but_rounding(split: Image.Image, whole: Image.Image) -> None:
    diff = np.abs(np.asarray(split, dtype=np.int16) - np.asarray(whole, dtype=np.int16))
    assert diff.max() <= 1
    assert np.count_nonzero(diff) <= diff.size // 1000, np.count_nonzero(diff)


def photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    image = Image.fromarray(skdata.chelsea()).resize((width, height), Image.Resampling.BICUBIC)
    return image.convert(mode)


@pytest.mark.parametrize(
    ("source", "size", "gap"),
    [
        ((1226, 816), (320, 320), 3.0),  # 1 MP to the model input: no reduction
        ((2452, 1631), (320, 320), 3.0),  # 4 MP: reduced 2x first
        ((4243, 2828), (320, 320), 3.0),  # 12 MP: reduced 4x first, odd sizes
        ((3001, 1999), (333, 517), 3.0),
        ((1226, 816), (320, 320), None),
    ],
)
@pytest.mark.parametrize("parts", [2, 3])
def test_downscale_matches_a_single_resize(
    helpers: ThreadPoolExecutor,
    source: tuple[int, int],
    size: tuple[int, int],
    gap: float | None,
    parts: int,
) -> None:
    image = photo(*source)
    whole = image.resize(size, LANCZOS, reducing_gap=gap)
    split = strips.resize(image, size, LANCZOS, reducing_gap=gap, helpers=helpers, parts=parts)
    assert split.mode == whole.mode and split.size == whole.size
    assert_same_but_rounding(split, whole)


@pytest.mark.parametrize("size", [(1226, 816), (4243, 2828), (999, 1001)])
def test_mask_upsample_matches_a_single_resize(helpers: ThreadPoolExecutor, size: tuple[int, int]) -> None:
    mask = photo(320, 320, "L")
    whole = mask.resize(size, LANCZOS)
    split = strips.resize(mask, size, LANCZOS, helpers=helpers)
    assert_same_but_rounding(split, whole)


def test_small_outputs_and_no_helpers_take_the_single_call() -> None:
    image = photo(640, 480)

    class Refuses(ThreadPoolExecutor):
        def submit(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
            raise AssertionError("a small resize must not be split")

    with Refuses(1) as refuses:
        tiny = strips.resize(image, (100, 100), LANCZOS, helpers=refuses)
    assert np.array_equal(np.asarray(tiny), np.asarray(image.resize((100, 100), LANCZOS)))
    alone = strips.resize(image, (320, 320), LANCZOS)
    assert np.array_equal(np.asarray(alone), np.asarray(image.resize((320, 320), LANCZOS)))


@pytest.mark.parametrize("parts", [2, 3])
def test_bands_cover_every_row_once_in_order(helpers: ThreadPoolExecutor, parts: int) -> None:
    bands = strips.for_bands((1000, 301), lambda top, bottom: (top, bottom), helpers=helpers, parts=parts)
    assert len(bands) == parts
    assert bands[0][0] == 0 and bands[-1][1] == 301
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bands))


def test_small_images_are_one_band(helpers: ThreadPoolExecutor) -> None:
    assert strips.for_bands((100, 100), lambda t, b: (t, b), helpers=helpers, parts=2) == [(0, 100)]
