"""remove.bg's image options against the real gateway and Triton (U2-Net-P): region of interest,
crop margins, scale and position, output pixel cap, image background and the ZIP format, through
both RPCs, and their refusals with the field named."""

from __future__ import annotations

import io
import zipfile

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from e2e_helpers import jpeg_bytes, stream_remove, upload_messages
from service_harness import GatewayProcess

MiB = 1 << 20


@pytest.fixture(scope="module")
def astronaut() -> bytes:
    return jpeg_bytes(skdata.astronaut())  # 512 x 512


@pytest.fixture(scope="module")
def plain(gateway: GatewayProcess, astronaut: bytes) -> tuple[pb.ResultHeader, np.ndarray]:
    """The default cut-out: its header and RGBA pixels."""
    header, body, _ = stream_remove(gateway.target, astronaut)
    return header, np.asarray(Image.open(io.BytesIO(body)))


def box(header: pb.ResultHeader) -> tuple[int, int, int, int]:
    fg = header.foreground
    return fg.x, fg.y, fg.width, fg.height


def measured_box(alpha: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(alpha >= 128)
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def refusal(call: grpc.RpcError) -> tuple[grpc.StatusCode, str, list[str]]:
    """Status code, message and the BadRequest fields of a refused call."""
    status = rpc_status.from_call(call)  # type: ignore[arg-type]
    fields: list[str] = []
    for detail in status.details if status is not None else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return call.code(), call.details() or "", fields


def test_roi_keeps_the_models_matte_inside_and_nothing_outside(
    gateway: GatewayProcess, astronaut: bytes, plain: tuple[pb.ResultHeader, np.ndarray]
) -> None:
    _, full = plain
    roi = pb.Region(
        x1=pb.Length(px=0), y1=pb.Length(px=0), x2=pb.Length(percent=50), y2=pb.Length(percent=100)
    )
    header, body, _ = stream_remove(gateway.target, astronaut, options=pb.Options(roi=roi))
    out = np.asarray(Image.open(io.BytesIO(body)))
    assert (out[:, 256:, 3] == 0).all()
    # The model saw the whole photo: inside the region the matte is exactly the unrestricted one.
    np.testing.assert_array_equal(out[:, :256], full[:, :256])
    assert box(header) == measured_box(out[..., 3]) and header.foreground.x + header.foreground.width <= 256


def test_crop_margins_in_percent_of_the_subject(
    gateway: GatewayProcess, astronaut: bytes, plain: tuple[pb.ResultHeader, np.ndarray]
) -> None:
    full_header, _ = plain
    x, y, w, h = box(full_header)
    ten = pb.Length(percent=10)
    options = pb.Options(crop=True, crop_margins=pb.Margins(top=ten, right=ten, bottom=ten, left=ten))
    header, body, _ = stream_remove(gateway.target, astronaut, options=options)
    left, top = min(x, round(w * 0.1)), min(y, round(h * 0.1))
    right, bottom = min(512 - x - w, round(w * 0.1)), min(512 - y - h, round(h * 0.1))
    assert (header.width, header.height) == (left + w + right, top + h + bottom)
    assert box(header) == (left, top, w, h)
    assert Image.open(io.BytesIO(body)).size == (header.width, header.height)


def test_scale_and_position_place_the_subject_and_the_header_follows(
    gateway: GatewayProcess, astronaut: bytes
) -> None:
    position = pb.Position(placement=pb.PLACEMENT_PERCENT, x_percent=0, y_percent=100)
    options = pb.Options(scale_percent=50, position=position)
    header, body, _ = stream_remove(gateway.target, astronaut, options=options)
    out = np.asarray(Image.open(io.BytesIO(body)))
    assert (header.width, header.height) == (512, 512), "the canvas keeps the output size"
    x, y, w, h = box(header)
    assert (x, y, w, h) == measured_box(out[..., 3])
    assert x == 0 and y + h == 512, "bottom-left"
    assert max(w, h) == pytest.approx(256, abs=2), "the subject's longer side is half the canvas"


def test_max_output_pixels_is_remove_bgs_preview_size(gateway: GatewayProcess, astronaut: bytes) -> None:
    header, body, _ = stream_remove(gateway.target, astronaut, options=pb.Options(max_output_pixels=250_000))
    assert (header.width, header.height) == (500, 500) == Image.open(io.BytesIO(body)).size


def test_bg_image_under_the_subject_makes_an_opaque_result(
    gateway: GatewayProcess, astronaut: bytes, plain: tuple[pb.ResultHeader, np.ndarray]
) -> None:
    _, full = plain
    background = np.zeros((300, 400, 3), np.uint8)
    background[...] = (20, 40, 220)
    options = pb.Options(format=pb.OUTPUT_FORMAT_WEBP, bg_image=jpeg_bytes(background))
    header, body, _ = stream_remove(gateway.target, astronaut, options=options)
    out = np.asarray(Image.open(io.BytesIO(body)).convert("RGBA"))
    assert header.content_type == "image/webp" and (out[..., 3] == 255).all()
    gone = full[..., 3] == 0
    assert np.abs(out[..., :3][gone].astype(int) - [20, 40, 220]).max() <= 3  # the JPEG's own error
    kept = full[..., 3] == 255
    np.testing.assert_array_equal(out[..., :3][kept], full[..., :3][kept])


@pytest.mark.parametrize("fmt", [pb.OUTPUT_FORMAT_PNG, pb.OUTPUT_FORMAT_WEBP])
def test_bg_color_makes_png_and_webp_opaque(
    gateway: GatewayProcess, astronaut: bytes, plain: tuple[pb.ResultHeader, np.ndarray], fmt: int
) -> None:
    _, full = plain
    options = pb.Options(format=fmt, bg_color=pb.Color(r=0, g=255, b=0))  # type: ignore[arg-type]
    _, body, _ = stream_remove(gateway.target, astronaut, options=options)
    out = np.asarray(Image.open(io.BytesIO(body)).convert("RGBA"))
    assert (out[..., 3] == 255).all()
    assert (out[..., :3][full[..., 3] == 0] == [0, 255, 0]).all()


def test_a_bg_image_larger_than_the_unary_limit_streams_in_the_header(
    gateway: GatewayProcess, astronaut: bytes
) -> None:
    # Over 3 MiB of noise: more than a message could carry before bg_image existed.
    noise = np.random.default_rng(1).integers(0, 256, (1050, 1050, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG", compress_level=0)
    assert 3 * MiB < len(buf.getvalue()) < 4 * MiB
    options = pb.Options(format=pb.OUTPUT_FORMAT_JPEG, bg_image=buf.getvalue())
    header, body, _ = stream_remove(gateway.target, astronaut, options=options)
    assert header.content_type == "image/jpeg" and Image.open(io.BytesIO(body)).size == (512, 512)


def test_zip_is_remove_bgs_color_and_alpha_pair(
    gateway: GatewayProcess, astronaut: bytes, plain: tuple[pb.ResultHeader, np.ndarray]
) -> None:
    full_header, full = plain
    header, body, _ = stream_remove(
        gateway.target, astronaut, options=pb.Options(format=pb.OUTPUT_FORMAT_ZIP)
    )
    assert header.content_type == "application/zip" and header.size == len(body)
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        color = Image.open(io.BytesIO(archive.read("color.jpg")))
        alpha = Image.open(io.BytesIO(archive.read("alpha.png")))
        assert archive.namelist() == ["color.jpg", "alpha.png"]
    assert (color.format, color.mode, color.size) == ("JPEG", "RGB", (512, 512))
    np.testing.assert_array_equal(np.asarray(alpha), full[..., 3])
    assert box(header) == box(full_header)
    # Kept bytes: the zip is smaller than the PNG cut-out for a photo.
    assert len(body) < full_header.size


def test_unary_takes_the_options_too(gateway: GatewayProcess) -> None:
    coffee = jpeg_bytes(skdata.coffee())  # 600 x 400
    options = pb.Options(format=pb.OUTPUT_FORMAT_ZIP, crop=True, scale_percent=100, max_output_pixels=60_000)
    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        response = stub.RemoveBackground(
            pb.RemoveBackgroundRequest(content_type="image/jpeg", image=coffee, options=options), timeout=60
        )
    assert response.header.content_type == "application/zip"
    assert response.header.width * response.header.height <= 60_000
    assert zipfile.is_zipfile(io.BytesIO(response.image))


def test_service_info_reports_the_bg_image_limit_and_zip(gateway: GatewayProcess) -> None:
    with grpc.insecure_channel(gateway.target) as channel:
        info = pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10)
    assert info.limits.max_bg_image_bytes == 4 * MiB
    assert pb.OUTPUT_FORMAT_ZIP in info.output_formats


@pytest.mark.parametrize(
    ("options", "code", "field", "words"),
    [
        (
            pb.Options(roi=pb.Region(x1=pb.Length(px=600))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "options.roi",
            "512x512 image",
        ),
        (pb.Options(scale_percent=5), grpc.StatusCode.INVALID_ARGUMENT, "options.scale_percent", "10 to 100"),
        (
            pb.Options(crop=True, crop_margins=pb.Margins(top=pb.Length(percent=-3))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "options.crop_margins.top.percent",
            "0 or more",
        ),
        (
            pb.Options(position=pb.Position(placement=pb.PLACEMENT_PERCENT, x_percent=101)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "options.position.x_percent",
            "0 to 100",
        ),
        (
            pb.Options(format=pb.OUTPUT_FORMAT_MASK, bg_image=jpeg_bytes(np.zeros((8, 8, 3), np.uint8))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "options.bg_image",
            "no effect on OUTPUT_FORMAT_MASK",
        ),
        (
            pb.Options(bg_image=b"GIF89a" + bytes(64)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "options.bg_image",
            "image/gif",
        ),
        (
            pb.Options(bg_image=jpeg_bytes(np.zeros((64, 64, 3), np.uint8))[:200]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "options.bg_image",
            "corrupt or truncated",
        ),
        (
            pb.Options(bg_image=b"\xff\xd8\xff" + bytes(4 * MiB)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "options.bg_image",
            f"over the limit of {4 * MiB} bytes",
        ),
    ],
    ids=[
        "roi-empty",
        "scale",
        "negative-margin",
        "position",
        "bg-on-mask",
        "bg-gif",
        "bg-corrupt",
        "bg-size",
    ],
)
def test_refusals_name_the_field(
    gateway: GatewayProcess,
    astronaut: bytes,
    options: pb.Options,
    code: grpc.StatusCode,
    field: str,
    words: str,
) -> None:
    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.StreamRemoveBackground(upload_messages(astronaut, "image/jpeg", options), timeout=60))
    got_code, message, fields = refusal(caught.value)
    assert got_code == code and words in message and field in fields, message
