"""POST /v1.0/removebg in process: the Starlette app on the real Pipeline with a fixed mask in place
of Triton, driven through httpx's ASGI transport. remove.bg's request forms, its headers and error
shape, keys and rates, memory admission back at zero after every request, and no image on disk."""

from __future__ import annotations

import base64
import io
import logging
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from bgremove_gateway.access.control import AccessControl, KeyStore, Policy
from bgremove_gateway.access.keys import KeyLimits, new_key, write_keys
from bgremove_gateway.config import Limits, Settings
from bgremove_gateway.http.app import METHOD, PATH, HttpApi, create_app, http_policy
from bgremove_gateway.http.fetch import UrlFetcher
from bgremove_gateway.pipeline.contract import MODEL_INPUT_SIZE
from bgremove_gateway.pipeline.flow import Pipeline
from bgremove_gateway.runtime.budget import MemoryBudget
from bgremove_gateway.runtime.memory import IdleTrim
from bgremove_gateway.service.servicer import ServingState

MiB = 1 << 20
URL = f"http://gateway{PATH}"


class FixedMask:
    """Stands in for Triton: the subject is a centred square."""

    async def infer(
        self, model: str, image: npt.NDArray[np.uint8], *, timeout_s: float | None = None
    ) -> npt.NDArray[np.uint8]:
        mask = np.zeros((MODEL_INPUT_SIZE, MODEL_INPUT_SIZE), np.uint8)
        q = MODEL_INPUT_SIZE // 4
        mask[q:-q, q:-q] = 255
        return mask


def photo(width: int = 64, height: int = 48, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(1)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8)).save(out, fmt)
    return out.getvalue()


JPEG = photo()


class Gateway:
    def __init__(self, api: HttpApi, app_client: httpx.AsyncClient) -> None:
        self.api = api
        self.client = app_client

    async def post(self, **kw: object) -> httpx.Response:
        return await self.client.post(URL, **kw)  # type: ignore[arg-type]


def make_api(
    limits: Limits | None = None, policy: Policy | None = None, budget_bytes: int = 512 * MiB
) -> HttpApi:
    settings = Settings(limits=limits or Limits())
    pipeline = Pipeline(settings, FixedMask(), ThreadPoolExecutor(2))
    return HttpApi(
        pipeline,
        ServingState(ready=True, models=["u2netp"]),
        MemoryBudget(budget_bytes, 8),
        AccessControl(policy or Policy(keys=None, client_certs=False, require_auth=False)),
        IdleTrim(trim=lambda: None),
    )


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    api = make_api()
    transport = httpx.ASGITransport(app=create_app(api), client=("203.0.113.7", 5555))
    async with httpx.AsyncClient(transport=transport) as client:
        yield Gateway(api, client)
    assert api.budget.reserved_bytes == 0 and api.budget.streams == 0
    assert api.idle_trim.in_flight == 0


def cutout(response: httpx.Response) -> Image.Image:
    return Image.open(io.BytesIO(response.content))


async def test_multipart_image_file_answers_the_png_with_remove_bg_headers(gateway: Gateway) -> None:
    r = await gateway.post(files={"image_file": ("photo.jpg", JPEG, "image/jpeg")}, data={"size": "auto"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    image = cutout(r)
    assert image.mode == "RGBA" and image.size == (64, 48)
    assert r.headers["X-Width"] == "64" and r.headers["X-Height"] == "48"
    # The fixed mask's centred square, in the output's pixels.
    assert r.headers["X-Foreground-Left"] == "16" and r.headers["X-Foreground-Width"] == "32"
    assert r.headers["X-Foreground-Top"] == "12" and r.headers["X-Foreground-Height"] == "24"
    assert "X-Type" in r.headers
    assert "X-RateLimit-Limit" not in r.headers  # no key, no rate


async def test_base64_in_a_form_and_in_json_give_the_same_result(gateway: Gateway) -> None:
    b64 = base64.b64encode(JPEG).decode()
    form = await gateway.post(data={"image_file_b64": b64})
    body = await gateway.post(json={"image_file_b64": b64, "format": "png"})
    assert form.status_code == body.status_code == 200
    assert form.content == body.content


async def test_accept_json_answers_remove_bg_data_object(gateway: Gateway) -> None:
    r = await gateway.post(
        files={"image_file": ("x.jpg", JPEG)},
        data={"bg_color": "green"},
        headers={"Accept": "application/json"},
    )
    assert r.status_code == 200
    data = r.json()["data"]
    result = Image.open(io.BytesIO(base64.b64decode(data["result_b64"])))
    assert result.format == "JPEG"  # format=auto with a background: no transparency, so JPEG
    assert (data["width"], data["height"], data["foreground_left"]) == (64, 48, 16)


async def test_channels_alpha_answers_the_matte(gateway: Gateway) -> None:
    r = await gateway.post(files={"image_file": ("x.jpg", JPEG)}, data={"channels": "alpha"})
    assert r.status_code == 200
    assert cutout(r).mode == "L"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"size": "huge"}, "size"),
        ({"roi": "0 0 10"}, "roi"),
        ({"crop_margin": "1 2 3"}, "crop_margin"),
        ({"scale": "5%"}, "scale"),
        ({"bg_color": "notacolour"}, "bg_color"),
        ({"format": "gif"}, "format"),
        ({"frobnicate": "1"}, "frobnicate"),
    ],
)
async def test_bad_parameters_are_400_in_remove_bg_error_shape(
    gateway: Gateway, data: dict[str, str], field: str
) -> None:
    r = await gateway.post(files={"image_file": ("x.jpg", JPEG)}, data=data)
    assert r.status_code == 400
    (error,) = r.json()["errors"]
    assert error["code"] == "invalid_request" and field in error["detail"]


async def test_missing_image_names_the_parameters(gateway: Gateway) -> None:
    r = await gateway.post(data={"size": "auto"})
    assert r.status_code == 400
    assert "image_file, image_file_b64, image_url" in r.json()["errors"][0]["detail"]


async def test_not_an_image_is_400(gateway: Gateway) -> None:
    r = await gateway.post(files={"image_file": ("x.jpg", b"hello, world")})
    assert r.status_code == 400
    assert "image/jpeg" in r.json()["errors"][0]["detail"]


async def test_wrong_content_type_is_415_with_the_accepted_list(gateway: Gateway) -> None:
    r = await gateway.post(content=JPEG, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 415
    detail = r.json()["errors"][0]["detail"]
    assert "multipart/form-data" in detail and "application/json" in detail


async def test_declared_length_over_the_limit_is_413_before_the_body_is_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="bgremove.access")
    api = make_api(Limits(max_upload_bytes=1000))
    transport = httpx.ASGITransport(app=create_app(api))
    async with httpx.AsyncClient(transport=transport) as client:
        r = await client.post(URL, files={"image_file": ("x.jpg", photo(500, 500))})
    assert r.status_code == 413
    assert "over the limit of" in r.json()["errors"][0]["detail"]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "bgremove.access"]
    assert "bytes_in=0 " in line and "status=RESOURCE_EXHAUSTED" in line
    assert api.budget.reserved_bytes == 0


async def test_url_parameters_are_refused_unless_allowed(gateway: Gateway) -> None:
    r = await gateway.post(data={"image_url": "https://example.com/photo.jpg"})
    assert r.status_code == 400
    assert "--http-allow-urls" in r.json()["errors"][0]["detail"]


async def test_not_ready_is_503_with_retry_after(gateway: Gateway) -> None:
    gateway.api.state.ready = False
    r = await gateway.post(files={"image_file": ("x.jpg", JPEG)})
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1


async def test_memory_budget_full_is_503_and_never_fits_is_413() -> None:
    api = make_api(budget_bytes=2 * MiB)
    transport = httpx.ASGITransport(app=create_app(api))
    async with httpx.AsyncClient(transport=transport) as client:
        r = await client.post(URL, files={"image_file": ("x.jpg", photo(1200, 1000))})
    assert r.status_code == 413, r.text
    assert "memory budget" in r.json()["errors"][0]["detail"]
    assert api.budget.reserved_bytes == 0


class Spooled(Exception):
    pass


@pytest.fixture
def no_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any temporary file is a failure: Starlette's form parser would spool large parts to one."""

    def refuse(*args: object, **kw: object) -> None:
        raise Spooled("a temporary file was opened")

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    yield


async def test_a_large_multipart_upload_never_touches_the_disk(gateway: Gateway, no_disk: None) -> None:
    big = photo(1600, 1200, "PNG")  # several MiB: far over Starlette's 1 MiB spool threshold
    assert len(big) > 4 * MiB
    r = await gateway.post(files={"image_file": ("big.png", big)}, data={"size": "preview"})
    assert r.status_code == 200, r.text
    w, h = cutout(r).size
    assert w * h <= 250_000


async def test_access_log_has_one_line_without_file_names(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bgremove.access")
    await gateway.post(files={"image_file": ("secret-holiday.jpg", JPEG)})
    lines = [r.getMessage() for r in caplog.records if r.name == "bgremove.access"]
    assert len(lines) == 1
    assert f"method={METHOD}" in lines[0] and "status=OK" in lines[0]
    assert "peer=ipv4:203.0.113.7:5555" in lines[0]
    assert "secret-holiday" not in caplog.text


# --- keys and rates ------------------------------------------------------------------------------


@pytest.fixture
async def keyed(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, str, str]]:
    limited, limited_key = new_key("limited", KeyLimits(rate=0.01, burst=2, max_streams=0))
    free, free_key = new_key("free", KeyLimits(rate=0, burst=0, max_streams=0))
    path = tmp_path / "keys.json"
    write_keys(path, [limited, free])
    api = make_api(policy=Policy(keys=KeyStore(path), client_certs=False, require_auth=True))
    transport = httpx.ASGITransport(app=create_app(api))
    async with httpx.AsyncClient(transport=transport) as client:
        yield client, limited_key, free_key


async def test_no_key_or_wrong_key_is_403(keyed: tuple[httpx.AsyncClient, str, str]) -> None:
    client, limited_key, _ = keyed
    r = await client.post(URL, files={"image_file": ("x.jpg", JPEG)})
    assert r.status_code == 403 and "x-api-key" in r.json()["errors"][0]["detail"]
    r = await client.post(
        URL, files={"image_file": ("x.jpg", JPEG)}, headers={"X-Api-Key": limited_key + "x"}
    )
    assert r.status_code == 403 and r.json()["errors"][0]["code"] == "auth_failed"


async def test_rate_headers_count_down_then_429_with_retry_after(
    keyed: tuple[httpx.AsyncClient, str, str],
) -> None:
    client, key, _ = keyed
    files = {"image_file": ("x.jpg", JPEG)}
    first = await client.post(URL, files=files, headers={"X-Api-Key": key})
    second = await client.post(URL, files=files, headers={"Authorization": f"Bearer {key}"})
    third = await client.post(URL, files=files, headers={"X-Api-Key": key})
    assert first.status_code == second.status_code == 200
    assert [first.headers["X-RateLimit-Remaining"], second.headers["X-RateLimit-Remaining"]] == ["1", "0"]
    assert first.headers["X-RateLimit-Limit"] == "2"
    assert third.status_code == 429
    assert third.json()["errors"][0]["code"] == "rate_limit_exceeded"
    assert int(third.headers["Retry-After"]) >= 1 and third.headers["X-RateLimit-Remaining"] == "0"


async def test_a_key_without_a_rate_gets_no_rate_headers(keyed: tuple[httpx.AsyncClient, str, str]) -> None:
    client, _, key = keyed
    r = await client.post(URL, files={"image_file": ("x.jpg", JPEG)}, headers={"X-Api-Key": key})
    assert r.status_code == 200 and "X-RateLimit-Limit" not in r.headers


# --- the UI and other paths ------------------------------------------------------------------------


async def test_other_paths_and_methods_answer_in_remove_bg_shape() -> None:
    transport = httpx.ASGITransport(app=create_app(make_api()))
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get("http://gateway/")).status_code == 404
        r = await client.get(URL)
        assert r.status_code == 405 and PATH in r.json()["errors"][0]["detail"]


async def test_ui_is_served_at_root_only_when_asked() -> None:
    transport = httpx.ASGITransport(app=create_app(make_api(), ui=True))
    async with httpx.AsyncClient(transport=transport) as client:
        r = await client.get("http://gateway/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]


async def test_image_url_from_an_allowed_origin_is_removed(gateway: Gateway) -> None:
    """The allowed path, with the test-only override that lets the fetcher reach loopback."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(JPEG)))
            self.end_headers()
            self.wfile.write(JPEG)

        def log_message(self, *args: object) -> None:
            pass

    origin = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    try:
        gateway.api.fetcher = UrlFetcher(1 << 20, 5.0, allowed=lambda address: address.is_loopback)
        url = f"http://127.0.0.1:{origin.server_address[1]}/photo.jpg"
        r = await gateway.post(data={"image_url": url, "bg_color": "fff"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/jpeg" and r.headers["X-Width"] == "64"
    finally:
        origin.shutdown()
        origin.server_close()


@pytest.mark.parametrize(
    ("listen", "insecure", "client_certs", "required"),
    [
        ("127.0.0.1:8080", False, False, False),  # make run: loopback, no key needed
        ("0.0.0.0:8080", False, False, True),  # off loopback: a key, as the gRPC listener asks
        ("0.0.0.0:8080", True, False, False),  # --insecure: a trusted network
        ("127.0.0.1:8080", False, True, True),  # callers known by certificate: none over HTTP
        ("127.0.0.1:8080", True, True, True),
    ],
)
def test_http_policy_follows_the_grpc_listeners_rules(
    listen: str, insecure: bool, client_certs: bool, required: bool
) -> None:
    grpc_policy = Policy(keys=None, client_certs=client_certs, require_auth=False)
    policy = http_policy(grpc_policy, listen, insecure)
    assert policy.require_auth is required and policy.client_certs is False


async def test_a_certificate_only_gateway_refuses_http_callers() -> None:
    api = make_api(
        policy=http_policy(Policy(keys=None, client_certs=True, require_auth=False), "127.0.0.1:1", False)
    )
    transport = httpx.ASGITransport(app=create_app(api))
    async with httpx.AsyncClient(transport=transport) as client:
        r = await client.post(URL, files={"image_file": ("x.jpg", JPEG)})
    assert r.status_code == 403 and r.json()["errors"][0]["code"] == "auth_failed"
