"""Triton endpoints: parse a --triton-url, resolve it to the addresses of every replica behind it.

A Kubernetes headless Service answers DNS with one address per ready pod, so one name stands for
the whole Triton fleet; the pool dials each address itself rather than letting one HTTP/2
connection pin all its calls to whichever pod answered first.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

MAX_PORT = 65535


@dataclass(frozen=True)
class Target:
    """One --triton-url: an IP literal (one replica) or a DNS name (as many as it resolves to)."""

    host: str
    port: int

    def __str__(self) -> str:
        return address(self.host, self.port)

    @property
    def is_literal(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def address(host: str, port: int) -> str:
    """host:port as gRPC dials it; IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_target(url: str) -> Target:
    """HOST:PORT or [IPV6]:PORT; the error names the value and the expected form."""
    text = url.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        ok = bool(sep) and rest.startswith(":")
    else:
        host, sep, port_text = text.rpartition(":")
        ok = bool(sep) and ":" not in host
    if not ok or not host or not port_text.isdigit() or not 0 < int(port_text) <= MAX_PORT:
        raise ValueError(f"--triton-url {url!r} is not HOST:PORT (e.g. triton:8001 or [::1]:8001)")
    return Target(host, int(port_text))


async def resolve(target: Target) -> list[str]:
    """Every address `target` stands for, sorted and without duplicates. getaddrinfo blocks, so it
    runs in the loop's default executor; an unknown name raises OSError (socket.gaierror)."""
    if target.is_literal:
        return [str(target)]
    infos = await asyncio.get_running_loop().getaddrinfo(
        target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return sorted({address(str(info[4][0]), target.port) for info in infos})
