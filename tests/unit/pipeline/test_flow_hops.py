"""Pipeline.run's CPU steps, two to an executor hop: each step still timed on its own, and a call
that is cancelled mid-hop waits for its thread but starts none of the hop's later steps."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.config import Settings
from bgremove_gateway.pipeline import flow
from bgremove_gateway.pipeline.contract import MODEL_INPUT_SIZE
from bgremove_gateway.pipeline.decode import DecodedImage, decode
from bgremove_gateway.pipeline.flow import Pipeline
from bgremove_gateway.pipeline.upload import Upload
from bgremove_gateway.runtime.metrics import STEP_SECONDS

CPU_STEPS = ("decode", "preprocess", "postprocess", "encode")


class FullMask:
    async def infer(
        self, model: str, image: npt.NDArray[np.uint8], *, timeout_s: float | None = None
    ) -> npt.NDArray[np.uint8]:
        return np.full((MODEL_INPUT_SIZE, MODEL_INPUT_SIZE), 255, np.uint8)


def jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(out, "JPEG")
    return out.getvalue()


def upload() -> Upload:
    return Upload(data=jpeg(), content_type="image/jpeg", options=pb.Options(format=pb.OUTPUT_FORMAT_PNG))


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def step_counts() -> dict[str, float]:
    counts = {}
    for metric in STEP_SECONDS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                counts[sample.labels["step"]] = sample.value
    return {step: counts.get(step, 0.0) for step in CPU_STEPS}


def test_each_cpu_step_is_timed_once_per_call(executor: ThreadPoolExecutor) -> None:
    before = step_counts()
    result = asyncio.run(Pipeline(Settings(), FullMask(), executor).run(upload()))
    after = step_counts()
    assert result.header.content_type == "image/png" and (result.header.width, result.header.height) == (
        64,
        48,
    )
    assert {step: after[step] - before[step] for step in CPU_STEPS} == dict.fromkeys(CPU_STEPS, 1.0)


def test_a_cancelled_call_waits_for_its_hop_and_starts_none_of_its_later_steps(
    executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    preprocessed: list[Image.Image] = []

    def slow_decode(*args: object, **kwargs: object) -> DecodedImage:
        entered.set()
        release.wait(10)
        return decode(*args, **kwargs)  # type: ignore[arg-type]

    def record(image: Image.Image, size: int) -> npt.NDArray[np.uint8]:
        preprocessed.append(image)
        return np.zeros((size, size, 3), np.uint8)

    monkeypatch.setattr(flow, "decode", slow_decode)
    monkeypatch.setattr(flow, "to_model_input", record)

    async def scenario() -> None:
        call = asyncio.ensure_future(Pipeline(Settings(), FullMask(), executor).run(upload()))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        call.cancel()
        await asyncio.sleep(0.2)
        assert not call.done(), "the call ended while its decode thread still ran"
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(scenario())
    assert preprocessed == []
