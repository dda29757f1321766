"""Per-connection limits of the gRPC listener against the real gateway: one client connection cannot
take every stream, and idle connections are closed instead of held forever."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from service_harness import GatewayProcess

PER_CONNECTION = 2
# Each channel its own connection: grpc otherwise shares one between channels to the same target.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
IDLE_S = 1.5


@pytest.fixture(scope="module")
def limited(gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(
        args=[
            "--triton-url",
            f"127.0.0.1:{gateway.triton_grpc_port}",
            "--max-streams-per-connection",
            str(PER_CONNECTION),
            "--max-connection-idle",
            str(IDLE_S),
        ]
    )
    with gw.serving():
        yield gw


async def test_one_connection_gets_at_most_its_share_of_streams(limited: GatewayProcess) -> None:
    release = asyncio.Event()

    async def held() -> AsyncIterator[pb.UploadRequest]:
        await release.wait()
        return
        yield

    async with grpc.aio.insecure_channel(limited.target, options=OWN_CONNECTION) as greedy:
        stub = pb_grpc.BackgroundRemovalStub(greedy)
        calls = [stub.StreamRemoveBackground(held()) for _ in range(PER_CONNECTION)]
        await asyncio.sleep(0.5)
        # Past its share, a call on the same connection waits on the client's side or is refused...
        with pytest.raises(grpc.aio.AioRpcError) as waited:
            await stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=1.0)
        assert waited.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        # ...while another connection is served at once.
        async with grpc.aio.insecure_channel(limited.target, options=OWN_CONNECTION) as other:
            started = time.monotonic()
            info = await pb_grpc.BackgroundRemovalStub(other).GetServiceInfo(
                pb.GetServiceInfoRequest(), timeout=5
            )
            assert info.limits.upload_timeout_ms == 120_000
            assert time.monotonic() - started < 1.0
        release.set()
        for call in calls:
            assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT  # half-closed before a header


async def test_an_idle_connection_is_closed_by_the_server(limited: GatewayProcess) -> None:
    async with grpc.aio.insecure_channel(limited.target, options=OWN_CONNECTION) as channel:
        await pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(pb.GetServiceInfoRequest(), timeout=5)
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        # The server's GOAWAY after --max-connection-idle sends the channel back to IDLE.
        for _ in range(int((IDLE_S + 3) / 0.1)):
            if channel.get_state() == grpc.ChannelConnectivity.IDLE:
                break
            await asyncio.sleep(0.1)
        assert channel.get_state() == grpc.ChannelConnectivity.IDLE
        # And the client reconnects transparently for its next call.
        await pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(pb.GetServiceInfoRequest(), timeout=5)
