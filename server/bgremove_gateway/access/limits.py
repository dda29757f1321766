"""Per-key admission: a token bucket for the request rate and a cap on calls in flight.

Each key has its own bucket and its own counter, so one key's flood empties only its own bucket
and fills only its own slots: the calls it gets refused cost microseconds, and the work that
reaches the model is bounded per key, which is what keeps other keys' latency (fairness).

Key guessing is limited here too, before any scrypt: failed checks per caller address and per key
id (GuessLimiter), and a short, bounded queue for the scrypt checks that do run (SlowPath).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import random
import time
import urllib.parse
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import grpc

from bgremove_gateway.access.keys import KeyLimits
from bgremove_gateway.errors import KEY_STREAMS_RETRY_AFTER_S, RETRY_SPREAD, ServiceError

# Failed key checks allowed per key id and per caller address: a burst, then a steady rate. Secrets
# are 256 random bits, so these limits are not what keeps them safe: they bound the scrypt work
# (about 50 ms of one core each) that wrong secrets can make the gateway do.
ID_FAILURE_BURST = 5
ID_FAILURE_RATE = 1.0
# Above the per-id rate, so that guessing at one id never uses up its address's budget: other keys
# sent from the same address (a NAT, a proxy, the attacker's own host) are still checked.
PEER_FAILURE_BURST = 10
PEER_FAILURE_RATE = 2.0
# An address or key id that has not asked for a scrypt check (nor been refused one) for this long
# is quiet (see GuessLimiter).
QUIET_S = 10.0
# Entries per table (about 300 bytes each): a flood of new addresses costs a few MB at most.
MAX_TRACKED = 10_000
# Scrypt checks that may wait, per lane, behind the one running: at most 2 * 8 * 50 ms of backlog.
SLOW_PATH_WAITING = 8

T = TypeVar("T")


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
        wait = self.wait()
        if wait == 0.0:
            self._tokens -= 1.0
        return wait

    def wait(self) -> float:
        """Like take, but takes nothing: 0.0 when a token is there."""
        self._refill()
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate

    def give_back(self) -> None:
        """Returns a token taken for something that turned out not to count."""
        self._tokens = min(float(self.burst), self._tokens + 1.0)

    @property
    def full(self) -> bool:
        self._refill()
        return self._tokens >= self.burst

    def allowance(self) -> Allowance:
        self._refill()
        missing = self.burst - self._tokens
        return Allowance(self.burst, math.floor(self._tokens), max(0.0, missing / self.rate))


@dataclass(frozen=True)
class Allowance:
    """What an admitted call leaves of its key's rate, for HTTP's X-RateLimit-* headers."""

    # The bucket's size (burst); 0 when the key has no rate limit.
    limit: int
    # Whole tokens left after this call took one.
    remaining: int
    # Seconds until the bucket is full again.
    reset_s: float


UNLIMITED = Allowance(limit=0, remaining=0, reset_s=0.0)


@dataclass
class _KeyState:
    limits: KeyLimits
    bucket: TokenBucket | None
    in_flight: int = 0


def over_streams(key_id: str, in_flight: int, limits: KeyLimits) -> ServiceError:
    """The refusal of a call over its key's cap of calls in flight."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"API key {key_id} already has {in_flight} calls in flight, its limit is "
        f"{limits.max_streams}; retry when one finishes",
        retry_after_s=KEY_STREAMS_RETRY_AFTER_S,
    )


def over_rate(key_id: str, limits: KeyLimits, wait: float) -> ServiceError:
    """The refusal of a call over its key's rate; `wait`: seconds until a token is there."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"API key {key_id} is over its rate limit of {limits.rate:g} requests/s "
        f"(burst {limits.burst}); retry after the delay in RetryInfo",
        retry_after_s=wait,
    )


class KeyAdmission(Protocol):
    """What access control needs of a per-key limiter: PerKeyLimiter, or SharedLimiter (Redis)."""

    def admit(self, key_id: str, limits: KeyLimits) -> AbstractAsyncContextManager[Allowance]:
        """Holds one of the key's slots for the body; RESOURCE_EXHAUSTED over its cap or rate."""
        ...

    def in_flight(self, key_id: str) -> int:
        """The key's calls in flight, as last known (to tell a cap refusal from a rate one)."""
        ...

    def forget(self, keep: set[str]) -> None:
        """Drops what is kept for keys not in `keep` (gone from the keys file)."""
        ...


class PerKeyLimiter:
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

    @asynccontextmanager
    async def admit(self, key_id: str, limits: KeyLimits) -> AsyncIterator[Allowance]:
        """Holds one of the key's stream slots for the body; RESOURCE_EXHAUSTED with RetryInfo
        when the key is at its cap or out of tokens. A call refused for its cap takes no token."""
        state = self._state(key_id, limits)
        if limits.max_streams and state.in_flight >= limits.max_streams:
            raise over_streams(key_id, state.in_flight, limits)
        if state.bucket is not None:
            wait = state.bucket.take()
            if wait > 0:
                raise over_rate(key_id, limits, wait)
        state.in_flight += 1
        try:
            yield UNLIMITED if state.bucket is None else state.bucket.allowance()
        finally:
            state.in_flight -= 1

    def forget(self, keep: set[str]) -> None:
        """Drops the state of keys no longer in the file (revoked or removed) once idle."""
        for key_id in [k for k, s in self._keys.items() if k not in keep and s.in_flight == 0]:
            del self._keys[key_id]


# --- key guessing ---------------------------------------------------------------------------------


def peer_host(peer: str) -> str:
    """Whom to count failures against, from grpc's context.peer(): "ipv4:1.2.3.4:5678" -> "1.2.3.4",
    "ipv6:[2001:db8::1]:5678" -> "2001:db8::/64" (one host usually holds a whole /64), an
    IPv4-mapped IPv6 address -> its IPv4 address, "unix:..." -> "unix"."""
    scheme, _, rest = peer.partition(":")
    rest = urllib.parse.unquote(rest)  # newer grpc writes "ipv6:%5B::1%5D:5678"
    if scheme == "ipv4":
        return rest.rsplit(":", 1)[0]
    if scheme == "ipv6":
        host = rest.rsplit(":", 1)[0] if rest.startswith("[") else rest
        host = host.strip("[]").split("%", 1)[0]  # and without a zone id
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            return host
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    if scheme in ("unix", "unix-abstract"):
        return "unix"
    return peer


@dataclass
class _Failures:
    bucket: TokenBucket
    # When this address or id last asked for a scrypt check, failed one, or was refused one.
    last_check: float = -math.inf


class FailureTable:
    """Failure buckets by address or key id, least recently used first, at most `cap` of them."""

    def __init__(
        self, burst: int, rate: float, cap: int = MAX_TRACKED, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst, self.rate, self.cap = burst, rate, max(1, cap)
        self._clock = clock
        self._entries: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _idle(self, entry: _Failures) -> bool:
        return entry.bucket.full and self._clock() - entry.last_check >= QUIET_S

    def get(self, name: str) -> _Failures:
        entry = self._entries.get(name)
        if entry is not None:
            self._entries.move_to_end(name)
            return entry
        # Idle entries hold nothing that a new one would not: they go first, then the oldest.
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if len(self._entries) < self.cap and not self._idle(oldest):
                break
            self._entries.popitem(last=False)
        entry = self._entries[name] = _Failures(TokenBucket(self.rate, self.burst, self._clock))
        return entry


@dataclass
class Attempt:
    """One scrypt check let through by GuessLimiter: its tokens stay spent unless it is refunded."""

    urgent: bool  # the id or the address has been quiet: its check goes ahead of the others
    _taken: list[TokenBucket]
    _entries: tuple[_Failures, _Failures]
    _clock: Callable[[], float] = field(repr=False)
    _admitted: float = 0.0
    _before: tuple[float, float] = (-math.inf, -math.inf)  # each entry's last_check before this one

    def refund(self) -> None:
        """The key was right, or the check never ran: it was not a failure, and it leaves the id
        and the address as quiet as they were (unless another check came meanwhile)."""
        for bucket in self._taken:
            bucket.give_back()
        self._taken.clear()
        for entry, before in zip(self._entries, self._before, strict=True):
            if entry.last_check == self._admitted:
                entry.last_check = before

    def failed(self) -> None:
        now = self._clock()
        for entry in self._entries:
            entry.last_check = now


class GuessLimiter:
    """Limits failed key checks per key id and per caller address, before any scrypt runs.

    Each check that needs scrypt takes a token from its address's bucket and, when there is one,
    from its id's; a right key gives them back, so only failures count. A check is refused with
    RESOURCE_EXHAUSTED when its address has no token, or when its id has none and the address is
    not quiet (it asked for a check, or was refused one, in the last QUIET_S): guessing at an id
    then locks out only the addresses that guess, while the key's owner calling from elsewhere
    still gets its one check through. Lives on the event loop's thread.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        id_burst: int = ID_FAILURE_BURST,
        id_rate: float = ID_FAILURE_RATE,
        peer_burst: int = PEER_FAILURE_BURST,
        peer_rate: float = PEER_FAILURE_RATE,
        max_tracked: int = MAX_TRACKED,
        min_retry_s: float = 0.0,
        retry_spread: float = RETRY_SPREAD,
    ) -> None:
        self._clock = clock
        self.ids = FailureTable(id_burst, id_rate, max_tracked, clock)
        self.peers = FailureTable(peer_burst, peer_rate, max_tracked, clock)
        self.min_retry_s, self.retry_spread = min_retry_s, retry_spread

    def admit(self, key_id: str, peer: str) -> Attempt:
        """An Attempt to check once scrypt is done, or ServiceError RESOURCE_EXHAUSTED with RetryInfo."""
        now = self._clock()
        by_id, by_peer = self.ids.get(key_id), self.peers.get(peer)
        id_quiet, peer_quiet = now - by_id.last_check >= QUIET_S, now - by_peer.last_check >= QUIET_S
        id_wait, peer_wait = by_id.bucket.wait(), by_peer.bucket.wait()
        refusal = None
        if id_wait > 0 and not peer_quiet:
            refusal = self._refusal(f"with API key id {key_id}", self.ids, id_wait)
        elif peer_wait > 0:
            refusal = self._refusal(f"from {peer}", self.peers, peer_wait)
        before = (by_id.last_check, by_peer.last_check)
        by_id.last_check = by_peer.last_check = now
        if refusal is not None:
            raise refusal
        taken = [by_peer.bucket]
        by_peer.bucket.take()
        if id_wait == 0:
            by_id.bucket.take()
            taken.append(by_id.bucket)
        return Attempt(id_quiet or peer_quiet, taken, (by_id, by_peer), self._clock, now, before)

    def _refusal(self, what: str, table: FailureTable, wait: float) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"too many failed API key checks {what}: the limit is {table.burst} at once, then "
            f"{table.rate:g} per second; retry after the delay in RetryInfo",
            retry_after_s=_spread(max(wait, self.min_retry_s), self.retry_spread),
        )


class SlowPath:
    """Runs blocking checks (scrypt) in a worker thread, `workers` at a time, with two waiting
    lanes of at most `waiting` each; urgent checks go first. A caller that finds its lane full is
    refused RESOURCE_EXHAUSTED at once rather than queued behind work it would time out on."""

    def __init__(
        self,
        waiting: int = SLOW_PATH_WAITING,
        workers: int = 1,
        min_retry_s: float = 0.0,
        retry_spread: float = RETRY_SPREAD,
    ) -> None:
        self.waiting, self.workers = waiting, workers
        self.min_retry_s, self.retry_spread = min_retry_s, retry_spread
        self._running = 0
        self._lanes: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (deque(), deque())
        self._seconds = 0.05  # a check's recent duration, for RetryInfo

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return len(self._lanes[0]) + len(self._lanes[1])

    async def run(self, fn: Callable[[], T], *, urgent: bool = False) -> T:
        await self._acquire(urgent)
        work = asyncio.get_running_loop().run_in_executor(None, _timed, fn)
        # The slot is freed when the thread is done, even if its caller went away meanwhile: never
        # more than `workers` checks run at once.
        work.add_done_callback(self._done)
        value, _ = await asyncio.shield(work)
        return value

    def _done(self, work: asyncio.Future[tuple[T, float]]) -> None:
        if not work.cancelled() and work.exception() is None:
            self._seconds = 0.8 * self._seconds + 0.2 * work.result()[1]
        self._release()

    async def _acquire(self, urgent: bool) -> None:
        if self._running < self.workers:  # then nobody waits: _release hands slots to waiters
            self._running += 1
            return
        lane = self._lanes[0 if urgent else 1]
        if len(lane) >= self.waiting:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many API key checks are waiting: {self.waiting} is the limit; "
                "retry after the delay in RetryInfo",
                retry_after_s=_spread(
                    max(self.min_retry_s, (self.queued + 1) * self._seconds), self.retry_spread
                ),
            )
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lane.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release()  # the slot came just as this caller went away: pass it on
            else:
                with contextlib.suppress(ValueError):
                    lane.remove(turn)
            raise

    def _release(self) -> None:
        for lane in self._lanes:
            while lane:
                turn = lane.popleft()
                if not turn.done():
                    turn.set_result(None)  # the slot passes to this waiter as it is
                    return
        self._running -= 1


def _spread(seconds: float, spread: float) -> float:
    return seconds * random.uniform(1.0, 1.0 + spread) if spread > 0 else seconds


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started
