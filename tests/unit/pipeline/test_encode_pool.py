"""Large PNG/WebP encodes run in worker processes: same bytes' pixels, and the GIL stays free."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.pipeline import encode_pool
from bgremove_gateway.pipeline.encode import encode
from bgremove_gateway.pipeline.encode_pool import EncodePool, reserve
from bgremove_gateway.pipeline.postprocess import Cutout


def cutout(width: int, height: int, mode: str = "RGBA") -> Cutout:
    photo = Image.fromarray(skdata.astronaut()).resize((width, height), Image.Resampling.BILINEAR)
    rgba = photo.convert("RGBA")
    yy, xx = np.mgrid[:height, :width]
    rgba.putalpha(Image.fromarray(((xx + yy) % 256).astype(np.uint8)))
    image = rgba if mode == "RGBA" else photo.convert(mode)
    return Cutout(image=image, bbox=None, input_size=(width, height))


@pytest.fixture(scope="module")
def pool() -> Iterator[EncodePool]:
    encoder = EncodePool(workers=2, min_pixels=0)
    encoder.start()
    yield encoder
    encoder.shutdown()


@pytest.mark.parametrize("fmt", [pb.OUTPUT_FORMAT_PNG, pb.OUTPUT_FORMAT_WEBP])
def test_pool_output_decodes_to_the_same_pixels_as_in_process(pool: EncodePool, fmt: pb.OutputFormat) -> None:
    cut = cutout(640, 480)
    before = pool.remote_encodes
    remote, local = pool.encode(cut, fmt), encode(cut, fmt)
    assert pool.remote_encodes == before + 1
    assert remote.content_type == local.content_type
    with Image.open(io.BytesIO(remote.data)) as a, Image.open(io.BytesIO(local.data)) as b:
        assert a.mode == b.mode == "RGBA"
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_small_images_and_gil_free_formats_stay_in_process() -> None:
    encoder = EncodePool(workers=1, min_pixels=1_000_000)
    try:
        assert encoder.encode(cutout(800, 600), pb.OUTPUT_FORMAT_PNG).data.startswith(b"\x89PNG")
        assert encoder.encode(cutout(1500, 1000, "RGB"), pb.OUTPUT_FORMAT_JPEG).data.startswith(b"\xff\xd8")
        # ZIP's JPEG and Pillow PNG release the GIL: in-process at any size.
        assert not encoder.wants(cutout(1500, 1000), pb.OUTPUT_FORMAT_ZIP)
        assert encoder.encode(cutout(1500, 1000), pb.OUTPUT_FORMAT_ZIP).data.startswith(b"PK\x03\x04")
        assert encoder.remote_encodes == 0
        assert encoder.wants(cutout(1500, 1000), pb.OUTPUT_FORMAT_PNG)
    finally:
        encoder.shutdown()


def longest_pause(work: Callable[[], object]) -> tuple[float, float]:
    """(longest time the main thread could not run, duration of `work`) with `work` in a thread."""
    done = threading.Event()

    def run() -> None:
        work()
        done.set()

    thread = threading.Thread(target=run)
    started = last = time.perf_counter()
    thread.start()
    pause = 0.0
    while not done.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        pause, last = max(pause, now - last), now
    thread.join()
    return pause, time.perf_counter() - started


def test_a_12_megapixel_png_encode_leaves_the_gil_free(pool: EncodePool) -> None:
    cut = cutout(4243, 2828)
    pool.encode(cut, pb.OUTPUT_FORMAT_PNG)  # first use of fpng in the workers
    # In-process, fpng holds the GIL for its whole run: the main thread stops for about as long
    # as the encode takes. Through the pool it only waits for the pixels' copy into the pipe.
    local_pause, local_s = min(longest_pause(lambda: encode(cut, pb.OUTPUT_FORMAT_PNG)) for _ in range(3))
    pool_pause, pool_s = min(longest_pause(lambda: pool.encode(cut, pb.OUTPUT_FORMAT_PNG)) for _ in range(3))
    print(
        f"12 MP PNG: in-process {local_s * 1000:.0f} ms, main thread paused {local_pause * 1000:.0f} ms; "
        f"pool {pool_s * 1000:.0f} ms, paused {pool_pause * 1000:.0f} ms"
    )
    assert local_pause > 0.5 * local_s, "fpng in-process is expected to hold the GIL throughout"
    assert pool_pause < 0.5 * local_pause


def test_a_killed_worker_costs_no_request_and_the_pool_comes_back() -> None:
    encoder = EncodePool(workers=1, min_pixels=0)
    try:
        encoder.start()
        cut = cutout(320, 240)
        (pid,) = [p.pid for p in encoder._pool._processes.values()]
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        assert encoder.encode(cut, pb.OUTPUT_FORMAT_PNG).data.startswith(b"\x89PNG")  # in-process
        assert encoder.restarts == 1
        assert encoder.encode(cut, pb.OUTPUT_FORMAT_PNG).data.startswith(b"\x89PNG")
        assert encoder.remote_encodes >= 1
    finally:
        encoder.shutdown()


def test_reserve_refuses_what_dev_shm_cannot_hold() -> None:
    free = os.statvfs("/dev/shm")
    too_big = free.f_bavail * free.f_frsize + (256 << 20)
    assert reserve(too_big) is None  # a None, not a SIGBUS later while writing into it
    block = reserve(1 << 20)
    assert block is not None
    block.close()
    block.unlink()


def test_a_full_dev_shm_falls_back_to_an_in_process_encode(
    pool: EncodePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encode_pool, "reserve", lambda size: None)
    cut = cutout(640, 480)
    before = (pool.remote_encodes, pool.no_room)
    encoded = pool.encode(cut, pb.OUTPUT_FORMAT_PNG)
    assert (pool.remote_encodes, pool.no_room) == (before[0], before[1] + 1)
    with Image.open(io.BytesIO(encoded.data)) as png:
        assert np.array_equal(np.asarray(png), np.asarray(cut.image))


def test_no_block_is_left_in_dev_shm(pool: EncodePool) -> None:
    before = set(os.listdir("/dev/shm"))
    for fmt in (pb.OUTPUT_FORMAT_PNG, pb.OUTPUT_FORMAT_WEBP):
        pool.encode(cutout(1200, 900), fmt)
    assert {n for n in os.listdir("/dev/shm") if n.startswith("psm_")} <= before
