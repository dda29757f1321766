"""`bgremove remove` as a newcomer runs it, against the real service."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

from e2e_helpers import iou, jpeg_bytes, reference_mask
from service_harness import BGREMOVE, GatewayProcess


def test_remove_one_photo_writes_a_correct_cutout(gateway: GatewayProcess, tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_bytes(skdata.astronaut()))
    out = subprocess.run(
        [BGREMOVE, "remove", str(photo), "-o", str(tmp_path / "cut.png"), "--target", gateway.target],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    cut = Image.open(tmp_path / "cut.png")
    assert cut.format == "PNG" and cut.mode == "RGBA" and cut.size == (512, 512)
    ref = reference_mask(Image.open(photo))
    assert iou(np.asarray(cut)[..., 3] >= 128, ref >= 128) >= 0.99


def test_folder_with_a_corrupt_file_reports_it_and_does_the_rest(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg_bytes(skdata.chelsea()))
    (src / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)
    Image.fromarray(skdata.coffee()).save(src / "c.webp", lossless=True)
    out = subprocess.run(
        [
            BGREMOVE,
            "remove",
            str(src),
            "-o",
            str(tmp_path / "out"),
            "--format",
            "webp",
            "--concurrency",
            "3",
            "--target",
            gateway.target,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if "b.png" in line]
    assert len(errors) == 1 and "INVALID_ARGUMENT" in errors[0]
    assert "Traceback" not in out.stderr
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["a.webp", "c.webp"]
    assert Image.open(tmp_path / "out" / "c.webp").size == (600, 400)
