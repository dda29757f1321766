"""Per-step cost of the gateway's CPU work (decode, preprocess, postprocess, encode), in-process.

The model is not run: a blob-shaped mask stands in, since only the gateway's own overhead is
measured here. Median of N runs, every step in one thread. The allocator is set up as
`bgremove serve` sets it.

    .venv/bin/python benchmarks/steps.py [IMAGES_DIR] [--format png]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.config import Limits
from bgremove_gateway.pipeline.decode import decode
from bgremove_gateway.pipeline.encode import OUTPUT_FORMATS as FORMATS
from bgremove_gateway.pipeline.encode import encode
from bgremove_gateway.pipeline.postprocess import compose, mask_to_alpha
from bgremove_gateway.pipeline.preprocess import to_model_input
from bgremove_gateway.runtime.memory import configure_allocator

T = TypeVar("T")


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
    mask: npt.NDArray[np.uint8],
    opts: pb.Options,
    fmt: pb.OutputFormat,
    n: int,
) -> tuple[dict[str, float], tuple[int, int], int]:
    decoded, t_dec = timed(lambda: decode(data, "image/jpeg", Limits()), n)
    _, t_pre = timed(lambda: to_model_input(decoded.image), n)
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
    ns = ap.parse_args()
    configure_allocator()
    fmt = FORMATS[ns.format]
    opts = pb.Options(format=fmt)
    # A blob-shaped mask like a real subject's, so encoders see realistic transparency.
    yy, xx = np.mgrid[:320, :320]
    mask = np.clip(255 - ((yy - 170) ** 2 + (xx - 160) ** 2) / 60, 0, 255).astype(np.uint8)
    totals: dict[str, list[float]] = {}
    for folder in ns.images:
        for f in sorted(folder.glob("*.jpg")):
            row, size, out_bytes = measure(f.read_bytes(), mask, opts, fmt, ns.n)
            for k, v in row.items():
                totals.setdefault(k, []).append(v)
            print(
                f"{f.parent.name}/{f.name} {size[0]}x{size[1]}: "
                + " ".join(f"{k}={v:.1f}ms" for k, v in row.items())
                + f" out={out_bytes // 1024}KiB"
            )
    print("median: " + " ".join(f"{k}={statistics.median(v):.1f}ms" for k, v in totals.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
