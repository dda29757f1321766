"""The full U2-Net, served out of the box beside U2-Net-P: listed and ready, chosen per request
through gRPC, the Python client and the CLI, and equal to rembg's u2net pipeline on its own photos.

U2-Net is ~1 s an image on two cores, so a few photos only, each reference computed once."""

from __future__ import annotations

import asyncio
import io
import subprocess
from functools import cache
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc.aio as triton_aio
from PIL import Image

from bgremove import Client, RemoveOptions
from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from e2e_helpers import iou, reference_mask, stream_remove, u2net_path, upload_messages
from service_harness import BGREMOVE, GatewayProcess

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rembg"
PHOTOS = ["anime-girl-1.jpg", "car-1.jpg", "cloth-1.jpg"]
MASK = pb.Options(format=pb.OUTPUT_FORMAT_MASK, model="u2net")

Mask = npt.NDArray[np.uint8]


# Before `gateway` (usefixtures come first): a session gateway started here serves a prepared u2net.
pytestmark = pytest.mark.usefixtures("prepared_repo")


@cache
def reference(name: str, model: str = "u2net") -> Mask:
    weights = u2net_path() if model == "u2net" else None
    return reference_mask(Image.open(FIXTURES / name), weights)


def mask_of(data: bytes) -> Mask:
    mask = np.asarray(Image.open(io.BytesIO(data)))
    assert mask.ndim == 2 and mask.dtype == np.uint8
    return mask


def test_service_info_lists_both_models_ready(gateway: GatewayProcess) -> None:
    with grpc.insecure_channel(gateway.target) as channel:
        info = pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10)
    assert [(m.name, m.ready, m.input_size) for m in info.models] == [
        ("u2net", True, 320),
        ("u2netp", True, 320),
    ]
    # The CPU quickstart keeps the light model as its default.
    assert info.default_model == "u2netp"


@pytest.mark.parametrize("name", PHOTOS)
def test_masks_match_rembg_u2net_through_the_python_client(gateway: GatewayProcess, name: str) -> None:
    with Client(gateway.target) as client:
        result = client.remove(FIXTURES / name, RemoveOptions(format="mask", model="u2net"))
    assert result.model == "u2net"
    mask = mask_of(result.data)
    ref = reference(name)
    assert mask.shape == ref.shape
    assert iou(mask >= 128, ref >= 128) >= 0.99
    confident = ref >= 230
    if confident.any():
        assert (mask[confident] >= 200).mean() >= 0.99
    # Really the full network: U2-Net-P's reference is a different mask.
    assert not np.array_equal(ref, reference(name, "u2netp"))


async def test_a_mask_is_the_same_alone_and_batched(gateway: GatewayProcess) -> None:
    photos = {name: (FIXTURES / name).read_bytes() for name in PHOTOS}
    first = PHOTOS[0]
    alone = mask_of(stream_remove(gateway.target, photos[first], options=MASK)[1])

    async def one(stub: pb_grpc.BackgroundRemovalStub, data: bytes) -> Mask:
        parts = []
        async for msg in stub.StreamRemoveBackground(upload_messages(data, "image/jpeg", MASK), timeout=120):
            if msg.HasField("header"):
                assert msg.header.model == "u2net"
            else:
                parts.append(msg.chunk)
        return mask_of(b"".join(parts))

    # While the single instance runs the first arrival, the others queue and form one batch.
    sent = [first, *PHOTOS[1:], first]
    async with grpc.aio.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        masks = await asyncio.gather(*(one(stub, photos[name]) for name in sent))
    for name, mask in zip(sent, masks, strict=True):
        if name == first:
            assert np.array_equal(mask, alone), "the mask depends on what else was in the batch"
        else:
            assert iou(mask >= 128, reference(name) >= 128) >= 0.99

    client = triton_aio.InferenceServerClient(f"127.0.0.1:{gateway.triton_grpc_port}")
    try:
        # Triton updates its statistics just after answering: read until a batch > 1 shows (10 s).
        for _ in range(100):
            stats = await client.get_inference_statistics("u2net", as_json=True)
            batches = {int(b["batch_size"]) for b in stats["model_stats"][0].get("batch_stats", [])}
            if batches and max(batches) > 1:
                break
            await asyncio.sleep(0.1)
    finally:
        await client.close()
    assert max(batches) > 1, f"Triton never batched u2net: {batches}"


def test_cli_removes_with_model_u2net(gateway: GatewayProcess, tmp_path: Path) -> None:
    name = PHOTOS[1]
    out = subprocess.run(
        [
            BGREMOVE,
            "remove",
            str(FIXTURES / name),
            "-o",
            str(tmp_path / "cut.png"),
            "--model",
            "u2net",
            "--target",
            gateway.target,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    cut = Image.open(tmp_path / "cut.png")
    assert cut.mode == "RGBA" and cut.size == Image.open(FIXTURES / name).size
    assert iou(np.asarray(cut)[..., 3] >= 128, reference(name) >= 128) >= 0.99
