"""The model's input: a 320x320 uint8 RGB array, the reference (rembg) preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from bgremove_gateway.pipeline.preprocess import to_model_input


def test_shape_and_type() -> None:
    tensor = to_model_input(Image.fromarray(skdata.coffee()))
    assert tensor.shape == (320, 320, 3)
    assert tensor.dtype == np.uint8


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_photos_smaller_than_three_times_the_input_match_plain_lanczos(name: str) -> None:
    image = Image.fromarray(getattr(skdata, name)())
    reference = np.asarray(image.convert("RGB").resize((320, 320), Image.Resampling.LANCZOS))
    difference = np.abs(to_model_input(image).astype(int) - reference)
    # Equal but for float rounding (resize.py): one level, in a few values in 100,000.
    assert difference.max() <= 1 and np.count_nonzero(difference) <= 10


@pytest.mark.parametrize("size", [(2452, 1631), (4243, 2828), (1000, 9000)])
def test_large_photos_are_pillows_resize_with_its_reducing_gap(size: tuple[int, int]) -> None:
    image = Image.fromarray(skdata.chelsea()).resize(size, Image.Resampling.BICUBIC)
    reference = np.asarray(image.resize((320, 320), Image.Resampling.LANCZOS, reducing_gap=3.0))
    difference = np.abs(to_model_input(image).astype(int) - reference)
    assert difference.max() <= 1 and np.count_nonzero(difference) <= 10


def test_large_photos_stay_close_to_plain_lanczos() -> None:
    image = Image.fromarray(skdata.astronaut()).resize((3072, 3072), Image.Resampling.BICUBIC)
    reference = np.asarray(image.resize((320, 320), Image.Resampling.LANCZOS)).astype(int)
    difference = np.abs(to_model_input(image).astype(int) - reference)
    assert difference.mean() < 0.5 and difference.max() <= 8


def test_alpha_is_dropped_and_colour_kept() -> None:
    rgba = Image.new("RGBA", (640, 640), (10, 120, 230, 0))
    tensor = to_model_input(rgba)
    assert tensor.shape == (320, 320, 3)
    assert (tensor == [10, 120, 230]).all()


def test_the_whole_image_is_squashed_not_cropped() -> None:
    wide = Image.new("RGB", (10_000, 3), (255, 0, 0))
    wide.paste((0, 0, 255), (5_000, 0, 10_000, 3))
    tensor = to_model_input(wide)
    assert (tensor[:, :150] == [255, 0, 0]).all()
    assert (tensor[:, 170:] == [0, 0, 255]).all()


def test_tiny_image_and_other_sizes() -> None:
    assert (to_model_input(Image.new("RGB", (1, 1), (7, 8, 9))) == [7, 8, 9]).all()
    assert to_model_input(Image.new("RGB", (50, 40)), size=64).shape == (64, 64, 3)
