"""Pillow's LANCZOS resize (`Image.resize(size, Resampling.LANCZOS, box=...)`), as two sparse
matrix products.

Why not Pillow's own: its resampler is scalar integer code, and the model-input resize was the
largest CPU step of a request. Each pass is a product with a sparse matrix whose row x holds
Pillow's filter weights for output pixel x, which scipy runs as vector multiply-adds over whole
image rows, in half the time. Other resamplers are not Pillow's filter and move the masks beyond
our parity with rembg (docs/decisions/code-resampling.md).

The weights are Pillow's exactly: the same window per output pixel (Resample.c `precompute_coeffs`),
quantised to its 22-bit fixed point, and the intermediate image is rounded and clipped to 8 bits
between the passes as Pillow does. The only difference is float32 accumulation in place of integer,
which moves a value by one level when Pillow's sum lies within ~1e-4 of a rounding boundary: a few
values in 100,000 (tests/unit/pipeline/test_resize.py).
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image
from scipy import sparse

# Pillow's lanczos_filter is a 3-lobed windowed sinc, and its 8-bit coefficients are fixed point.
SUPPORT = 3.0
PRECISION_BITS = 22
# Rows per product in either pass: bounds the float32 copies (12 bytes a pixel of RGB) to a band
# small enough for the cache.
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


@functools.lru_cache(maxsize=128)
def row_bands(
    in_size: int, in0: float, in1: float, out_size: int
) -> tuple[tuple[int, int, int, int, sparse.csr_matrix], ...]:
    """`weights` cut into bands of BAND_ROWS outputs: (first output, end, first input, end input,
    the band's weights over just those inputs). A band of the vertical pass then reads only the
    rows under its filter windows, so no float copy of the whole intermediate is made."""
    full = weights(in_size, in0, in1, out_size)
    bands = []
    for top in range(0, out_size, BAND_ROWS):
        bottom = min(out_size, top + BAND_ROWS)
        part = full[top:bottom]
        first, end = int(part.indices.min()), int(part.indices.max()) + 1
        local = sparse.csr_matrix(
            (part.data, part.indices - first, part.indptr), shape=(bottom - top, end - first)
        )
        bands.append((top, bottom, first, end, local))
    return tuple(bands)


def _to_uint8(acc: npt.NDArray[np.float32], out: npt.NDArray[np.uint8]) -> None:
    """Pillow's clip8 of a fixed-point sum: round half up, then clip to 0..255."""
    np.add(acc, 0.5, out=acc)
    np.clip(acc, 0.0, 255.0, out=acc)
    out[...] = acc.reshape(out.shape)  # the cast truncates: floor, the values being >= 0


def resize(image: Image.Image, size: tuple[int, int], box: Box | None = None) -> npt.NDArray[np.uint8]:
    """Pixels of `image` resized to `size` (width, height) with Pillow's LANCZOS from the source
    `box` (left, upper, right, lower; default the whole image), as [height, width, bands] uint8:
    the horizontal pass first, then the vertical, as Pillow does. Each band is resampled on its
    own: unlike Image.resize, RGBA is not premultiplied by its alpha."""
    width, height = image.size
    channels = len(image.getbands())
    out_w, out_h = size
    x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, float(width), float(height))
    across = weights(width, float(x0), float(x1), out_w)
    # Both passes multiply along the first axis, so each reads its input transposed. The
    # intermediate is kept as [input rows, out_w, bands], ready for the vertical pass.
    mid = np.empty((height, out_w, channels), np.uint8)
    band = np.empty((out_w, BAND_ROWS, channels), np.uint8)
    for top in range(0, height, BAND_ROWS):
        bottom = min(height, top + BAND_ROWS)
        # Pixels a band at a time, never the whole image as one more array.
        pixels = np.asarray(image.crop((0, top, width, bottom))).reshape(bottom - top, width, channels)
        columns = cv2.transpose(pixels).reshape(width, -1).astype(np.float32)
        rounded = band[:, : bottom - top]
        _to_uint8(across @ columns, rounded)
        mid[top:bottom] = cv2.transpose(rounded).reshape(bottom - top, out_w, channels)
    out = np.empty((out_h, out_w, channels), np.uint8)
    for first_out, end_out, first_in, end_in, down in row_bands(height, float(y0), float(y1), out_h):
        rows = mid[first_in:end_in].reshape(end_in - first_in, -1).astype(np.float32)
        _to_uint8(down @ rows, out[first_out:end_out])
    return out
