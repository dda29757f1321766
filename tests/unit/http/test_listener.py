"""The HTTP listener: a shared port (SO_REUSEPORT), uvicorn's loop-friendly serving, and the request
head timeout uvicorn lacks (a client that opens connections and never finishes a head)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from bgremove_gateway.http.listener import HttpListenError, HttpServer, bind, split_host_port


async def ok(_: object) -> Response:
    return Response(b"ok")


APP = Starlette(routes=[Route("/", ok)])


def test_addresses() -> None:
    assert split_host_port("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert split_host_port("[::1]:8080") == ("::1", 8080)
    assert split_host_port(":8080") == ("0.0.0.0", 8080)
    with pytest.raises(HttpListenError, match="not HOST:PORT"):
        split_host_port("localhost")


def test_workers_share_the_port_and_a_lone_gateway_refuses_a_taken_one() -> None:
    first = bind("127.0.0.1:0", reuse_port=True)
    port = first.getsockname()[1]
    second = bind(f"127.0.0.1:{port}", reuse_port=True)  # another worker of the same gateway
    with pytest.raises(HttpListenError, match="cannot serve HTTP"):
        bind(f"127.0.0.1:{port}")  # a second gateway must not silently share it
    first.close()
    second.close()


def exchange(port: int, data: bytes, wait_s: float = 10.0) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        started = time.monotonic()
        s.sendall(data)
        answer = b""
        try:
            while chunk := s.recv(4096):
                answer += chunk
                if answer.endswith(b"ok"):
                    break
        except TimeoutError:
            pass
        return answer, time.monotonic() - started


async def test_a_late_head_is_cut_off_and_a_prompt_one_served() -> None:
    server = HttpServer(APP, bind("127.0.0.1:0"), drain_s=1, head_timeout_s=0.5)
    await server.start()
    try:
        answer, took = await asyncio.to_thread(exchange, server.port, b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert answer == b"" and took < 3  # closed, not held until the client gives up
        answer, _ = await asyncio.to_thread(exchange, server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")
        assert b"server:" not in answer.lower()
    finally:
        await server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
