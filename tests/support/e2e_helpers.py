"""Small helpers shared by the end-to-end tests: raw-stub calls and the reference U2-Net pipeline."""

from __future__ import annotations

import importlib.util
import io
from functools import cache
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from PIL import ExifTags, Image, ImageCms

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from bgremove_gateway.tools.load import upload_messages as upload_messages  # the bench's own


def stream_remove(
    target: str,
    data: bytes,
    content_type: str = "image/jpeg",
    options: pb.Options | None = None,
    **kw: object,
) -> tuple[pb.ResultHeader, bytes, list[int]]:
    """Returns the result header, the reassembled bytes and the size of every result chunk."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        header: pb.ResultHeader | None = None
        parts: list[bytes] = []
        for msg in stub.StreamRemoveBackground(
            upload_messages(data, content_type, options), timeout=120, **kw
        ):
            if msg.HasField("header"):
                assert header is None, "two result headers"
                header = msg.header
            else:
                assert header is not None, "chunk before the result header"
                parts.append(msg.chunk)
        assert header is not None
        return header, b"".join(parts), [len(p) for p in parts]


def jpeg_bytes(array: npt.NDArray[np.uint8], quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def u2netp_path() -> Path:
    spec = importlib.util.find_spec("rembg")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "u2netp.onnx"


def u2net_path() -> Path:
    """rembg's raw u2net.onnx as `prepare-models` fetched it: checksum-verified, from the cache
    (downloaded once if the cache is empty)."""
    from bgremove_gateway.triton.graph import fetch_u2net

    return fetch_u2net()


@cache
def _session(model: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    # Two threads keep the full U2-Net's reference at ~1 s an image; the result does not depend on it.
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def reference_mask(image: Image.Image, model: Path | None = None) -> npt.NDArray[np.uint8]:
    """The U-2-Net/rembg reference: original weights (`model`, default U2-Net-P's u2netp.onnx;
    rembg's u2net session has the same pre- and post-processing), batch 1, numpy pre- and
    post-processing."""
    session = _session(model or u2netp_path())
    im = image.convert("RGB").resize((320, 320), Image.Resampling.LANCZOS)
    x = np.asarray(im).astype(np.float32)
    x = x / max(float(x.max()), 1e-6)
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    tensor = x.transpose(2, 0, 1)[np.newaxis].astype(np.float32)
    pred = session.run(None, {session.get_inputs()[0].name: tensor})[0][:, 0]
    pred = (pred - pred.min()) / max(float(pred.max() - pred.min()), 1e-6)
    small = Image.fromarray((pred[0] * 255).astype(np.uint8), mode="L")
    return np.asarray(small.resize(image.size, Image.Resampling.LANCZOS))


def iou(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def phone_metadata() -> dict[str, object]:
    """Save() keywords for what a phone puts in a photo: EXIF orientation 6 (display rotated 90
    degrees clockwise), camera and GPS tags, an ICC profile and XMP, with marker strings
    ("SecretCam", "secret-xmp") to look for in outputs."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = "SecretCam"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (48.0, 51.0, 29.5)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    xmp = b"<x:xmpmeta xmlns:x='adobe:ns:meta/'>secret-xmp</x:xmpmeta>"
    return {"exif": exif, "icc_profile": icc, "xmp": xmp}
