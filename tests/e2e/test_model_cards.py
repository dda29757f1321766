"""A model added as data: a card and synthetic weights in a fresh repository, prepared by
`bgremove prepare-models`, served by the gateway's embedded Triton and picked per request. It takes
64x64 images, not U2-Net's 320: the gateway learns that from Triton and resizes to it."""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from bgremove_gateway.pipeline.postprocess import mask_to_alpha
from bgremove_gateway.pipeline.preprocess import to_model_input
from e2e_helpers import iou, stream_remove
from service_harness import BGREMOVE, GatewayProcess
from synthetic_models import reference_mask, write_tiny_model

TINY_SIZE = 64  # not MODEL_INPUT_SIZE: the gateway must learn it from Triton


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("cards") / "models"
    write_tiny_model(repo, size=TINY_SIZE)
    done = subprocess.run(
        [BGREMOVE, "prepare-models", "--model-repository", str(repo), "--no-fetch"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tiny: ")
    assert sorted(p.name for p in (repo / "tiny/configs").iterdir()) == [
        "cpu.pbtxt",
        "gpu-tensorrt.pbtxt",
        "gpu.pbtxt",
    ]
    return repo


@pytest.fixture(scope="module")
def tiny_gateway(tiny_repo: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(args=["--model-repository", str(tiny_repo), "--default-model", "tiny"])
    with gw.serving():
        yield gw


def test_the_carded_model_is_listed_ready(tiny_gateway: GatewayProcess) -> None:
    with grpc.insecure_channel(tiny_gateway.target) as channel:
        info = pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10)
    assert [(m.name, m.ready, m.input_size) for m in info.models] == [("tiny", True, TINY_SIZE)]
    assert info.default_model == "tiny"


def test_a_request_for_the_carded_model_returns_its_mask(
    tiny_gateway: GatewayProcess, tiny_repo: Path
) -> None:
    photo = Image.fromarray(skdata.chelsea()).convert("RGB")
    buf = io.BytesIO()
    photo.save(buf, "PNG")
    options = pb.Options(format=pb.OUTPUT_FORMAT_MASK, model="tiny")
    header, body, _ = stream_remove(tiny_gateway.target, buf.getvalue(), "image/png", options)
    assert header.model == "tiny"
    mask = np.asarray(Image.open(io.BytesIO(body)))
    assert mask.shape == (photo.height, photo.width) and mask.dtype == np.uint8

    # The card's pipeline in numpy on the original weights, upsampled as the gateway does.
    session = ort.InferenceSession(str(tiny_repo / "tiny/tiny.onnx"), providers=["CPUExecutionProvider"])
    small = reference_mask(session, to_model_input(photo, TINY_SIZE))
    assert small.shape == (TINY_SIZE, TINY_SIZE)
    expected = np.asarray(mask_to_alpha(small, photo.size))
    assert np.abs(mask.astype(int) - expected.astype(int)).mean() < 1.0
    assert iou(mask >= 128, expected >= 128) >= 0.99
    assert mask.min() < 64 and mask.max() > 192, "a real mask, not a constant"
