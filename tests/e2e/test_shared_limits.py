"""Per-key limits shared through Redis by two real gateways: a key's burst and its stream cap hold
across both, instead of each gateway admitting the whole of them.

Both gateways read one keys file (made with `bgremove keys add`), share one real redis-server and
reuse the session gateway's embedded Triton; raw gRPC stubs play the callers.
"""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from e2e_helpers import jpeg_bytes, upload_messages
from redis_harness import RedisServer
from service_harness import BGREMOVE, GatewayProcess, free_port

JPEG = jpeg_bytes(skdata.chelsea())
# name: (rate, burst, max streams) as given to `bgremove keys add`
KEYS = {"bursty": (0.01, 4, 0), "capped": (0, 1, 2)}


@dataclass
class Pair:
    gateways: tuple[GatewayProcess, GatewayProcess]
    keys: dict[str, str]
    redis: RedisServer
    metrics_port: int

    def bearer(self, name: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.keys[name]}")]

    def key_id(self, name: str) -> str:
        return self.keys[name].split("_")[1]


def add_key(keys_file: Path, name: str, rate: float, burst: int, max_streams: int) -> str:
    limits = ["--rate", str(rate), "--burst", str(burst), "--max-streams", str(max_streams)]
    out = subprocess.run(
        [BGREMOVE, "keys", "add", name, "--file", str(keys_file), *limits],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


@pytest.fixture(scope="module")
def pair(gateway: GatewayProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    directory = tmp_path_factory.mktemp("shared-limits")
    keys_file = directory / "keys.json"
    keys = {name: add_key(keys_file, name, *limits) for name, limits in KEYS.items()}
    metrics_port = free_port()
    with RedisServer(directory).running() as redis:
        # --limits-replicas 1: were Redis not used, each gateway would admit a key's whole limits.
        common = ["--api-keys-file", str(keys_file), "--triton-url", f"127.0.0.1:{gateway.triton_grpc_port}"]
        common += ["--limits-redis-url", redis.url, "--limits-redis-timeout", "2", "--limits-replicas", "1"]
        gateways = (
            GatewayProcess(args=[*common, "--metrics-listen", f"127.0.0.1:{metrics_port}"]),
            GatewayProcess(args=common),
        )
        for gw in gateways:
            gw.start()
        try:
            for gw in gateways:
                gw.wait_serving()
            yield Pair(gateways, keys, redis, metrics_port)
        finally:
            for gw in gateways:
                gw.stop()
    for gw in gateways:
        # Redis answered every check, and neither the keys nor anything else secret reached a log.
        log = gw.log_text()
        assert "did not answer" not in log
        assert all(key not in log and key.split("_", 2)[2] not in log for key in keys.values())


def service_info(target: str, metadata: list[tuple[str, str]]) -> str:
    """OK, or the refusal's code and details."""
    with grpc.insecure_channel(target) as channel:
        try:
            pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(
                pb.GetServiceInfoRequest(), metadata=metadata, timeout=30
            )
        except grpc.RpcError as err:
            return f"{err.code().name}: {err.details()}"
    return "OK"


def test_a_keys_burst_is_admitted_once_across_both_gateways(pair: Pair) -> None:
    """Burst 4, one token per 100 s: 4 calls in all, whichever gateway each one reaches (not 8)."""
    outcomes = [service_info(pair.gateways[i % 2].target, pair.bearer("bursty")) for i in range(8)]
    assert outcomes[:4] == ["OK"] * 4  # two on each gateway
    refusal = (
        f"RESOURCE_EXHAUSTED: API key {pair.key_id('bursty')} is over its rate limit of 0.01 requests/s "
        "(burst 4); retry after the delay in RetryInfo"
    )
    assert outcomes[4:] == [refusal] * 4


async def held_upload(release: asyncio.Event) -> AsyncIterator[pb.UploadRequest]:
    """A JPEG upload that holds its chunks back until `release`: the call stays admitted meanwhile."""
    messages = list(upload_messages(JPEG, "image/jpeg"))
    yield messages[0]
    await release.wait()
    for message in messages[1:]:
        yield message


async def test_a_keys_stream_cap_holds_across_both_gateways(pair: Pair) -> None:
    """Cap 2: one call held open on each gateway, and a third is refused on either until one ends."""
    metadata = pair.bearer("capped")
    release = asyncio.Event()
    channels = [grpc.aio.insecure_channel(gw.target) for gw in pair.gateways]
    stubs = [pb_grpc.BackgroundRemovalStub(channel) for channel in channels]

    async def call(stub: pb_grpc.BackgroundRemovalStub, requests: AsyncIterator[pb.UploadRequest]) -> int:
        size = 0
        async for message in stub.StreamRemoveBackground(requests, metadata=metadata, timeout=120):
            size += len(message.chunk)
        return size

    try:
        held = [asyncio.create_task(call(stub, held_upload(release))) for stub in stubs]
        await asyncio.sleep(1.5)  # both admitted, each waiting for its chunks
        for stub in stubs:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(stub, held_upload(release))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"API key {pair.key_id('capped')} already has 2 calls in flight, its limit is 2" in (
                caught.value.details() or ""
            )
        release.set()
        assert all(size > 0 for size in await asyncio.gather(*held))
        # The slots were freed on both gateways: two calls at once are admitted again.
        again = asyncio.Event()
        again.set()
        sizes = await asyncio.gather(*(call(stub, held_upload(again)) for stub in stubs))
        assert all(size > 0 for size in sizes)
    finally:
        release.set()
        for channel in channels:
            await channel.close()


def test_the_metrics_say_limits_are_shared(pair: Pair) -> None:
    url = f"http://127.0.0.1:{pair.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("bgremove_limits_shared_up", (("redis", f"127.0.0.1:{pair.redis.port}"),))] == 1.0
    assert samples[("bgremove_limits_fallback_decisions_total", (("outcome", "admitted"),))] == 0.0


def test_a_url_that_is_not_redis_stops_the_start_with_one_line(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    add_key(keys_file, "any", 1, 1, 1)
    args = ["--listen", f"127.0.0.1:{free_port()}", "--api-keys-file", str(keys_file), "--workers", "1"]
    args += ["--limits-redis-url", "https://user:s3cret@cache:6379", "--metrics-listen", ""]
    out = subprocess.run(
        [BGREMOVE, "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "bgremove serve: --limits-redis-url must start with redis:// or rediss://, not https://"
    )
    assert "s3cret" not in out.stderr
