"""Pillow's LANCZOS resize (`Image.resize(size, Resampling.LANCZOS, box=...)`), as two sparse
matrix products.

Why not Pillow's own: its resampler is scalar integer code, and the model-input resize was the
largest CPU step of a request (1 MP photo to 320x320: 10.3 ms on one core here, more than the decode,
matte, cut-out and PNG encode together). Each pass is a product with a sparse matrix whose row x
holds Pillow's filter weights for output pixel x, which scipy runs as vector multiply-adds over
whole image rows: 5 ms. Other resamplers were faster still but are not Pillow's filter, and U2-Net-P
masks of sensitive photos moved with them beyond what our parity with rembg allows (README).

The weights are Pillow's exactly: the same window per output pixel (Resample.c `precompute_coeffs`),
quantised to its 22-bit fixed point, and the intermediate image is rounded and clipped to 8 bits
between the passes as Pillow does. The only difference is float32 accumulation in place of integer,
which moves a value by one level when Pillow's sum lies within ~1e-4 of a rounding boundary: a few
values in 100,000 (tests/test_lanczos.py).
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np
import numpy.typing as npt
from scipy import sparse

# Pillow's lanczos_filter is a 3-lobed windowed sinc, and its 8-bit coefficients are fixed point.
SUPPORT = 3.0
PRECISION_BITS = 22
# Input rows per horizontal-pass product: bounds the float32 copy of the input (12 bytes a pixel)
# to a band; 128 rows ran as fast as the whole image at once and faster than 256 (cache).
BAND_ROWS = 128

Box = tuple[float, float, float, float]


@functools.lru_cache(maxsize=128)
def weights(in_size: int, in0: float, in1: float, out_size: int) -> sparse.csr_matrix:
    """[out_size, in_size] matrix of Pillow's LANCZOS weights for resampling input span
    [in0, in1) to out_size pixels. Cached: a service sees the same photo sizes over and over."""
    scale = (in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT * filterscale
    ksize = math.ceil(support) * 2 + 1
    center = in0 + (np.arange(out_size) + 0.5) * scale
    # astype(int) truncates toward zero, as C's (int) does in Pillow.
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size)
    taps = xmin[:, None] + np.arange(ksize)[None, :]
    valid = taps < xmax[:, None]
    x = (taps - center[:, None] + 0.5) * (1.0 / filterscale)
    w = np.where(valid & (x >= -SUPPORT) & (x < SUPPORT), np.sinc(x) * np.sinc(x / SUPPORT), 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=w, where=total != 0.0)
    one = float(1 << PRECISION_BITS)
    fixed = np.trunc(w * one + np.where(w < 0, -0.5, 0.5))
    data = (fixed[valid] / one).astype(np.float32)
    indptr = np.concatenate(([0], np.cumsum(valid.sum(axis=1))))
    return sparse.csr_matrix((data, taps[valid], indptr), shape=(out_size, in_size))


def _to_uint8(acc: npt.NDArray[np.float32], out: npt.NDArray[np.uint8]) -> None:
    """Pillow's clip8 of a fixed-point sum: round half up, then clip to 0..255."""
    np.add(acc, 0.5, out=acc)
    np.clip(acc, 0.0, 255.0, out=acc)
    out[...] = acc.reshape(out.shape)  # the cast truncates: floor, the values being >= 0


def resize(
    pixels: npt.NDArray[np.uint8], size: tuple[int, int], box: Box | None = None
) -> npt.NDArray[np.uint8]:
    """[height, width, channels] uint8 pixels resized to `size` (width, height) with Pillow's
    LANCZOS from the source `box` (left, upper, right, lower; default the whole image): the
    horizontal pass first, then the vertical, as Pillow does."""
    height, width, channels = pixels.shape
    out_w, out_h = size
    x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, float(width), float(height))
    across = weights(width, float(x0), float(x1), out_w)
    down = weights(height, float(y0), float(y1), out_h)
    pixels = np.ascontiguousarray(pixels)
    # Both passes multiply along the first axis, so each pass reads the image transposed: columns
    # of the input as rows of the product, then rows of the intermediate.
    mid = np.empty((out_w, height, channels), np.uint8)
    for top in range(0, height, BAND_ROWS):
        bottom = min(height, top + BAND_ROWS)
        columns = cv2.transpose(pixels[top:bottom]).reshape(width, -1).astype(np.float32)
        _to_uint8(across @ columns, mid[:, top:bottom])
    rows = cv2.transpose(mid).reshape(height, -1).astype(np.float32)
    out = np.empty((out_h, out_w, channels), np.uint8)
    _to_uint8(down @ rows, out)
    return out
