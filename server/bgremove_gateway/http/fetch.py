"""image_url and bg_image_url, fetched only from public addresses (--http-allow-urls).

A URL is a way into the gateway's network: the host is resolved here, every address it resolves to
must be public (no private, loopback, link-local, multicast or reserved address), and the connection
goes to the address that was checked, so a second lookup cannot swap in another (DNS rebinding).
Redirects are followed by hand, each target checked the same way. The body is streamed and cut off
at the upload limit, the whole fetch at a time limit, and it stays in memory.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import urllib.parse
from collections.abc import Callable
from typing import Final

import httpx

from bgremove_gateway.errors import ServiceError, invalid, too_large

MAX_REDIRECTS: Final = 3
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(address: IpAddress) -> bool:
    """Routable on the internet: not private, loopback, link-local, multicast, reserved or unspecified."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


class UrlFetcher:
    """Fetches one URL's bytes; `allowed` decides which addresses may be connected to (tests widen it)."""

    def __init__(
        self, max_bytes: int, timeout_s: float, allowed: Callable[[IpAddress], bool] = is_public
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.allowed = allowed

    async def fetch(self, name: str, url: str) -> bytes:
        try:
            return await asyncio.wait_for(self._follow(name, url), timeout=self.timeout_s)
        except asyncio.TimeoutError:  # not the builtin on Python 3.10
            raise invalid(name, f"{name} did not answer within {self.timeout_s:g} s") from None

    async def _follow(self, name: str, url: str) -> bytes:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                target, host = await self._checked(name, url)
                request = client.build_request(
                    "GET",
                    target,
                    headers={"Host": host, "Accept": "image/*"},
                    extensions={"sni_hostname": host},
                )
                try:
                    response = await client.send(request, stream=True)
                except httpx.HTTPError as exc:
                    raise invalid(name, f"{name} could not be fetched: {type(exc).__name__}") from None
                try:
                    if response.is_redirect and "location" in response.headers:
                        url = urllib.parse.urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise invalid(name, f"{name} answered HTTP {response.status_code}, not 200")
                    return await self._body(name, response)
                finally:
                    await response.aclose()
        raise invalid(name, f"{name} redirected more than {MAX_REDIRECTS} times")

    async def _body(self, name: str, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise too_large(name, f"{name} is {declared} bytes, over the limit of {self.max_bytes} bytes")
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > self.max_bytes:
                raise too_large(name, f"{name} is over the limit of {self.max_bytes} bytes")
        if not body:
            raise invalid(name, f"{name} answered an empty body")
        return bytes(body)

    async def _checked(self, name: str, url: str) -> tuple[str, str]:
        """The URL with its host replaced by a checked address, and the Host header to send."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise invalid(name, f"{name} must be an http or https URL")
        if parts.username or parts.password:
            raise invalid(name, f"{name} must not carry credentials")
        host = parts.hostname
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise invalid(name, f"{name} has an invalid port") from None
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            raise invalid(name, f"{name}'s host {host!r} does not resolve") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        blocked = [a for a in addresses if not self.allowed(a)]
        if not addresses or blocked:
            raise invalid(
                name,
                f"{name}'s host {host!r} resolves to {blocked[0] if blocked else 'nothing'}, "
                "which is not a public address: refused",
            )
        address = addresses[0]
        shown = f"[{address}]" if address.version == 6 else str(address)
        netloc = f"{shown}:{port}"
        target = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        host_header = host if parts.port is None else f"{host}:{parts.port}"
        return target, host_header


def refused(name: str) -> ServiceError:
    """The answer to a URL parameter when the operator has not allowed fetching."""
    base = name.removesuffix("_url")
    return invalid(
        name,
        f"{name} is not accepted by this service: send the image itself as {base}_file or "
        f"{base}_file_b64 (an operator can allow URLs with --http-allow-urls)",
    )
