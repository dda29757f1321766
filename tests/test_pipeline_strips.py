"""A request alone in the gateway splits its model-input resize over every core; under
concurrency it does not (the cores are busy with other requests and the model, and a split only
adds work)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.config import Limits, Settings
from bgremove_gateway.pipeline import Pipeline
from bgremove_gateway.upload import unary_upload

T = TypeVar("T")


class CountingHelpers(ThreadPoolExecutor):
    """The strip pool, counting the strips handed to it."""

    def __init__(self) -> None:
        super().__init__(1)
        self.strips = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        self.strips += 1
        return super().submit(fn, *args, **kwargs)


class GatedInference:
    """Stands in for Triton; holds every call until `release` is set. `all_in` is set once
    `expected` calls are waiting."""

    def __init__(self, expected: int = 1) -> None:
        self.release = asyncio.Event()
        self.all_in = asyncio.Event()
        self.expected = expected
        self.waiting = 0

    async def infer(
        self, model: str, image: npt.NDArray[np.uint8], *, timeout_s: float | None = None
    ) -> npt.NDArray[np.uint8]:
        self.waiting += 1
        if self.waiting >= self.expected:
            self.all_in.set()
        await self.release.wait()
        return np.asarray(Image.fromarray(image).convert("L"))


@pytest.fixture
def helpers() -> Iterator[CountingHelpers]:
    with CountingHelpers() as pool:
        yield pool


@pytest.fixture(scope="module")
def photo() -> bytes:
    out = io.BytesIO()
    Image.fromarray(skdata.astronaut()).resize((1224, 817)).save(out, "JPEG", quality=90)
    return out.getvalue()


def request(data: bytes) -> pb.RemoveBackgroundRequest:
    return pb.RemoveBackgroundRequest(
        image=data, content_type="image/jpeg", options=pb.Options(format=pb.OUTPUT_FORMAT_PNG)
    )


async def test_a_request_alone_splits_its_cpu_steps(helpers: CountingHelpers, photo: bytes) -> None:
    inference = GatedInference()
    inference.release.set()
    with ThreadPoolExecutor(2) as executor:
        pipeline = Pipeline(Settings(cpu_workers=2), inference, executor, helpers)
        result = await pipeline.run(unary_upload(request(photo), Limits()))
    assert (result.header.width, result.header.height) == (1224, 817)
    assert helpers.strips == 1  # the second band of the model input


async def test_concurrent_requests_resize_whole(helpers: CountingHelpers, photo: bytes) -> None:
    inference = GatedInference(expected=2)
    with ThreadPoolExecutor(2) as executor:
        pipeline = Pipeline(Settings(cpu_workers=2), inference, executor, helpers)
        runs = [asyncio.ensure_future(pipeline.run(unary_upload(request(photo), Limits()))) for _ in range(2)]
        await asyncio.wait_for(inference.all_in.wait(), 30)
        inference.release.set()
        results = await asyncio.gather(*runs)
        assert helpers.strips == 0
        # Once the others are done, a request is alone again and splits.
        await pipeline.run(unary_upload(request(photo), Limits()))
    assert all(r.header.width == 1224 for r in results)
    assert helpers.strips == 1
