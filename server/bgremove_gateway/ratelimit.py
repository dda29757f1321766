"""Per-key admission: a token bucket for the request rate and a cap on calls in flight.

Each key has its own bucket and its own counter, so one key's flood empties only its own bucket
and fills only its own slots: the calls it gets refused cost microseconds, and the work that
reaches the model is bounded per key, which is what keeps other keys' latency (fairness).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from bgremove_gateway.errors import ServiceError
from bgremove_gateway.keys import KeyLimits

# A stream slot frees when one of the key's calls ends: about one inference on a busy CPU replica.
STREAM_RETRY_S = 0.5


class TokenBucket:
    """`rate` tokens per second up to `burst`; a request takes one."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._tokens = float(self.burst)
        self._stamp = clock()

    def reconfigure(self, rate: float, burst: int) -> None:
        self._refill()
        self.rate, self.burst = rate, max(1, burst)
        self._tokens = min(self._tokens, float(self.burst))

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self) -> float:
        """0.0 when a token was taken; otherwise the seconds until one will be there."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


@dataclass
class _KeyState:
    limits: KeyLimits
    bucket: TokenBucket | None
    in_flight: int = 0


class Admission:
    """Admits or refuses each call of a key; all state lives on the event loop's thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}

    def _state(self, key_id: str, limits: KeyLimits) -> _KeyState:
        state = self._keys.get(key_id)
        if state is None:
            bucket = TokenBucket(limits.rate, limits.burst, self._clock) if limits.rate > 0 else None
            state = self._keys[key_id] = _KeyState(limits, bucket)
        elif state.limits != limits:  # the keys file changed this key's limits
            if limits.rate <= 0:
                state.bucket = None
            elif state.bucket is None:
                state.bucket = TokenBucket(limits.rate, limits.burst, self._clock)
            else:
                state.bucket.reconfigure(limits.rate, limits.burst)
            state.limits = limits
        return state

    def in_flight(self, key_id: str) -> int:
        state = self._keys.get(key_id)
        return 0 if state is None else state.in_flight

    @contextmanager
    def admit(self, key_id: str, limits: KeyLimits) -> Iterator[None]:
        """Holds one of the key's stream slots for the body; RESOURCE_EXHAUSTED with RetryInfo
        when the key is at its cap or out of tokens. A call refused for its cap takes no token."""
        state = self._state(key_id, limits)
        if limits.max_streams and state.in_flight >= limits.max_streams:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"API key {key_id} already has {state.in_flight} calls in flight, its limit is "
                f"{limits.max_streams}; retry when one finishes",
                retry_after_s=STREAM_RETRY_S,
            )
        if state.bucket is not None:
            wait = state.bucket.take()
            if wait > 0:
                raise ServiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"API key {key_id} is over its rate limit of {limits.rate:g} requests/s "
                    f"(burst {limits.burst}); retry after the delay in RetryInfo",
                    retry_after_s=wait,
                )
        state.in_flight += 1
        try:
            yield
        finally:
            state.in_flight -= 1

    def forget(self, keep: set[str]) -> None:
        """Drops the state of keys no longer in the file (revoked or removed) once idle."""
        for key_id in [k for k, s in self._keys.items() if k not in keep and s.in_flight == 0]:
            del self._keys[key_id]
