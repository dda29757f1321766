"""Images built to cost the parsers much for their size (costly_inputs.py): over the structural
limits they are refused before any parser runs; at the limits they decode within a bounded CPU
time and within the memory the budget is charged for them; real photos are never affected."""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms, PngImagePlugin
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.config import Limits
from bgremove_gateway.errors import ServiceError
from bgremove_gateway.pipeline import decode as decode_module
from bgremove_gateway.pipeline.costs import ImageCost, inspect_cost
from bgremove_gateway.pipeline.decode import decode
from bgremove_gateway.runtime.budget import image_bytes_estimate
from costly_inputs import (
    Costly,
    MiB,
    corpus,
    encoded,
    inflating_chunk,
    jpeg_with_scans,
    plain_jpeg,
    plain_png,
    png_chunk,
    png_with_chunks,
    progressive_jpeg,
    webp_with_frames,
)
from e2e_helpers import phone_metadata

LIMITS = Limits()
CORPUS = list(corpus(LIMITS))
# At the limits the worst measured here is 0.9-1.4 s of CPU (a 64 MP progressive JPEG of 20 scans,
# which a real 64 MP photo costs too); without the limits the same kinds took 5-40 s.
CPU_BOUND_S = 2.0
# A refusal is a scan of the structure: tens of milliseconds even for a 50 MB upload.
REFUSAL_CPU_S = 0.5
# Beyond the charge (pixel estimate + the parser's extra bytes): the interpreter and allocator.
MEMORY_SLACK_BYTES = 16 * MiB


def items(*variants: str) -> list[Any]:
    return [pytest.param(item, id=item.name) for item in CORPUS if item.variant in variants]


def limit_of(item: Costly) -> int:
    value = getattr(LIMITS, item.limit)
    assert isinstance(value, int)
    return value


@pytest.fixture
def no_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any Pillow plugin opening the data fails the test: refusals must come before parsing."""

    def opened(*_: object) -> None:
        pytest.fail("a parser saw data that should have been refused first")

    for content_type in list(decode_module._PLUGINS):
        monkeypatch.setitem(decode_module._PLUGINS, content_type, opened)


# --- over the limits -----------------------------------------------------------------------------


@pytest.mark.usefixtures("no_parser")
@pytest.mark.parametrize("item", items("over", "attack"))
def test_over_a_limit_is_refused_before_any_parser_names_the_limit(item: Costly) -> None:
    data = item.make()
    started = time.process_time()
    with pytest.raises(ServiceError) as caught:
        decode(data, item.content_type, LIMITS)
    cpu = time.process_time() - started
    err = caught.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"over the limit of {limit_of(item)} " in err.message, err.message
    assert err.violations[0].field == "image"
    assert cpu < REFUSAL_CPU_S, f"{item.name}: refused after {cpu:.3f} s of CPU"


@pytest.mark.parametrize("item", items("over"))
def test_only_that_limit_refuses_over(item: Costly) -> None:
    raised = replace(LIMITS, **{item.limit: 2 * limit_of(item)})
    assert isinstance(inspect_cost(item.make(), item.content_type, raised), ImageCost)


# --- at the limits -------------------------------------------------------------------------------


@pytest.mark.parametrize("item", items("at"))
def test_at_is_the_most_the_limit_allows(item: Costly) -> None:
    data = item.make()
    cost = inspect_cost(data, item.content_type, LIMITS)
    assert cost.scans <= LIMITS.max_jpeg_scans and cost.segments <= LIMITS.max_image_segments
    assert cost.metadata_bytes <= LIMITS.max_metadata_bytes
    # Within 1% of its limit: 1% less refuses it.
    lower = limit_of(item) * 99 // 100
    with pytest.raises(ServiceError) as caught:
        inspect_cost(data, item.content_type, replace(LIMITS, **{item.limit: lower}))
    assert f"over the limit of {lower} " in caught.value.message


_MEASURE = r"""
import gc, json, sys, time
from bgremove_gateway.config import Limits
from bgremove_gateway.pipeline.costs import inspect_cost
from bgremove_gateway.pipeline.decode import decode
from bgremove_gateway.errors import ServiceError
from bgremove_gateway.runtime.memory import malloc_trim
from costly_inputs import corpus, plain_jpeg, plain_png, extended_webp

item = next(c for c in corpus(Limits()) if c.name == sys.argv[1])
data = item.make()
warm_up = ((plain_jpeg(), "image/jpeg"), (plain_png(), "image/png"), (extended_webp(), "image/webp"))
for small, kind in warm_up:
    decode(small, kind, Limits())  # imports and plugin set-up are not the image's cost
gc.collect()
malloc_trim()


def kib(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key))


with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # the peak (VmHWM) starts again from the current RSS
before = kib("VmRSS:")
charged = []
started = time.process_time()
try:
    decoded = decode(data, item.content_type, Limits(), lambda w, h, extra: charged.append((w, h, extra)))
    outcome = "decoded"
except ServiceError as err:
    outcome = err.message
cpu = time.process_time() - started
growth = (kib("VmHWM:") - before) * 1024
held = inspect_cost(data, item.content_type, Limits()).held_bytes
print(json.dumps({"outcome": outcome, "cpu": cpu, "growth": growth, "charged": charged, "held": held}))
"""


def _measure(item: Costly) -> dict[str, Any]:
    """Decodes `item` in a fresh interpreter: its CPU time and peak RSS growth, undisturbed by
    what this process has allocated and freed before."""
    tests = str(Path(__file__).parents[2] / "support")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, item.name], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result: dict[str, Any] = json.loads(run.stdout.splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, Any]]:
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    at = [item for item in CORPUS if item.variant == "at"]
    with ThreadPoolExecutor(max(1, min(4, (os.cpu_count() or 2) // 2))) as pool:
        return dict(zip((item.name for item in at), pool.map(_measure, at), strict=True))


@pytest.mark.parametrize("item", items("at"))
def test_at_the_limits_decodes_in_bounded_cpu_and_charged_memory(
    item: Costly, measured: dict[str, dict[str, Any]]
) -> None:
    result = measured[item.name]
    assert result["outcome"] == ("decoded" if item.decodes else "image data is corrupt or truncated")
    assert result["cpu"] < CPU_BOUND_S, f"{item.name}: {result['cpu']:.2f} s of CPU"
    # What admission reserves for it (pipeline.Pipeline.run's admit) covers what it really took.
    [(width, height, extra)] = result["charged"]
    assert extra == result["held"]
    charge = image_bytes_estimate(width, height, pb.OUTPUT_FORMAT_UNSPECIFIED) + extra
    assert result["growth"] <= charge + MEMORY_SLACK_BYTES, (
        f"{item.name}: RSS grew {result['growth'] / MiB:.1f} MiB, charged {charge / MiB:.1f} MiB"
    )


def test_webp_charges_the_plugins_copies_of_the_file() -> None:
    data = encoded(Image.new("RGB", (32, 16)), "WEBP", xmp=b"<x:xmpmeta>" + bytes(5000) + b"</x:xmpmeta>")
    charged: list[int] = []
    decode(data, "image/webp", LIMITS, lambda w, h, extra: charged.append(extra))
    assert charged == [2 * len(data) + inspect_cost(data, "image/webp", LIMITS).metadata_bytes]
    assert charged[0] > 2 * len(data) + 5000


# --- what is counted -----------------------------------------------------------------------------


def photo(size: tuple[int, int] = (1000, 750)) -> Image.Image:
    return Image.fromarray(skdata.astronaut()).resize(size)


def test_a_megapixel_photo_is_scanned_in_well_under_a_millisecond() -> None:
    data = encoded(photo(), "JPEG", quality=90, progressive=True, **phone_metadata())
    best = float("inf")
    for _ in range(20):
        started = time.perf_counter()
        inspect_cost(data, "image/jpeg", LIMITS)
        best = min(best, time.perf_counter() - started)
    assert best < 0.001, f"{best * 1e3:.2f} ms"


def test_restart_markers_and_stuffed_bytes_in_scans_are_not_segments() -> None:
    data = encoded(photo((256, 256)), "JPEG", restart_marker_blocks=1)
    assert sum(data.count(bytes([0xFF, 0xD0 + n])) for n in range(8)) > 200  # it really has them
    cost = inspect_cost(data, "image/jpeg", replace(LIMITS, max_image_segments=20))
    assert cost.scans == 1 and cost.segments < 20


def test_a_segment_length_below_two_does_not_end_the_count() -> None:
    # Pillow reads no payload for it and carries on with the next marker; so does the count.
    data = plain_jpeg()
    flood = data[:2] + b"\xff\xe0\x00\x00" * 200 + data[2:]
    with pytest.raises(ServiceError) as caught:
        inspect_cost(flood, "image/jpeg", replace(LIMITS, max_image_segments=100))
    assert "over the limit of 100 segments" in caught.value.message


def test_nothing_after_the_end_of_image_is_counted() -> None:
    # A multi-picture JPEG (MPF) or a trailer: libjpeg stops at EOI, and so does the count.
    baseline = encoded(photo((64, 64)), "JPEG")
    hostile = jpeg_with_scans(progressive_jpeg(64, 64), 500)
    assert inspect_cost(baseline + hostile, "image/jpeg", LIMITS).scans == 1


def test_a_progressive_photo_with_exif_icc_and_xmp() -> None:
    data = encoded(photo(), "JPEG", quality=90, progressive=True, **phone_metadata())
    cost = inspect_cost(data, "image/jpeg", LIMITS)
    assert cost.scans == 10 and cost.segments < 40 and cost.metadata_bytes < 64 * 1024
    assert decode(data, "image/jpeg", LIMITS).image.size == (750, 1000)  # EXIF turns it


def test_the_largest_cmyk_progressive_jpeg_fits_the_scan_budget() -> None:
    # libjpeg's progression has the most scans for CMYK: 18, which must pass at max_pixels.
    data = encoded(photo((64, 64)).convert("CMYK"), "JPEG", progressive=True)
    scans = inspect_cost(data, "image/jpeg", LIMITS).scans
    assert scans == 18
    assert scans * LIMITS.max_pixels <= LIMITS.max_jpeg_scan_pixels
    assert scans <= LIMITS.max_jpeg_scans


def test_a_png_with_an_icc_profile_and_text_chunks() -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "an editor")
    info.add_text("Comment", "a long comment " * 200, zip=True)
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta>" + "x" * 3000 + "</x:xmpmeta>", zip=True)
    data = encoded(photo(), "PNG", icc_profile=icc, pnginfo=info, **{"exif": phone_metadata()["exif"]})
    cost = inspect_cost(data, "image/png", LIMITS)
    # The ICC profile and text are counted inflated, the XMP twice (Pillow keeps text and bytes).
    assert cost.metadata_bytes > len(icc) + 200 * 15 + 2 * 3000
    assert cost.metadata_bytes < 64 * 1024 and cost.segments < 12
    assert decode(data, "image/png", LIMITS).image.size == (750, 1000)


def test_png_image_data_in_libpng_sized_chunks_is_not_counted() -> None:
    # libpng writes 8 KiB IDAT chunks: a 50 MB PNG has 6400 of them, and must not be refused.
    data = encoded(Image.fromarray(np.random.default_rng(1).integers(0, 256, (600, 800, 3), np.uint8)), "PNG")
    body = data[8:]
    chunks, stream = [], b""
    while body:
        (length,) = struct.unpack_from(">I", body)
        kind, payload = body[4:8], body[8 : 8 + length]
        if kind == b"IDAT":
            stream += payload
        elif kind != b"IEND":
            chunks.append(png_chunk(kind, payload))
        body = body[12 + length :]
    idats = [png_chunk(b"IDAT", stream[i : i + 8192]) for i in range(0, len(stream), 8192)]
    rechunked = b"\x89PNG\r\n\x1a\n" + b"".join(chunks + idats) + png_chunk(b"IEND", b"")
    assert len(idats) > 150
    cost = inspect_cost(rechunked, "image/png", replace(LIMITS, max_image_segments=10))
    assert cost.segments == 2  # IHDR and the last, short IDAT
    assert decode(rechunked, "image/png", LIMITS).image.size == (800, 600)


def test_animations_count_what_the_parsers_read() -> None:
    frames = [Image.new("RGB", (16, 8), (i, 0, 0)) for i in range(0, 250, 10)]
    apng = encoded(frames[0], "PNG", save_all=True, append_images=frames[1:])
    # Pillow reads an APNG up to its second frame: the rest is never parsed.
    assert inspect_cost(apng, "image/png", replace(LIMITS, max_image_segments=8)).segments < 8
    # libwebp's demuxer records every frame of an animated WebP.
    webp = webp_with_frames(300)
    assert inspect_cost(webp, "image/webp", LIMITS).segments == 302
    assert decode(webp, "image/webp", LIMITS).image.size == (16, 8)


def test_a_webp_with_icc_exif_and_xmp() -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = encoded(photo(), "WEBP", icc_profile=icc, exif=phone_metadata()["exif"], xmp=b"<x/>" * 100)
    cost = inspect_cost(data, "image/webp", LIMITS)
    assert len(icc) + 400 < cost.metadata_bytes < 64 * 1024 and cost.segments == 5
    assert decode(data, "image/webp", LIMITS).image.size == (750, 1000)


def test_inflation_is_counted_up_to_pillows_own_limit_and_no_further() -> None:
    one = inspect_cost(png_with_chunks(plain_png(), inflating_chunk(b"zTXt")), "image/png", LIMITS)
    assert one.metadata_bytes == MiB
    # Past 1 MiB Pillow refuses the chunk itself (the image is then corrupt): counted as 1 MiB + 1.
    bomb = png_chunk(b"zTXt", b"k\0\0" + zlib.compress(bytes(64 * MiB), 9))
    big = png_with_chunks(plain_png(), bomb)
    assert inspect_cost(big, "image/png", LIMITS).metadata_bytes == MiB + 1
    with pytest.raises(ServiceError) as caught:
        decode(big, "image/png", LIMITS)
    assert caught.value.message == "image data is corrupt or truncated"


def test_inflation_up_to_damage_is_counted() -> None:
    # Pillow inflates until the damage and swallows the error: the work before it still counts.
    damaged = zlib.compress(bytes(MiB), 9)
    damaged = damaged[: len(damaged) // 2] + b"\xff" * 16 + damaged[len(damaged) // 2 :]
    cost = inspect_cost(
        png_with_chunks(plain_png(), png_chunk(b"iCCP", b"p\0\0" + damaged)), "image/png", LIMITS
    )
    assert cost.metadata_bytes >= MiB // 4


def _mapped(data: bytes) -> mmap.mmap:
    mapped = mmap.mmap(-1, len(data))
    mapped[:] = data
    return mapped


@pytest.mark.parametrize("seed", range(3), ids=["jpeg", "png", "webp"])
def test_every_buffer_type_scans_the_same_and_is_released(seed: int) -> None:
    data, content_type = [SEEDS[0], SEEDS[4], SEEDS[7]][seed]
    mapped = _mapped(data)
    buffers: list[Any] = [data, bytearray(data), memoryview(data), mapped]
    assert len({inspect_cost(buffer, content_type, LIMITS) for buffer in buffers}) == 1
    mapped.close()  # raises BufferError if the scan kept a view of it
    # Refused from deep inside the scan (the iTXt chunk's text): no view survives either.
    mapped = _mapped(png_with_chunks(plain_png(), inflating_chunk(b"iTXt")))
    with pytest.raises(ServiceError):
        inspect_cost(mapped, "image/png", replace(LIMITS, max_metadata_bytes=1000))
    mapped.close()


# --- never anything but a ServiceError ----------------------------------------------------------


def _seeds() -> list[tuple[bytes, str]]:
    small = photo((48, 32))
    frames = [Image.new("RGB", (16, 8), color) for color in ("red", "blue")]
    info = PngImagePlugin.PngInfo()
    info.add_text("k", "v" * 40, zip=True)
    info.add_itxt("XML:com.adobe.xmp", "<x/>" * 10, zip=True)
    return [
        (encoded(small, "JPEG", progressive=True, **phone_metadata()), "image/jpeg"),
        (encoded(small, "JPEG", restart_marker_blocks=2), "image/jpeg"),
        (encoded(small.convert("CMYK"), "JPEG", progressive=True), "image/jpeg"),
        (jpeg_with_scans(progressive_jpeg(16, 16), 14), "image/jpeg"),
        (encoded(small, "PNG", pnginfo=info, **phone_metadata()), "image/png"),
        (png_with_chunks(plain_png(), inflating_chunk(b"iTXt")), "image/png"),
        (encoded(frames[0], "PNG", save_all=True, append_images=frames[1:]), "image/png"),
        (encoded(small, "WEBP", **phone_metadata()), "image/webp"),
        (webp_with_frames(3), "image/webp"),
    ]


SEEDS = _seeds()
TIGHT = Limits(max_jpeg_scans=3, max_jpeg_scan_pixels=4000, max_image_segments=12, max_metadata_bytes=600)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, str]:
    """Real images cut short, with bytes flipped, with a slice repeated or random bytes spliced in."""
    data, content_type = draw(st.sampled_from(SEEDS))
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["truncate", "flip", "repeat", "splice"]))
        at = draw(st.integers(0, len(out)))
        if how == "truncate":
            del out[at:]
        elif how == "flip" and at < len(out):
            out[at] ^= draw(st.integers(1, 255))
        elif how == "repeat":
            size = draw(st.integers(1, 64))
            out[at:at] = bytes(out[at : at + size]) * draw(st.integers(1, 50))
        else:
            out[at:at] = draw(st.binary(max_size=64))
    return bytes(out[: max(len(out), 4)] or data[:4]), content_type


@settings(
    max_examples=1_500,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(image=mutated(), tight=st.booleans())
def test_inspect_cost_answers_a_cost_or_a_refusal_on_any_bytes(image: tuple[bytes, str], tight: bool) -> None:
    data, content_type = image
    started = time.process_time()
    try:
        cost = inspect_cost(data, content_type, TIGHT if tight else LIMITS)
    except ServiceError as err:
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "over the limit of" in err.message
    else:
        assert min(cost.scans, cost.segments, cost.metadata_bytes, cost.copied_bytes) >= 0
    assert time.process_time() - started < 0.5


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    data=st.binary(max_size=2_000), content_type=st.sampled_from(["image/jpeg", "image/png", "image/webp"])
)
def test_inspect_cost_on_random_bytes(data: bytes, content_type: str) -> None:
    for candidate in (
        data,
        {"image/jpeg": b"\xff\xd8", "image/png": b"\x89PNG\r\n\x1a\n"}.get(content_type, b"RIFF") + data,
    ):
        try:
            inspect_cost(candidate, content_type, TIGHT)
        except ServiceError as err:
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT
