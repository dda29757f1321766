"""Debug logging never quotes image metadata: Pillow's parsers stay quiet at every level."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest
from PIL import ExifTags, Image

from bgremove_gateway.config import Limits
from bgremove_gateway.pipeline.decode import decode

SCRIPT = """
import io, logging, sys
from PIL import ExifTags, Image
from bgremove_gateway.config import Limits
from bgremove_gateway.pipeline.decode import decode
from bgremove_gateway.runtime.logs import configure_logging
configure_logging("DEBUG")
exif = Image.Exif()
exif[ExifTags.Base.Artist] = "CANARY-ARTIST-9c1e"
out = io.BytesIO()
Image.new("RGB", (8, 8)).save(out, "JPEG", exif=exif.tobytes())
decode(out.getvalue(), "image/jpeg", Limits())
logging.getLogger("bgremove.test").debug("debug logging is on")
"""


def test_exif_values_stay_out_of_a_debug_log() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "debug logging is on" in out.stderr
    assert "CANARY-ARTIST-9c1e" not in out.stderr


def test_pillow_would_log_them_without_that_setting(caplog: pytest.LogCaptureFixture) -> None:
    """The guard is needed: Pillow itself logs EXIF values at DEBUG."""
    exif = Image.Exif()
    exif[ExifTags.Base.Artist] = "CANARY-ARTIST-9c1e"
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "JPEG", exif=exif.tobytes())
    pil = logging.getLogger("PIL")
    level = pil.level
    pil.setLevel(logging.DEBUG)
    try:
        with caplog.at_level(logging.DEBUG):
            decode(out.getvalue(), "image/jpeg", Limits())
    finally:
        pil.setLevel(level)
    assert "CANARY-ARTIST-9c1e" in caplog.text
