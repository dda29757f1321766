"""`bgremove bench --protocol http`: its calls against a real HTTP listener on loopback (the app on
the real Pipeline, a fixed mask in place of Triton), each outcome counted under the gRPC code the
gateway's metrics use."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from bgremove_gateway.access.control import AccessControl, Policy
from bgremove_gateway.config import Limits, Settings
from bgremove_gateway.http.app import PATH, HttpApi, create_app
from bgremove_gateway.http.listener import HttpServer, bind
from bgremove_gateway.pipeline.contract import MODEL_INPUT_SIZE
from bgremove_gateway.pipeline.flow import Pipeline
from bgremove_gateway.runtime.budget import MemoryBudget
from bgremove_gateway.runtime.memory import IdleTrim
from bgremove_gateway.service.servicer import ServingState
from bgremove_gateway.tools.bench import Photo, http_target, interleaved
from bgremove_gateway.tools.load import http_remove


class FixedMask:
    async def infer(
        self, model: str, image: npt.NDArray[np.uint8], *, timeout_s: float | None = None
    ) -> npt.NDArray[np.uint8]:
        return np.full((MODEL_INPUT_SIZE, MODEL_INPUT_SIZE), 255, np.uint8)


def jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "JPEG")
    return out.getvalue()


@pytest.fixture
async def url() -> AsyncIterator[str]:
    settings = Settings(limits=Limits(max_upload_bytes=100_000))
    api = HttpApi(
        Pipeline(settings, FixedMask(), ThreadPoolExecutor(2)),
        ServingState(ready=True, models=["u2netp"]),
        MemoryBudget(256 << 20, 8),
        AccessControl(Policy(keys=None, client_certs=False, require_auth=False)),
        IdleTrim(trim=lambda: None),
    )
    server = HttpServer(create_app(api), bind("127.0.0.1:0"), drain_s=1)
    await server.start()
    yield f"http://127.0.0.1:{server.port}{PATH}"
    await server.stop()


async def test_http_outcomes_carry_the_gateways_codes(url: str) -> None:
    with httpx.Client() as client:
        ok = await asyncio.to_thread(http_remove, client, url, jpeg(40, 30), {"format": "png"}, 30.0)
        bad = await asyncio.to_thread(http_remove, client, url, b"not an image", {}, 30.0)
        big = await asyncio.to_thread(http_remove, client, url, b"\xff" * 200_000, {}, 30.0)
    assert ok.ok and ok.body.startswith(b"\x89PNG")
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "image_file" in bad.details
    assert big.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_the_http_target_runs_in_the_benchs_rounds(url: str) -> None:
    photos = [Photo(jpeg(64, 48), "image/jpeg", np.zeros((1, 1, 3), np.uint8))]
    target = await http_target(url, photos, concurrency=2, fmt="mask")
    try:
        (run,) = await interleaved([target], concurrency=2, requests=6, rounds=2)
    finally:
        await target.close()
    assert run.name == "http" and run.ok == 6 and run.errors == 0
