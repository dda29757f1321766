"""Per-key admission: token bucket arithmetic, the stream cap, RetryInfo, and independence of keys."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from bgremove_gateway.access.keys import KeyLimits
from bgremove_gateway.access.limits import PerKeyLimiter, TokenBucket
from bgremove_gateway.errors import KEY_STREAMS_RETRY_AFTER_S, ServiceError


class Clock:
    """Time that moves only when the test says so, so the arithmetic is exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)  # one token per 0.5 s
    clock.now += 0.25
    assert bucket.take() == pytest.approx(0.25)
    clock.now += 0.25
    assert bucket.take() == 0.0
    # A long pause refills only up to the burst.
    clock.now += 3600
    assert [bucket.take() for _ in range(4)][:3] == [0.0, 0.0, 0.0]


def retry_delay(err: ServiceError) -> float:
    info = error_details_pb2.RetryInfo()
    (detail,) = err.to_rpc_status().details
    assert detail.Unpack(info)
    return info.retry_delay.ToNanoseconds() / 1e9


async def test_over_the_rate_is_resource_exhausted_with_retry_info() -> None:
    clock = Clock()
    admission = PerKeyLimiter(clock)
    limits = KeyLimits(rate=4, burst=2, max_streams=0)
    for _ in range(2):
        async with admission.admit("aaaaaaaaaaaa", limits):
            pass
    with pytest.raises(ServiceError) as caught:
        async with admission.admit("aaaaaaaaaaaa", limits):
            pass
    err = caught.value
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "aaaaaaaaaaaa" in err.message and "4 requests/s" in err.message and "burst 2" in err.message
    assert retry_delay(err) == pytest.approx(0.25)
    clock.now += 0.25
    async with admission.admit("aaaaaaaaaaaa", limits):
        pass


async def test_stream_cap_counts_calls_in_flight_and_frees_on_exit_or_error() -> None:
    admission = PerKeyLimiter(Clock())
    limits = KeyLimits(rate=0, burst=0, max_streams=2)
    async with admission.admit("k", limits), admission.admit("k", limits):
        assert admission.in_flight("k") == 2
        with pytest.raises(ServiceError) as caught:
            async with admission.admit("k", limits):
                pass
        assert "2 calls in flight" in caught.value.message
        assert retry_delay(caught.value) == pytest.approx(KEY_STREAMS_RETRY_AFTER_S)
    assert admission.in_flight("k") == 0
    with pytest.raises(RuntimeError):
        async with admission.admit("k", limits):
            raise RuntimeError("the call failed")
    assert admission.in_flight("k") == 0


async def test_a_call_refused_for_its_cap_costs_no_token() -> None:
    admission = PerKeyLimiter(Clock())
    limits = KeyLimits(rate=1, burst=2, max_streams=1)
    async with admission.admit("k", limits):
        for _ in range(5):
            with pytest.raises(ServiceError):
                async with admission.admit("k", limits):
                    pass
    async with admission.admit("k", limits):  # the second token is still there
        pass


async def test_one_keys_flood_leaves_another_keys_budget_alone() -> None:
    admission = PerKeyLimiter(Clock())
    heavy, light = KeyLimits(rate=1, burst=1, max_streams=1), KeyLimits(rate=1, burst=1, max_streams=1)
    async with admission.admit("heavy", heavy):
        refused = 0
        for _ in range(100):
            try:
                async with admission.admit("heavy", heavy):
                    pass
            except ServiceError:
                refused += 1
        assert refused == 100
        async with admission.admit("light", light):
            assert admission.in_flight("light") == 1


async def test_new_limits_from_the_keys_file_apply_to_the_next_call() -> None:
    clock = Clock()
    admission = PerKeyLimiter(clock)
    async with admission.admit("k", KeyLimits(rate=1, burst=1, max_streams=0)):
        pass
    with pytest.raises(ServiceError):
        async with admission.admit("k", KeyLimits(rate=1, burst=1, max_streams=0)):
            pass
    async with admission.admit("k", KeyLimits(rate=0, burst=0, max_streams=0)):  # now unlimited
        pass
    admission.forget(keep=set())
    assert admission.in_flight("k") == 0


def test_bucket_wait_takes_nothing_and_give_back_stops_at_the_burst() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=2, clock=clock)
    assert bucket.full and bucket.wait() == 0.0 and bucket.wait() == 0.0
    assert bucket.take() == 0.0 and not bucket.full
    bucket.give_back()
    bucket.give_back()  # one more than was taken: still only the burst
    assert bucket.full
    assert [bucket.take() for _ in range(2)] == [0.0, 0.0]
    assert bucket.wait() == pytest.approx(0.5) and bucket.take() == pytest.approx(0.5)


async def test_an_admitted_call_learns_what_is_left_of_its_keys_rate() -> None:
    clock = Clock()
    admission = PerKeyLimiter(clock)
    limits = KeyLimits(rate=2, burst=3, max_streams=0)
    async with admission.admit("k", limits) as first:
        assert (first.limit, first.remaining, first.reset_s) == (3, 2, pytest.approx(0.5))
    async with admission.admit("k", limits) as second:
        assert (second.remaining, second.reset_s) == (1, pytest.approx(1.0))
    async with admission.admit("k", KeyLimits(rate=0, burst=0, max_streams=1)) as unlimited:
        assert unlimited.limit == 0
