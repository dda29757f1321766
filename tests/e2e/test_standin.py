"""The `instant` stand-in through the real gateway and Triton: served only when asked for, its
masks come back through the real pre- and post-processing, and `bgremove bench --model instant`
measures the gateway's ceiling (images a second and CPU per request) in one command."""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from e2e_helpers import jpeg_bytes, stream_remove
from service_harness import BGREMOVE, GatewayProcess


def _models(target: str) -> dict[str, bool]:
    with grpc.insecure_channel(target) as channel:
        info = pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(pb.GetServiceInfoRequest(), timeout=30)
    return {m.name: m.ready for m in info.models}


@pytest.fixture(scope="module")
def instant_gateway(prepared_repo: Path) -> Iterator[GatewayProcess]:
    with GatewayProcess(args=["--load-model", "instant", "--log-level", "WARNING"]).serving() as gw:
        yield gw


def test_the_default_gateway_does_not_serve_the_stand_in(gateway: GatewayProcess) -> None:
    assert "instant" not in _models(gateway.target)


def test_load_model_serves_it_beside_the_default_models(instant_gateway: GatewayProcess) -> None:
    models = _models(instant_gateway.target)
    assert models["instant"] and models["u2netp"]


def test_its_mask_is_a_centred_subject_at_the_photos_size(instant_gateway: GatewayProcess) -> None:
    photo = skdata.chelsea()  # 451x300
    options = pb.Options(format=pb.OUTPUT_FORMAT_MASK, model="instant")
    header, body, _ = stream_remove(instant_gateway.target, jpeg_bytes(photo), "image/jpeg", options)
    assert (header.model, header.width, header.height) == ("instant", 451, 300)
    mask = np.asarray(Image.open(io.BytesIO(body)))
    assert mask.shape == (300, 451)
    assert mask[140:160, 215:235].min() > 200 and mask[:10, :10].max() < 60


def test_bench_measures_the_gateways_ceiling_in_one_command(prepared_repo: Path, tmp_path: Path) -> None:
    (tmp_path / "coffee.jpg").write_bytes(jpeg_bytes(skdata.coffee()))
    argv = [BGREMOVE, "bench", "--model", "instant", "--images", str(tmp_path), "--concurrency", "2"]
    out = subprocess.run(
        [*argv, "--requests", "8", "--json"],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    (service,) = report["runs"]
    assert service["statuses"] == {"OK": 8}
    # The gateway did real work for each call (decode, resize, encode: milliseconds of CPU), and a
    # core's worth of it carries that many images a second.
    assert 1 < service["gateway_cpu_ms_per_request"] < 5000
    assert service["gateway_cores_used"] > 0
    per_core = report["ratios"]["images_per_s_per_gateway_core"]
    assert per_core == pytest.approx(1000 / service["gateway_cpu_ms_per_request"], rel=0.01)
    # What the gateway burns idle is measured first and taken out of the net figure.
    assert report["ratios"]["gateway_idle_cores"] >= 0
    net = report["ratios"]["gateway_cpu_ms_per_request_net_of_idle"]
    assert 0 < net <= service["gateway_cpu_ms_per_request"] + 0.01
