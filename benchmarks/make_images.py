"""Writes the benchmark photo sets: real photos scaled to 0.3, 1, 4 and 12 megapixels, as JPEG.

Sources are real photographs (scikit-image's astronaut, chelsea, coffee, rocket). Upscaled photos
are smoother than camera output, which would flatter decode and encode, so mild sensor-like noise
(sigma 2 levels) is added before the JPEG is written at quality 90.

    python benchmarks/make_images.py OUT_DIR        # OUT_DIR/0.3mp/*.jpg, 1mp, 4mp, 12mp
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

SIZES_MP = (0.3, 1.0, 4.0, 12.0)
PHOTOS = {"astronaut": data.astronaut, "chelsea": data.chelsea, "coffee": data.coffee, "rocket": data.rocket}


def scaled(photo: Image.Image, megapixels: float, rng: np.random.Generator) -> Image.Image:
    w, h = photo.size
    k = math.sqrt(megapixels * 1e6 / (w * h))
    big = photo.resize((round(w * k), round(h * k)), Image.Resampling.LANCZOS)
    noisy = np.asarray(big, dtype=np.float32) + rng.normal(0, 2, (big.height, big.width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make(out: Path) -> dict[float, Path]:
    rng = np.random.default_rng(7)
    folders = {}
    for mp in SIZES_MP:
        folder = out / f"{mp:g}mp"
        folder.mkdir(parents=True, exist_ok=True)
        for name, load in PHOTOS.items():
            target = folder / f"{name}.jpg"
            if not target.exists():
                scaled(Image.fromarray(load()).convert("RGB"), mp, rng).save(target, "JPEG", quality=90)
        folders[mp] = folder
    return folders


if __name__ == "__main__":
    for mp, folder in make(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/images")).items():
        print(f"{mp:g} MP: {folder}")
