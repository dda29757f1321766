"""A server that refuses an upload at once, before the client has sent it all: what an overloaded
gateway does. grpc.aio may then lose the server's status (grpc/grpc#36066); the AsyncClient must
still give the caller something it can act on: the real status, or a retryable UNKNOWN, never a
bare INTERNAL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from bgremove import AsyncClient, BgRemoveError, Client
from bgremove.errors import LOST_STATUS_RETRY_AFTER_S
from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc
from bgremove_gateway.errors import ServiceError

BUSY = ServiceError(
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    "too many concurrent streams: 1 open, the limit is 1",
    retry_after_s=1.0,
)
# Far beyond HTTP/2's flow-control window: the client is still writing when the refusal arrives.
UPLOAD = b"\xff\xd8\xff" + bytes(8 << 20)


class Busy(bgremove_pb2_grpc.BackgroundRemovalServicer):
    async def StreamRemoveBackground(
        self, request_iterator: AsyncIterator[pb.UploadRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ResultChunk]:
        status = rpc_status.to_status(BUSY.to_rpc_status())
        await context.abort(status.code, status.details, status.trailing_metadata)
        yield pb.ResultChunk()  # unreachable: makes this an async generator like the gateway's


@pytest.fixture
async def busy_server() -> AsyncIterator[str]:
    server = grpc.aio.server()
    bgremove_pb2_grpc.add_BackgroundRemovalServicer_to_server(Busy(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def test_async_client_refused_mid_upload_gets_a_retryable_error(busy_server: str) -> None:
    seen: set[tuple[str, float | None]] = set()
    async with AsyncClient(busy_server, timeout=30) as client:
        for _ in range(20):
            with pytest.raises(BgRemoveError) as err:
                await client.remove(UPLOAD, content_type="image/jpeg")
            seen.add((err.value.code.name, err.value.retry_after_s))
            if err.value.code == grpc.StatusCode.UNKNOWN:
                assert "grpc/grpc#36066" in err.value.message
    assert seen <= {("RESOURCE_EXHAUSTED", 1.0), ("UNKNOWN", LOST_STATUS_RETRY_AFTER_S)}, seen


async def test_sync_client_always_gets_the_servers_status(busy_server: str) -> None:
    def calls() -> list[BgRemoveError]:
        errors = []
        with Client(busy_server, timeout=30) as client:
            for _ in range(5):
                with pytest.raises(BgRemoveError) as err:
                    client.remove(UPLOAD, content_type="image/jpeg")
                errors.append(err.value)
        return errors

    # The blocking client in a thread: the server runs on this test's event loop.
    for error in await asyncio.to_thread(calls):
        assert (error.code, error.message, error.retry_after_s) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            BUSY.message,
            1.0,
        )
