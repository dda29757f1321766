"""The remove.bg options through Pipeline.run with a fixed mask in place of Triton: what the result
header says, and what the memory budget is charged for a background image and a moved subject."""

from __future__ import annotations

import asyncio
import io
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.config import Settings
from bgremove_gateway.errors import ServiceError
from bgremove_gateway.pipeline.contract import MODEL_INPUT_SIZE
from bgremove_gateway.pipeline.flow import Pipeline, Result
from bgremove_gateway.pipeline.upload import Upload
from bgremove_gateway.runtime.budget import (
    BACKGROUND_BYTES_PER_PIXEL,
    BYTES_PER_PIXEL,
    MemoryBudget,
    bg_image_bytes_estimate,
    image_bytes_estimate,
)

W, H = 400, 200


class CentredSquare:
    """Stands in for Triton: the subject is the middle half of the image on each axis."""

    async def infer(
        self, model: str, image: npt.NDArray[np.uint8], *, timeout_s: float | None = None
    ) -> npt.NDArray[np.uint8]:
        mask = np.zeros((MODEL_INPUT_SIZE, MODEL_INPUT_SIZE), np.uint8)
        quarter = MODEL_INPUT_SIZE // 4
        mask[quarter:-quarter, quarter:-quarter] = 255
        return mask


def png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def run(executor: ThreadPoolExecutor, options: pb.Options) -> tuple[Result, int]:
    """The result, and the bytes its ticket held at the end (what the call was charged)."""
    settings = Settings()
    pipeline = Pipeline(settings, CentredSquare(), executor)
    ticket = MemoryBudget(1 << 34, 4).ticket()
    upload = Upload(data=png((W, H), (120, 60, 30)), content_type="image/png", options=options)
    result = asyncio.run(pipeline.run(upload, ticket=ticket))
    return result, ticket.reserved_bytes


def box(header: pb.ResultHeader) -> tuple[int, int, int, int]:
    fg = header.foreground
    return fg.x, fg.y, fg.width, fg.height


def test_defaults_are_charged_as_before(executor: ThreadPoolExecutor) -> None:
    result, charged = run(executor, pb.Options())
    assert result.header.content_type == "image/png"
    assert box(result.header) == (100, 50, 200, 100)
    assert charged >= W * H * BYTES_PER_PIXEL[pb.OUTPUT_FORMAT_PNG]
    assert charged - W * H * BYTES_PER_PIXEL[pb.OUTPUT_FORMAT_PNG] < 1 << 20  # metadata only


def test_a_bg_image_is_decoded_composited_and_charged(executor: ThreadPoolExecutor) -> None:
    plain, plain_charge = run(executor, pb.Options())
    result, charged = run(executor, pb.Options(bg_image=png((80, 40), (0, 0, 255))))
    image = Image.open(io.BytesIO(result.data))
    pixels = np.asarray(image)
    assert image.mode == "RGBA" and (pixels[..., 3] == 255).all()
    assert pixels[0, 0, :3].tolist() == [0, 0, 255] and pixels[100, 200, :3].tolist() == [120, 60, 30]
    assert charged - plain_charge >= bg_image_bytes_estimate(80, 40) + W * H * BACKGROUND_BYTES_PER_PIXEL
    assert box(result.header) == box(plain.header)


def test_a_corrupt_bg_image_is_refused_naming_it(executor: ThreadPoolExecutor) -> None:
    with pytest.raises(ServiceError) as caught:
        run(executor, pb.Options(bg_image=png((8, 8), (1, 2, 3))[:40]))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.violations[0].field == "options.bg_image"


def test_roi_keeps_the_subject_inside_it_and_crop_follows(executor: ThreadPoolExecutor) -> None:
    roi = pb.Region(x1=pb.Length(percent=50))
    result, _ = run(executor, pb.Options(roi=roi, crop=True))
    assert (result.header.width, result.header.height) == (100, 100)
    assert box(result.header) == (0, 0, 100, 100)


def test_an_roi_empty_for_this_image_is_refused_with_its_size(executor: ThreadPoolExecutor) -> None:
    with pytest.raises(ServiceError) as caught:
        run(executor, pb.Options(roi=pb.Region(y1=pb.Length(px=H))))
    assert caught.value.violations[0].field == "options.roi"
    assert f"{W}x{H} image" in caught.value.message


def test_zip_through_the_pipeline(executor: ThreadPoolExecutor) -> None:
    result, charged = run(executor, pb.Options(format=pb.OUTPUT_FORMAT_ZIP, crop=True))
    assert result.header.content_type == "application/zip"
    assert (result.header.width, result.header.height) == (200, 100)
    with zipfile.ZipFile(io.BytesIO(result.data)) as archive:
        assert Image.open(io.BytesIO(archive.read("alpha.png"))).size == (200, 100)
    assert charged >= W * H * BYTES_PER_PIXEL[pb.OUTPUT_FORMAT_ZIP]


def test_scale_and_position_are_charged_and_the_header_follows_the_subject(
    executor: ThreadPoolExecutor,
) -> None:
    position = pb.Position(placement=pb.PLACEMENT_PERCENT, x_percent=100, y_percent=100)
    result, charged = run(executor, pb.Options(scale_percent=100, position=position))
    # 200x100 scaled by min(400/200, 200/100) = 2 fills the canvas.
    assert (result.header.width, result.header.height) == (W, H)
    assert box(result.header) == (0, 0, W, H)
    assert charged >= image_bytes_estimate(W, H, pb.OUTPUT_FORMAT_PNG, pb.Options(scale_percent=100))


def test_max_output_pixels_caps_the_result(executor: ThreadPoolExecutor) -> None:
    result, _ = run(executor, pb.Options(max_output_pixels=20_000, max_output_side=300))
    assert (result.header.width, result.header.height) == (200, 100)
    assert box(result.header) == (50, 25, 100, 50)


def test_estimates_grow_with_what_the_options_add() -> None:
    plain = image_bytes_estimate(100, 100, pb.OUTPUT_FORMAT_PNG, pb.Options())
    assert plain == image_bytes_estimate(100, 100, pb.OUTPUT_FORMAT_PNG)
    moved = image_bytes_estimate(100, 100, pb.OUTPUT_FORMAT_PNG, pb.Options(scale_percent=50))
    centred = pb.Options(position=pb.Position(placement=pb.PLACEMENT_CENTER))
    on_colour = pb.Options(bg_color=pb.Color(r=1))
    assert moved > plain
    assert image_bytes_estimate(100, 100, pb.OUTPUT_FORMAT_PNG, centred) == moved
    assert image_bytes_estimate(100, 100, pb.OUTPUT_FORMAT_PNG, on_colour) > plain
    # The MASK ignores bg_color, and so does its estimate.
    assert image_bytes_estimate(100, 100, pb.OUTPUT_FORMAT_MASK, on_colour) == image_bytes_estimate(
        100, 100, pb.OUTPUT_FORMAT_MASK
    )
