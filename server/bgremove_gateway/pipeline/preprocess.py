"""Decoded image to the model's input: a square uint8 RGB array, as U2-Net's reference code makes it.

Scaling to [0, 1] and the ImageNet normalisation happen inside the served model, per image.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image

from bgremove_gateway.pipeline import resize
from bgremove_gateway.pipeline.contract import MODEL_INPUT_SIZE

# Shrink by whole factors with a box filter until within this factor of the target, then LANCZOS:
# several times faster on large photos for the same masks (docs/decisions/code-resampling.md).
_REDUCING_GAP = 3.0


def to_model_input(image: Image.Image, size: int = MODEL_INPUT_SIZE) -> npt.NDArray[np.uint8]:
    """uint8 array of shape [size, size, 3], RGB, resized with LANCZOS (aspect not kept, as in
    training). Alpha is dropped before resizing, as rembg does, so transparent pixels' colours count.
    The result is Pillow's `resize(..., LANCZOS, reducing_gap=3.0)` up to float rounding
    (resize.py)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    width, height = rgb.size
    box = (0.0, 0.0, float(width), float(height))
    # What Image.resize does with a reducing gap: shrink by whole factors with a box filter (fast
    # in Pillow), then resample from the fractional box the original covers in the reduced image.
    factor_x = int(width / size / _REDUCING_GAP) or 1
    factor_y = int(height / size / _REDUCING_GAP) or 1
    if factor_x > 1 or factor_y > 1:
        rgb = rgb.reduce((factor_x, factor_y))
        box = (0.0, 0.0, width / factor_x, height / factor_y)
    return resize.resize(rgb, (size, size), box)
