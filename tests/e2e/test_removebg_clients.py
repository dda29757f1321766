"""A client library written for remove.bg, unchanged but for its base URL, against the gateway.

The library is PyPI's `removebg` 0.04 (github.com/brilam/remove-bg), pinned in the dev extras. It
keeps remove.bg's address in one module constant, `removebg.removebg.API_ENDPOINT`, and offers no
setting for it: the test replaces that constant (as a user would) and calls the library's own
methods. Everything else (multipart `image_file`, `image_file_b64`, `size`, `bg_color`, the
`X-Api-Key` header, writing the result next to the input) is the library's own code.
"""

from __future__ import annotations

import base64
import io
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from removebg import removebg as removebg_module  # type: ignore[import-untyped]
from scipy.ndimage import binary_erosion

from service_harness import GatewayProcess, free_port

PHOTO = "anime-girl-1.jpg"
# remove.bg's "regular" size: at most 0.25 megapixels.
REGULAR_PIXELS = 250_000


@pytest.fixture(scope="module")
def base_url(gateway: GatewayProcess) -> Iterator[str]:
    """A gateway serving the HTTP API, sharing the session gateway's Triton."""
    port = free_port()
    gw = GatewayProcess(
        args=["--http-listen", f"127.0.0.1:{port}", "--triton-url", f"127.0.0.1:{gateway.triton_grpc_port}"]
    )
    with gw.serving():
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # any HTTP answer (405 to a GET) says the listener is up
            try:
                urllib.request.urlopen(url + "/v1.0/removebg", timeout=10).close()
                break
            except urllib.error.HTTPError:
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield url


@pytest.fixture
def client(base_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> removebg_module.RemoveBg:
    # The one change: the library's own endpoint constant, pointed at this gateway.
    monkeypatch.setattr(removebg_module, "API_ENDPOINT", base_url + "/v1.0/removebg")
    return removebg_module.RemoveBg("any-key-no-keys-file-here", str(tmp_path / "removebg-errors.log"))


def _alpha(image: Image.Image) -> np.ndarray[Any, np.dtype[np.uint8]]:
    return np.asarray(image.getchannel("A"))


def _iou(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_a_file_comes_back_as_a_regular_size_cutout(
    client: removebg_module.RemoveBg, peer_fixtures: Path, tmp_path: Path
) -> None:
    photo = tmp_path / PHOTO
    photo.write_bytes((peer_fixtures / PHOTO).read_bytes())
    client.remove_background_from_img_file(str(photo), size="regular")

    # The library's own naming: the input's path with "_no_bg.png" appended.
    with Image.open(tmp_path / f"{PHOTO}_no_bg.png") as result:
        assert result.format == "PNG" and result.mode == "RGBA"
        width, height = result.size
        assert width * height <= REGULAR_PIXELS, "size=regular is at most 0.25 MP"
        assert abs(width / height - 850 / 601) < 0.01, "the photo's aspect ratio is kept"
        assert width * height > 0.9 * REGULAR_PIXELS, "and as large as regular allows"
        mask = _alpha(result) > 127
    # rembg's own expected U2-Net-P cut-out of this photo, brought to the same size.
    with Image.open(peer_fixtures / "anime-girl-1.u2netp.png") as reference:
        expected = _alpha(reference.resize((width, height), Image.Resampling.BILINEAR)) > 127
    assert _iou(mask, expected) >= 0.98


def test_base64_with_a_named_background_colour_comes_back_as_jpeg_on_that_colour(
    client: removebg_module.RemoveBg, peer_fixtures: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the library writes new_file_name relative to the working directory
    photo = (peer_fixtures / PHOTO).read_bytes()
    client.remove_background_from_base64_img(
        base64.b64encode(photo).decode(), size="regular", new_file_name="on-red.jpg", bg_color="red"
    )
    data = (tmp_path / "on-red.jpg").read_bytes()
    with Image.open(io.BytesIO(data)) as result:
        # format=auto (the library sends none): no transparency left, so remove.bg's rule gives JPEG.
        assert result.format == "JPEG" and result.mode == "RGB"
        pixels = np.asarray(result).astype(np.int16)
    with Image.open(peer_fixtures / "anime-girl-1.u2netp.png") as reference:
        background = _alpha(reference.resize(result.size, Image.Resampling.BILINEAR)) == 0
    # Well inside the background (JPEG blurs edges, masks differ by a pixel or two): pure red.
    inside = binary_erosion(background, iterations=8)
    assert inside.sum() > 1000
    red = pixels[inside]
    assert np.all(np.abs(red - np.array([255, 0, 0])) <= 12), red.mean(axis=0)


def test_a_refusal_reaches_the_library_as_remove_bgs_error(
    client: removebg_module.RemoveBg, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"not a photo\n" * 50)
    # The library raises requests' HTTPError on any 4xx (raise_for_status) before reading the body.
    with pytest.raises(requests.HTTPError) as refused:
        client.remove_background_from_img_file(str(notes))
    response = refused.value.response
    assert response is not None
    assert response.status_code == 400
    error = response.json()["errors"][0]
    assert error["code"] and error["title"]
    assert "image_file" in error["detail"], error
