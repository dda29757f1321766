"""Every bad upload gets a precise answer from the real gateway, and harms no one else.

Hostile streams are fired at a gateway with small limits while another client keeps sending good
images and a prober keeps asking for health: every good request must succeed, health must stay
SERVING, and each hostile stream must get its own status and a message naming the problem and
the limit, the same through the blocking and the asyncio gRPC APIs.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from PIL import ExifTags, Image
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from e2e_helpers import jpeg_bytes, stream_remove
from service_harness import GatewayProcess

MAX_UPLOAD = 3_000_000
MAX_CHUNK = 262_144
MAX_PIXELS = 20_000_000
IDLE_S = 1.5
MAX_UNARY = 1_000_000
MAX_SIDE = 4096
SUPPORTED = "supported: image/jpeg, image/png, image/webp"


@pytest.fixture(scope="module")
def strict(gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(
        args=[
            "--triton-url",
            f"127.0.0.1:{gateway.triton_grpc_port}",
            "--max-upload-bytes",
            str(MAX_UPLOAD),
            "--max-chunk-bytes",
            str(MAX_CHUNK),
            "--max-pixels",
            str(MAX_PIXELS),
            "--idle-timeout",
            str(IDLE_S),
            "--max-unary-bytes",
            str(MAX_UNARY),
            "--max-output-side",
            str(MAX_SIDE),
        ]
    )
    with gw.serving():
        yield gw


def encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


@functools.cache
def zip_bomb_png() -> bytes:
    """A real, valid 6000x6000 PNG of zeros: 108 MB of pixels in about 100 kB."""
    rows = zlib.compress(b"".join(b"\x00" + bytes(6000 * 3) for _ in range(6000)), 9)
    ihdr = struct.pack(">IIBBBBB", 6000, 6000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")
    )


PHOTO = jpeg_bytes(skdata.astronaut())
PNG = encoded(Image.fromarray(skdata.chelsea()), "PNG")


def header(
    data: bytes, content_type: str = "image/jpeg", total: int | None = None, sha: bytes | None = None
) -> pb.UploadRequest:
    return pb.UploadRequest(
        header=pb.UploadHeader(
            content_type=content_type,
            total_size=len(data) if total is None else total,
            sha256=hashlib.sha256(data).digest() if sha is None else sha,
        )
    )


def chunks(data: bytes, size: int = 65_536) -> list[pb.UploadRequest]:
    return [pb.UploadRequest(chunk=data[i : i + size]) for i in range(0, len(data), size)]


@dataclass(frozen=True)
class Case:
    messages: Callable[[], list[pb.UploadRequest]]
    code: grpc.StatusCode
    words: str
    field: str | None  # the BadRequest field violation expected, if any


BIG = bytes(2_000_000)
CASES: dict[str, Case] = {
    # protocol
    "no header": Case(
        lambda: [], grpc.StatusCode.INVALID_ARGUMENT, "stream ended before the header", "header"
    ),
    "two headers": Case(
        lambda: [header(PHOTO), header(PHOTO), *chunks(PHOTO)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "a second header arrived",
        "header",
    ),
    "chunk before header": Case(
        lambda: [*chunks(PHOTO)[:1], header(PHOTO)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "first message must carry the header, got a chunk",
        "header",
    ),
    "empty upload": Case(
        lambda: [header(PHOTO)], grpc.StatusCode.INVALID_ARGUMENT, "upload carried no image bytes", "chunk"
    ),
    "chunk over the chunk limit": Case(
        lambda: [header(BIG), *chunks(BIG, 300_000)],
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"chunk of 300000 bytes is over the limit of {MAX_CHUNK} bytes",
        "chunk",
    ),
    "declared size over the upload limit": Case(
        lambda: [header(PHOTO, total=5_000_000), *chunks(PHOTO)],
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"upload of 5000000 bytes is over the limit of {MAX_UPLOAD} bytes",
        "header.total_size",
    ),
    "bytes over the upload limit": Case(
        lambda: [header(PHOTO, total=MAX_UPLOAD), *chunks(bytes(MAX_UPLOAD + 200_000), 200_000)],
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"upload is over the limit of {MAX_UPLOAD} bytes",
        "chunk",
    ),
    "more bytes than declared": Case(
        lambda: [header(PHOTO, total=1000), *chunks(PHOTO)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "received more than the 1000 bytes declared in header.total_size",
        "header.total_size",
    ),
    "fewer bytes than declared": Case(
        lambda: [header(PHOTO, total=len(PHOTO) + 10), *chunks(PHOTO)],
        grpc.StatusCode.INVALID_ARGUMENT,
        f"stream ended after {len(PHOTO)} bytes but header.total_size declared {len(PHOTO) + 10}",
        "header.total_size",
    ),
    "sha256 mismatch": Case(
        lambda: [header(PHOTO, sha=hashlib.sha256(b"other").digest()), *chunks(PHOTO)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "header.sha256 does not match the SHA-256 of the bytes received",
        "header.sha256",
    ),
    # content
    "not an image": Case(
        lambda: [header(b"%PDF-1.7 " * 100), *chunks(b"%PDF-1.7 " * 100)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "data is not an image",
        "image",
    ),
    "declared type is not the sniffed type": Case(
        lambda: [header(PNG, "image/jpeg"), *chunks(PNG)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "content_type is image/jpeg but the data is image/png",
        "content_type",
    ),
    "unsupported declared type": Case(
        lambda: [header(PHOTO, "image/gif"), *chunks(PHOTO)],
        grpc.StatusCode.INVALID_ARGUMENT,
        f"header.content_type 'image/gif' is not supported; {SUPPORTED}",
        "header.content_type",
    ),
    "unsupported format (GIF)": Case(
        lambda: [header(g := encoded(Image.new("P", (8, 8)), "GIF"), "image/png"), *chunks(g)],
        grpc.StatusCode.INVALID_ARGUMENT,
        f"image/gif images are not supported; {SUPPORTED}",
        "image",
    ),
    "unsupported format (TIFF)": Case(
        lambda: [header(t := encoded(Image.new("RGB", (8, 8)), "TIFF"), "image/png"), *chunks(t)],
        grpc.StatusCode.INVALID_ARGUMENT,
        f"image/tiff images are not supported; {SUPPORTED}",
        "image",
    ),
    "truncated JPEG": Case(
        lambda: [header(PHOTO[:20_000]), *chunks(PHOTO[:20_000])],
        grpc.StatusCode.INVALID_ARGUMENT,
        "image data is corrupt or truncated",
        "image",
    ),
    "corrupt PNG": Case(
        lambda: [header(bad := PNG[:4000] + bytes(4000) + PNG[8000:], "image/png"), *chunks(bad)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "image data is corrupt or truncated",
        "image",
    ),
    "pixel count over the limit (header only)": Case(
        lambda: [header(p := png_claiming(100_000, 100_000), "image/png"), *chunks(p)],
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"image is 100000x100000 = 10000000000 pixels, over the limit of {MAX_PIXELS} pixels",
        "image",
    ),
    "decompression bomb": Case(
        lambda: [header(b := zip_bomb_png(), "image/png"), *chunks(b)],
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"image is 6000x6000 = 36000000 pixels, over the limit of {MAX_PIXELS} pixels",
        "image",
    ),
    "zero width": Case(
        lambda: [header(z := png_claiming(0, 50), "image/png"), *chunks(z)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "image declares 0x50 pixels: width and height must be at least 1",
        "image",
    ),
}


def expect(err: grpc.RpcError | grpc.aio.AioRpcError, case: Case) -> None:
    assert err.code() == case.code, err.details()
    assert case.words in (err.details() or ""), err.details()
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    bad = error_details_pb2.BadRequest()
    assert status is not None and any(d.Unpack(bad) for d in status.details)
    assert [v.field for v in bad.field_violations] == [case.field]


class Bystanders:
    """Another client sending good images, and a health prober, for as long as the test runs."""

    def __init__(self, target: str, gw: GatewayProcess) -> None:
        self.target, self.gw = target, gw
        self.done = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.health: list[int | None] = []
        self._threads = [threading.Thread(target=self._good), threading.Thread(target=self._probe)]

    def _good(self) -> None:
        photo = jpeg_bytes(skdata.chelsea())
        while not self.done.is_set():
            try:
                header, body, _ = stream_remove(self.target, photo)
                assert (header.width, header.height) == (451, 300) and body.startswith(b"\x89PNG")
                self.ok += 1
            except Exception as exc:  # every kind of failure is what this records
                self.failures.append(repr(exc))

    def _probe(self) -> None:
        while not self.done.is_set():
            self.health.append(self.gw.health())
            time.sleep(0.2)

    def __enter__(self) -> Bystanders:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        for t in self._threads:
            t.join(60)


def test_hostile_streams_get_precise_answers_and_harm_no_one(strict: GatewayProcess) -> None:
    with Bystanders(strict.target, strict) as others, grpc.insecure_channel(strict.target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        for name, case in CASES.items():
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.StreamRemoveBackground(iter(case.messages()), timeout=60))
            try:
                expect(caught.value, case)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from None

        # Stalled after the header: cut off at the idle limit, with the limit in the message.
        def stall() -> Iterator[pb.UploadRequest]:
            yield header(PHOTO)
            time.sleep(IDLE_S + 2)
            yield from chunks(PHOTO)

        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.StreamRemoveBackground(stall(), timeout=60))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert f"no message within the idle timeout of {IDLE_S:g} s" in (caught.value.details() or "")
        assert time.monotonic() - started < IDLE_S + 1.5

        # The caller's own deadline passes mid-upload.
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.StreamRemoveBackground(stall(), timeout=0.5))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        # The caller cancels mid-upload (the buffers it filled are freed: see test_privacy_e2e).
        call = stub.StreamRemoveBackground(stall(), timeout=60)
        time.sleep(0.3)
        call.cancel()
        with pytest.raises(grpc.RpcError) as caught:
            list(call)
        assert caught.value.code() == grpc.StatusCode.CANCELLED
        time.sleep(1.0)  # the good client goes on a little longer after the last hostile stream

    assert others.failures == [] and others.ok >= 3, (others.ok, others.failures[:3])
    assert others.health and set(others.health) == {health_pb2.HealthCheckResponse.SERVING}
    assert strict.proc is not None and strict.proc.poll() is None
    assert "Traceback" not in strict.log_text()


async def test_asyncio_clients_get_the_same_answers(strict: GatewayProcess) -> None:
    """grpcio's asyncio client masks a status that arrives mid-write as INTERNAL (grpc#36066);
    the gateway reads out the rest of a refused upload first, so these match the blocking API."""
    async with grpc.aio.insecure_channel(strict.target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        for name, case in CASES.items():
            for _ in range(3):  # the race it guards against does not show every time
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for _ in stub.StreamRemoveBackground(iter(case.messages()), timeout=60):
                        pass
                try:
                    expect(caught.value, case)
                except AssertionError as exc:
                    raise AssertionError(f"{name}: {exc}") from None
    await asyncio.sleep(0)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored 60x40, shown 40x60
    return encoded(Image.new("RGB", (60, 40), "white"), "JPEG", exif=exif.tobytes())


def png16_grey() -> bytes:
    pixels = (np.arange(32 * 16, dtype=np.uint32).reshape(16, 32) * 120).astype(">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels)
    ihdr = struct.pack(">IIBBBBB", 32, 16, 16, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def apng() -> bytes:
    frames = [Image.new("RGB", (20, 10), c) for c in ("red", "blue")]
    return encoded(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100)


GOOD: dict[str, tuple[Callable[[], bytes], str, tuple[int, int]]] = {
    "greyscale": (lambda: encoded(Image.new("L", (30, 20), 128), "PNG"), "image/png", (30, 20)),
    "palette": (
        lambda: encoded(Image.new("RGB", (30, 20), "red").convert("P"), "PNG"),
        "image/png",
        (30, 20),
    ),
    "16-bit": (png16_grey, "image/png", (32, 16)),
    "CMYK JPEG": (
        lambda: encoded(Image.new("CMYK", (30, 20), (0, 255, 0, 0)), "JPEG"),
        "image/jpeg",
        (30, 20),
    ),
    "alpha": (lambda: encoded(Image.new("RGBA", (30, 20), (0, 0, 255, 90)), "PNG"), "image/png", (30, 20)),
    "alpha WebP": (
        lambda: encoded(Image.new("RGBA", (30, 20), (0, 0, 255, 90)), "WEBP"),
        "image/webp",
        (30, 20),
    ),
    "EXIF-rotated": (exif_rotated_jpeg, "image/jpeg", (40, 60)),
    "1x1": (lambda: encoded(Image.new("RGB", (1, 1), "red"), "PNG"), "image/png", (1, 1)),
    "very wide": (lambda: encoded(Image.new("RGB", (8000, 3), "red"), "PNG"), "image/png", (8000, 3)),
    "very tall": (lambda: encoded(Image.new("RGB", (2, 5000), "red"), "JPEG"), "image/jpeg", (2, 5000)),
    "animated PNG (first frame)": (apng, "image/png", (20, 10)),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_images_that_must_work(strict: GatewayProcess, name: str) -> None:
    make, content_type, size = GOOD[name]
    result_header, body, _ = stream_remove(strict.target, make(), content_type)
    out = Image.open(io.BytesIO(body))
    assert (result_header.width, result_header.height) == size == out.size
    assert out.mode == "RGBA"


def test_limits_are_reported_as_configured(strict: GatewayProcess) -> None:
    with grpc.insecure_channel(strict.target) as channel:
        info = pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10)
    lim = info.limits
    assert (lim.max_upload_bytes, lim.max_chunk_bytes, lim.max_pixels, lim.idle_timeout_ms) == (
        MAX_UPLOAD,
        MAX_CHUNK,
        MAX_PIXELS,
        int(IDLE_S * 1000),
    )
    assert (lim.max_unary_bytes, lim.max_output_side, lim.max_crop_margin) == (MAX_UNARY, MAX_SIDE, 10_000)
