"""--triton-url parsing and resolution, and the Triton pool: membership as DNS answers change,
readiness, and fast refusals when no replica is up (against real ports and a real Triton)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from bgremove_gateway.errors import ServiceError
from bgremove_gateway.triton.pool import TritonPool
from bgremove_gateway.triton.targets import Target, parse_target, resolve
from service_harness import GatewayProcess, free_port


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("triton:8001", "triton", 8001),
        ("10.0.0.5:8001", "10.0.0.5", 8001),
        ("[::1]:8001", "::1", 8001),
        ("triton-headless.ns.svc.cluster.local:8001", "triton-headless.ns.svc.cluster.local", 8001),
    ],
)
def test_parse_target(url: str, host: str, port: int) -> None:
    target = parse_target(url)
    assert (target.host, target.port) == (host, port)
    assert str(target) == url


@pytest.mark.parametrize(
    "url", ["triton", "triton:", ":8001", "triton:http", "triton:70000", "::1:8001", "[::1]"]
)
def test_parse_target_names_the_bad_value(url: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_target(url)
    assert repr(url) in str(err.value) and "HOST:PORT" in str(err.value)


async def test_resolve_literal_and_name() -> None:
    assert await resolve(Target("10.1.2.3", 8001)) == ["10.1.2.3:8001"]
    assert await resolve(Target("::1", 8001)) == ["[::1]:8001"]
    assert "127.0.0.1:8001" in await resolve(Target("localhost", 8001))
    with pytest.raises(OSError):
        await resolve(Target("no-such-host.invalid", 8001))


async def test_no_replica_up_refuses_at_once_with_a_retry_hint() -> None:
    port = free_port()
    pool = TritonPool([f"127.0.0.1:{port}"], default_model="u2netp", probe_interval_s=0.2)
    await pool.start()
    try:
        assert not pool.status.ready
        assert f"127.0.0.1:{port} (health check failed: cannot connect" in pool.status.summary
        started = time.monotonic()
        with pytest.raises(ServiceError) as err:
            await pool.infer("u2netp", np.zeros((320, 320, 3), np.uint8), timeout_s=30)
        assert time.monotonic() - started < 0.5
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.retry_after_s
        assert "no Triton replica has model u2netp ready (0 of 1 Triton replicas serve u2netp" in str(
            err.value
        )
    finally:
        await pool.close()


def test_pool_refuses_bad_urls() -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        TritonPool(["triton"], default_model="u2netp")
    with pytest.raises(ValueError):
        TritonPool([], default_model="u2netp")


@pytest.mark.slow
async def test_membership_follows_dns_answers(gateway: GatewayProcess) -> None:
    """A headless Service's answers change as Triton pods come and go; the pool follows them at
    each re-resolution, and an address that two names share is one replica."""
    live = f"127.0.0.1:{gateway.triton_grpc_port}"
    dead = f"127.0.0.1:{free_port()}"
    answers: dict[str, list[str] | None] = {"triton:8001": [live], "alias:8001": [live]}

    async def dns(target: Target) -> list[str]:
        answer = answers[str(target)]
        if answer is None:
            raise OSError("Temporary failure in name resolution")
        return list(answer)

    pool = TritonPool(
        ["triton:8001", "alias:8001"],
        default_model="u2netp",
        resolve_interval_s=0.3,
        probe_interval_s=0.2,
        resolver=dns,
    )
    await pool.start()
    try:
        assert [r.address for r in pool.replicas] == [live]
        assert pool.status.ready and "u2netp" in pool.status.models
        image = np.zeros((320, 320, 3), np.uint8)
        assert (await pool.infer("u2netp", image)).shape == (320, 320)

        answers["triton:8001"] = [live, dead]
        await _until(lambda: "1 of 2 Triton replicas" in pool.status.summary)
        assert pool.status.ready, "one dead pod does not take the service down"
        for _ in range(4):
            await pool.infer("u2netp", image)  # never routed to the ejected one

        answers["triton:8001"], answers["alias:8001"] = [dead], []
        await _until(lambda: not pool.status.ready)
        assert {r.address for r in pool.replicas} == {dead}, "the live pod left DNS: retired"
        with pytest.raises(ServiceError) as err:
            await pool.infer("u2netp", image)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE

        answers["triton:8001"] = [live]
        await _until(lambda: pool.status.ready)
        assert {r.address for r in pool.replicas} == {live}
        assert (await pool.infer("u2netp", image)).shape == (320, 320)

        answers["triton:8001"] = None
        await asyncio.sleep(1.0)
        assert pool.status.ready, "a failed lookup keeps the last answer instead of emptying the pool"
    finally:
        await pool.close()


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)
