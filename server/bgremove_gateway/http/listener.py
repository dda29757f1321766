"""The HTTP API's listener: a socket bound here (with SO_REUSEPORT in a gateway's worker processes, which
share the port), served by uvicorn on the gateway's own event loop, drained on SIGTERM with gRPC.

uvicorn's request lines (which would carry query strings) are off: access/log.py writes the one
access line per request. Its signal handlers are off too: the gateway's serve() owns SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Final

import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("bgremove.gateway")

# One request's headers, all together (h11's limit; uvicorn answers 431-like errors by closing).
MAX_HEADER_BYTES: Final = 16 * 1024
BACKLOG: Final = 1024
# A request head (request line and headers) must be complete this long after the connection opens
# or the previous answer ends; uvicorn itself waits forever for one (a slowloris holds the socket).
HEAD_TIMEOUT_S: Final = 10.0
STARTED_POLL_S: Final = 0.01


class HttpListenError(ValueError):
    """--http-listen cannot be used; one line that says why."""


def split_host_port(address: str) -> tuple[str, int]:
    """ "127.0.0.1:8080" -> ("127.0.0.1", 8080); "[::1]:8080" -> ("::1", 8080); ":8080" -> all."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise HttpListenError(f"--http-listen {address!r} is not HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


def bind(address: str, reuse_port: bool = False) -> socket.socket:
    """A listening socket on `address`; with `reuse_port` (the workers of one gateway, --workers) it
    is shared by every process that binds it so, without it a taken port is refused."""
    host, port = split_host_port(address)
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise HttpListenError(f"cannot serve HTTP on {address}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(where)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise HttpListenError(
            f"cannot serve HTTP on {address}: {exc.strerror or exc} "
            "(pick another --http-listen, or give it empty to serve none)"
        ) from None
    return sock


class _HeadTimeout(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is late (HEAD_TIMEOUT_S)."""

    head_timeout_s = HEAD_TIMEOUT_S
    _head_timer: asyncio.TimerHandle | None = None

    def _waiting_for_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _late(self) -> None:
        self._head_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if not self._waiting_for_head():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._waiting_for_head() and not self.transport.is_closing():  # no pipelined request began
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the gateway's serve() handles signals and calls stop()


class HttpServer:
    """uvicorn serving `app` on `sock`; stop() lets requests in flight finish for `drain_s`."""

    def __init__(
        self, app: Starlette, sock: socket.socket, drain_s: float, head_timeout_s: float = HEAD_TIMEOUT_S
    ) -> None:
        self.sock = sock
        protocol = type("HeadTimeout", (_HeadTimeout,), {"head_timeout_s": head_timeout_s})
        config = uvicorn.Config(
            app,
            http=protocol,
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            timeout_graceful_shutdown=max(1, int(drain_s)),
        )
        self.server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()
                raise HttpListenError("the HTTP server ended as it started")
            await asyncio.sleep(STARTED_POLL_S)

    async def stop(self) -> None:
        if self._task is None:
            self.sock.close()
            return
        self.server.should_exit = True
        try:
            await self._task
        except Exception:
            log.exception("the HTTP server failed while stopping")
        finally:
            self.sock.close()
