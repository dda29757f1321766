"""Per-step cost of the gateway's CPU work (decode, preprocess, postprocess, encode), in-process.

The model is not run: a mask from a previous real run stands in, since only the gateway's own
overhead is measured here. Median of N runs. The allocator is set up as `bgremove serve` sets it,
and each image is measured twice in turn: every step in one thread, then the model-input resize
split into --strips bands over a helper pool as the gateway does for a request alone (strips.py).

    .venv/bin/python benchmarks/steps.py [IMAGES_DIR] [--format png] [--strips 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.config import Limits
from bgremove_gateway.decode import decode
from bgremove_gateway.encode import encode
from bgremove_gateway.memory import configure_allocator
from bgremove_gateway.postprocess import compose, mask_to_alpha
from bgremove_gateway.preprocess import to_model_input

T = TypeVar("T")
FORMATS = {
    "png": pb.OUTPUT_FORMAT_PNG,
    "webp": pb.OUTPUT_FORMAT_WEBP,
    "mask": pb.OUTPUT_FORMAT_MASK,
    "jpeg": pb.OUTPUT_FORMAT_JPEG,
}


def timed(fn: Callable[[], T], n: int) -> tuple[T, float]:
    out = fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return out, statistics.median(samples)


def measure(
    data: bytes,
    mask: np.ndarray,
    opts: pb.Options,
    fmt: pb.OutputFormat,
    n: int,
    helpers: Executor | None,
    parts: int,
) -> tuple[dict[str, float], tuple[int, int], int]:
    decoded, t_dec = timed(lambda: decode(data, "image/jpeg", Limits()), n)
    _, t_pre = timed(lambda: to_model_input(decoded.image, helpers=helpers, parts=parts), n)
    size = decoded.image.size
    cut, t_post = timed(lambda: compose(decoded, mask_to_alpha(mask, size), opts), n)
    enc, t_enc = timed(lambda: encode(cut, fmt), n)
    row = {"decode": t_dec, "preprocess": t_pre, "postprocess": t_post, "encode": t_enc}
    row["total"] = sum(row.values())
    return row, size, len(enc.data)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("images", type=Path, nargs="*", default=[Path("/tmp/bgremove-bench-images/1mp")])
    ap.add_argument("--format", choices=sorted(FORMATS), default="png")
    ap.add_argument("-n", type=int, default=5)
    ap.add_argument("--strips", type=int, default=2)
    ns = ap.parse_args()
    configure_allocator()
    helpers = ThreadPoolExecutor(max(1, ns.strips - 1))
    fmt = FORMATS[ns.format]
    opts = pb.Options(format=fmt)
    # A blob-shaped mask like a real subject's, so encoders see realistic transparency.
    yy, xx = np.mgrid[:320, :320]
    mask = np.clip(255 - ((yy - 170) ** 2 + (xx - 160) ** 2) / 60, 0, 255).astype(np.uint8)
    totals: dict[str, dict[str, list[float]]] = {"1 strip": {}, f"{ns.strips} strips": {}}
    for folder in ns.images:
        for f in sorted(folder.glob("*.jpg")):
            for label, pool, parts in (("1 strip", None, 1), (f"{ns.strips} strips", helpers, ns.strips)):
                row, size, out_bytes = measure(f.read_bytes(), mask, opts, fmt, ns.n, pool, parts)
                for k, v in row.items():
                    totals[label].setdefault(k, []).append(v)
                print(
                    f"{f.parent.name}/{f.name} {size[0]}x{size[1]} {label}: "
                    + " ".join(f"{k}={v:.1f}ms" for k, v in row.items())
                    + f" out={out_bytes // 1024}KiB"
                )
    for label, steps in totals.items():
        print(f"median, {label}: " + " ".join(f"{k}={statistics.median(v):.1f}ms" for k, v in steps.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
