"""A grpc.aio BackgroundRemoval server on its own event-loop thread, for client-side tests.

Blocking callers (the sync client, the CLI's own asyncio.run) and asyncio tests can all reach it,
since it never shares their loop.
"""

from __future__ import annotations

import asyncio
import threading

import grpc

from bgremove.v1 import bgremove_pb2_grpc


class LoopThreadServer:
    def __init__(
        self,
        servicer: bgremove_pb2_grpc.BackgroundRemovalServicer,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self._servicer = servicer
        self._credentials = credentials
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        self.target = f"127.0.0.1:{self.port}"

    async def _start(self) -> int:
        self._server = grpc.aio.server()
        bgremove_pb2_grpc.add_BackgroundRemovalServicer_to_server(self._servicer, self._server)  # type: ignore[no-untyped-call]
        if self._credentials is None:
            port = self._server.add_insecure_port("127.0.0.1:0")
        else:
            port = self._server.add_secure_port("127.0.0.1:0", self._credentials)
        await self._server.start()
        return int(port)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(None), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
