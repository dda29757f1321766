"""image_url fetching: only public addresses by default, checked on every redirect, bounded in size.

A real HTTP server on loopback plays both the forbidden target and, with the test-only `allowed`
override, an allowed origin (nothing here reaches the internet)."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from bgremove_gateway.errors import ServiceError
from bgremove_gateway.http.fetch import UrlFetcher, is_public

BODY = b"\xff\xd8\xff" + b"x" * 5000


class Origin:
    def __init__(self) -> None:
        self.hits: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits.append(self.path)
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", self.path.removeprefix("/redirect"))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path == "/missing":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
                self.wfile.write(BODY)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def origin() -> Iterator[Origin]:
    o = Origin()
    yield o
    o.server.shutdown()
    o.server.server_close()


def loopback_only(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return address.is_loopback


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("224.0.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
    ],
)
def test_only_public_addresses_are_allowed(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public


async def test_loopback_is_refused_before_any_connection(origin: Origin) -> None:
    fetcher = UrlFetcher(max_bytes=1 << 20, timeout_s=5)
    for url in (f"{origin.base}/photo.jpg", origin.base.replace("127.0.0.1", "localhost") + "/photo.jpg"):
        with pytest.raises(ServiceError) as err:
            await fetcher.fetch("image_url", url)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a public address" in err.value.message
    assert origin.hits == []


async def test_an_allowed_origin_is_fetched_in_memory(origin: Origin) -> None:
    fetcher = UrlFetcher(max_bytes=1 << 20, timeout_s=5, allowed=loopback_only)
    assert await fetcher.fetch("image_url", f"{origin.base}/photo.jpg") == BODY


async def test_redirects_are_followed_and_each_target_checked(origin: Origin) -> None:
    fetcher = UrlFetcher(max_bytes=1 << 20, timeout_s=5, allowed=loopback_only)
    assert await fetcher.fetch("image_url", f"{origin.base}/redirect/photo.jpg") == BODY
    # The same redirect, but now the target's address is not allowed: refused before connecting.
    strict = UrlFetcher(max_bytes=1 << 20, timeout_s=5, allowed=lambda a: a.is_loopback and not origin.hits)
    origin.hits.clear()
    with pytest.raises(ServiceError, match="not a public address"):
        await strict.fetch("image_url", f"{origin.base}/redirect/photo.jpg")
    assert origin.hits == ["/redirect/photo.jpg"]


async def test_too_large_non_200_and_bad_schemes_are_refused(origin: Origin) -> None:
    small = UrlFetcher(max_bytes=100, timeout_s=5, allowed=loopback_only)
    with pytest.raises(ServiceError) as err:
        await small.fetch("bg_image_url", f"{origin.base}/photo.jpg")
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 100 bytes" in err.value.message
    fetcher = UrlFetcher(max_bytes=1 << 20, timeout_s=5, allowed=loopback_only)
    with pytest.raises(ServiceError, match="HTTP 404"):
        await fetcher.fetch("image_url", f"{origin.base}/missing")
    for url in ("file:///etc/passwd", "ftp://example.com/x.jpg", "http://user:pw@example.com/x.jpg"):
        with pytest.raises(ServiceError) as err:
            await fetcher.fetch("image_url", url)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
