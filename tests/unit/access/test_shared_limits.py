"""Per-key limits shared through a real redis-server: the Lua scripts (bucket, cap, leases), two
limiters as two replicas, and the fallback to this replica's share when Redis is stopped or hung."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from redis.asyncio import Redis

from bgremove_gateway.access.keys import KeyLimits
from bgremove_gateway.access.limits import Allowance
from bgremove_gateway.access.shared_limits import (
    ADMIT_LUA,
    SharedLimiter,
    SharedLimitsError,
    key_names,
    redis_target,
    share,
)
from bgremove_gateway.errors import KEY_STREAMS_RETRY_AFTER_S, ServiceError
from bgremove_gateway.runtime import metrics
from redis_harness import RedisServer
from service_harness import free_port

# Generous for a shared 2-core machine: these tests are about decisions, not speed.
TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")).running() as server:
        yield server


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def limiters(
    redis_server: RedisServer, raw: Redis
) -> AsyncIterator[tuple[SharedLimiter, SharedLimiter]]:
    """Two replicas' limiters on one Redis."""
    pair = tuple(SharedLimiter(redis_server.url, timeout_s=TIMEOUT_S, lease_s=0.6) for _ in range(2))
    yield pair  # type: ignore[misc]
    for limiter in pair:
        await limiter.close()


def retry_delay(err: ServiceError) -> float:
    info = error_details_pb2.RetryInfo()
    (detail,) = err.to_rpc_status().details
    assert detail.Unpack(info)
    return float(info.retry_delay.ToNanoseconds()) / 1e9


async def admitted(limiter: SharedLimiter, key_id: str, limits: KeyLimits) -> Allowance:
    async with limiter.admit(key_id, limits) as allowance:
        return allowance


async def refused(limiter: SharedLimiter, key_id: str, limits: KeyLimits) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        async with limiter.admit(key_id, limits):
            pass
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    return caught.value


def sample(name: str, labels: dict[str, str]) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def fallbacks(outcome: str) -> float:
    return sample("bgremove_limits_fallback_decisions_total", {"outcome": outcome})


async def test_a_burst_then_the_rate_with_the_local_limiters_message_and_retry_info(
    limiters: tuple[SharedLimiter, SharedLimiter],
) -> None:
    limiter, _ = limiters
    limits = KeyLimits(rate=2, burst=3, max_streams=0)
    assert [(await admitted(limiter, "aaaaaaaaaaaa", limits)).remaining for _ in range(3)] == [2, 1, 0]
    err = await refused(limiter, "aaaaaaaaaaaa", limits)
    assert err.message == (
        "API key aaaaaaaaaaaa is over its rate limit of 2 requests/s (burst 3); "
        "retry after the delay in RetryInfo"
    )
    wait = retry_delay(err)
    assert 0.3 < wait <= 0.5  # one token per 0.5 s, less the time since the third call
    await asyncio.sleep(wait + 0.02)
    allowance = await admitted(limiter, "aaaaaaaaaaaa", limits)
    assert allowance.limit == 3 and allowance.remaining == 0 and 1.0 < allowance.reset_s <= 1.5


async def test_two_replicas_share_one_bucket(limiters: tuple[SharedLimiter, SharedLimiter]) -> None:
    """Burst 4 and a rate too low to refill: 4 calls in all, not 4 per replica."""
    limits = KeyLimits(rate=0.001, burst=4, max_streams=0)
    outcomes = []
    for i in range(8):
        try:
            await admitted(limiters[i % 2], "bbbbbbbbbbbb", limits)
            outcomes.append("ok")
        except ServiceError:
            outcomes.append("refused")
    assert outcomes == ["ok"] * 4 + ["refused"] * 4


async def test_the_stream_cap_holds_across_replicas_and_frees_on_exit_or_error(
    limiters: tuple[SharedLimiter, SharedLimiter], raw: Redis
) -> None:
    a, b = limiters
    limits = KeyLimits(rate=0, burst=0, max_streams=2)
    async with a.admit("cccccccccccc", limits), b.admit("cccccccccccc", limits):
        for limiter in (a, b):
            err = await refused(limiter, "cccccccccccc", limits)
            assert err.message == (
                "API key cccccccccccc already has 2 calls in flight, its limit is 2; retry when one finishes"
            )
            assert retry_delay(err) == pytest.approx(KEY_STREAMS_RETRY_AFTER_S)
            assert limiter.in_flight("cccccccccccc") == 2  # what tells access control it was the cap
    assert await raw.zcard(key_names("cccccccccccc")[1]) == 0
    with pytest.raises(RuntimeError):
        async with a.admit("cccccccccccc", limits), b.admit("cccccccccccc", limits):
            raise RuntimeError("the calls failed")
    assert await raw.zcard(key_names("cccccccccccc")[1]) == 0
    assert a.in_flight("cccccccccccc") == 0  # a released last and saw none left
    async with a.admit("cccccccccccc", limits), b.admit("cccccccccccc", limits):
        assert b.in_flight("cccccccccccc") == 2


async def test_a_refusal_for_the_cap_takes_no_token(limiters: tuple[SharedLimiter, SharedLimiter]) -> None:
    a, b = limiters
    limits = KeyLimits(rate=0.001, burst=2, max_streams=1)
    async with a.admit("dddddddddddd", limits):
        for _ in range(3):
            assert "calls in flight" in (await refused(b, "dddddddddddd", limits)).message
    assert (await admitted(b, "dddddddddddd", limits)).remaining == 0  # the second of the burst


async def test_a_dead_replicas_slot_expires_with_its_lease(
    limiters: tuple[SharedLimiter, SharedLimiter], raw: Redis
) -> None:
    """A replica that ran the admit script and died never releases: its lease frees the slot."""
    _, survivor = limiters
    limits = KeyLimits(rate=0, burst=0, max_streams=1)
    tokens, calls = key_names("eeeeeeeeeeee")
    verdict = await raw.eval(ADMIT_LUA, 2, tokens, calls, 0, 0, 1, "dead-replicas-call", 0.6)  # type: ignore[misc]
    assert verdict[0] == 2
    await refused(survivor, "eeeeeeeeeeee", limits)
    await asyncio.sleep(0.7)
    await admitted(survivor, "eeeeeeeeeeee", limits)
    assert await raw.zcard(calls) == 0


async def test_a_running_calls_lease_is_renewed(limiters: tuple[SharedLimiter, SharedLimiter]) -> None:
    a, b = limiters  # leases of 0.6 s, renewed every 0.2 s
    limits = KeyLimits(rate=0, burst=0, max_streams=1)
    async with a.admit("ffffffffffff", limits):
        await asyncio.sleep(1.5)
        await refused(b, "ffffffffffff", limits)
    await admitted(b, "ffffffffffff", limits)


async def test_a_cancelled_call_releases_its_slot(
    limiters: tuple[SharedLimiter, SharedLimiter], raw: Redis
) -> None:
    a, _ = limiters
    limits = KeyLimits(rate=0, burst=0, max_streams=1)
    entered = asyncio.Event()

    async def call() -> None:
        async with a.admit("111111111111", limits):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(call())
    await entered.wait()
    assert await raw.zcard(key_names("111111111111")[1]) == 1
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()  # cancelled again while it releases: the release goes on in its own task
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)
    assert await raw.zcard(key_names("111111111111")[1]) == 0


async def test_scripts_are_loaded_again_after_a_script_flush(
    limiters: tuple[SharedLimiter, SharedLimiter], raw: Redis
) -> None:
    a, _ = limiters
    limits = KeyLimits(rate=1, burst=5, max_streams=1)
    assert (await admitted(a, "222222222222", limits)).remaining == 4
    await raw.script_flush()  # as a Redis restart or failover does: EVALSHA gets NOSCRIPT
    assert (await admitted(a, "222222222222", limits)).remaining == 3
    assert a.up


def test_each_replicas_share_is_rounded_up_and_never_zero() -> None:
    assert share(KeyLimits(rate=3, burst=5, max_streams=1), 3) == KeyLimits(rate=1, burst=2, max_streams=1)
    assert share(KeyLimits(rate=0, burst=0, max_streams=0), 4) == KeyLimits(0, 0, 0)  # unlimited stays so
    limits = KeyLimits(rate=10, burst=20, max_streams=4)
    assert share(limits, 1) is limits


def test_the_redis_url_is_checked_and_named_without_its_password() -> None:
    assert redis_target("rediss://user:s3cret@cache.internal:6380/2") == "cache.internal:6380/2"
    assert redis_target("redis://:s3cret@10.0.0.5") == "10.0.0.5:6379"
    for url, words in [
        ("http://cache:6379", "must start with redis:// or rediss://, not http://"),
        ("cache:6379", "must start with redis:// or rediss://"),
        ("redis://:s3cret@cache:port", "port that is not a number"),
    ]:
        with pytest.raises(SharedLimitsError) as caught:
            SharedLimiter(url, timeout_s=0.05)
        assert words in str(caught.value) and "s3cret" not in str(caught.value)
    with pytest.raises(SharedLimitsError, match="--limits-replicas must be 1 or more, not 0"):
        SharedLimiter("redis://cache", timeout_s=0.05, replicas=0)


async def test_redis_stopped_then_back_falls_back_to_the_share_and_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two replicas' worth of share (burst 4 -> 2 here) while Redis is gone, with one warning for
    many calls and the metrics saying so; Redis again as soon as it answers."""
    server = RedisServer(tmp_path)
    limits = KeyLimits(rate=0.001, burst=4, max_streams=0)
    with server.running():
        limiter = SharedLimiter(server.url, timeout_s=TIMEOUT_S, replicas=2, probe_interval_s=0.3)
        up = {"redis": limiter.target}
        await limiter.start()
        assert limiter.up and sample("bgremove_limits_shared_up", up) == 1.0
        assert (await admitted(limiter, "333333333333", limits)).remaining == 3
    admitted_before, refused_before = fallbacks("admitted"), fallbacks("refused")
    with caplog.at_level(logging.INFO, logger="bgremove.auth"):
        outcomes = []
        for _ in range(4):
            try:
                await admitted(limiter, "444444444444", limits)
                outcomes.append("ok")
            except ServiceError as err:
                outcomes.append(err.message)
        assert outcomes[:2] == ["ok", "ok"]
        assert (
            outcomes[2]
            == outcomes[3]
            == (
                "API key 444444444444 is over its rate limit of 0.0005 requests/s (burst 2); "
                "retry after the delay in RetryInfo"
            )
        )
        assert not limiter.up and sample("bgremove_limits_shared_up", up) == 0.0
        assert fallbacks("admitted") == admitted_before + 2 and fallbacks("refused") == refused_before + 2
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert f"Redis at {limiter.target} did not answer" in warnings[0]
        assert "share (1/2) of its limits" in warnings[0]
        with server.running():
            await asyncio.sleep(0.35)  # past the probe interval: the next call asks Redis again
            assert (await admitted(limiter, "444444444444", limits)).remaining == 3  # Redis's bucket
            assert limiter.up and sample("bgremove_limits_shared_up", up) == 1.0
            assert any("answers again" in r.getMessage() for r in caplog.records)
            await limiter.close()


async def test_the_password_in_the_url_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    limiter = SharedLimiter(f"redis://:s3cret@127.0.0.1:{free_port()}/0", timeout_s=TIMEOUT_S)
    with caplog.at_level(logging.INFO, logger="bgremove.auth"):
        await limiter.start()
        await admitted(limiter, "666666666666", KeyLimits(rate=1, burst=1, max_streams=1))
    await limiter.close()
    assert not limiter.up and caplog.records
    assert all("s3cret" not in r.getMessage() for r in caplog.records)


async def test_a_hung_redis_costs_one_timeout_then_the_share_decides(tmp_path: Path) -> None:
    limits = KeyLimits(rate=0, burst=0, max_streams=3)
    with RedisServer(tmp_path).running() as server:
        limiter = SharedLimiter(server.url, timeout_s=0.1, replicas=3, probe_interval_s=60)
        await limiter.start()
        await admitted(limiter, "555555555555", limits)
        server.pause()
        started = time.monotonic()
        async with limiter.admit("555555555555", limits):
            took = time.monotonic() - started
            assert 0.1 <= took < 0.5  # one timeout, then the share: cap ceil(3/3) = 1
            err = await refused(limiter, "555555555555", limits)  # no wait: Redis is down until probed
            assert err.message.endswith(
                "already has 1 calls in flight, its limit is 1; retry when one finishes"
            )
            assert limiter.in_flight("555555555555") >= limits.max_streams  # reported as the cap
        assert time.monotonic() - started < 0.5
        server.resume()
        await limiter.close()


class SlowReplies:
    """A TCP proxy to Redis that holds each reply back `delay_s` (settable at any time): commands
    run at once, their answers come late (a Redis far away, a congested link)."""

    def __init__(self, port: int) -> None:
        self.port, self.delay_s = port, 0.0
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.pipes:
            task.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.port)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, slow: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    await asyncio.sleep(self.delay_s if slow else 0.0)
                    w.write(data)
                    await w.drain()
            w.close()

        for task in (
            asyncio.create_task(pipe(client_r, redis_w, False)),
            asyncio.create_task(pipe(redis_r, client_w, True)),
        ):
            self.pipes.add(task)


async def test_a_check_whose_answer_came_too_late_gives_its_slot_back(
    redis_server: RedisServer, raw: Redis
) -> None:
    """Redis took a token and a slot, but its answer missed the timeout: the call was decided on the
    share, and the slot Redis holds for it is released at once rather than left to its lease."""
    limits = KeyLimits(rate=0.001, burst=5, max_streams=1)
    tokens, calls = key_names("777777777777")
    proxy = SlowReplies(redis_server.port)
    async with proxy as url:
        limiter = SharedLimiter(url, timeout_s=0.1, probe_interval_s=60)
        await limiter.start()  # connected: a check is then one round trip
        proxy.delay_s = 0.3
        async with limiter.admit("777777777777", limits):
            assert not limiter.up
        await asyncio.sleep(1.5)  # the release's own connection, at 0.3 s a round trip
        assert float(await raw.hget(tokens, "tokens") or 0) == pytest.approx(4, abs=0.01)  # it ran
        assert await raw.zcard(calls) == 0  # and its slot is free again
        await limiter.close()
