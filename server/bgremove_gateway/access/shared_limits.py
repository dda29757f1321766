"""Per-key limits shared by every gateway replica, held in Redis (--limits-redis-url).

Each key's token bucket and its calls in flight live in Redis, checked and taken by one Lua script
per call, so N replicas admit a key's rate and stream cap once, not N times. A call's slot is a
member of a sorted set scored by its lease's end, renewed while the call runs: the slots of a
replica that dies (or of a release that never reached Redis) expire on their own.

When Redis does not answer within --limits-redis-timeout, the call is decided by this replica
alone, on its share of the key's limits (divided by --limits-replicas), with a warning and a
metric; Redis is tried again at most once a second and used again as soon as it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from bgremove_gateway.access.keys import KeyLimits
from bgremove_gateway.access.limits import UNLIMITED, Allowance, PerKeyLimiter, over_rate, over_streams
from bgremove_gateway.errors import ServiceError
from bgremove_gateway.runtime import metrics

log = logging.getLogger("bgremove.auth")

# A call's slot outlives its replica by at most this long; renewed every third of it.
LEASE_S = 30.0
# While Redis does not answer, one call per interval tries it; the others go straight to the share.
PROBE_INTERVAL_S = 1.0
# While Redis does not answer, one warning per interval at most (and one when it goes).
WARN_INTERVAL_S = 60.0
# The first connection (TCP, maybe TLS, AUTH) gets longer than one call's check.
CONNECT_TIMEOUT_S = 2.0
PREFIX = "bgremove:limits:"

# Refill and take a token, and take a slot under the cap, atomically. Time is Redis's (TIME), so
# the replicas' clocks need not agree. Reply: {verdict, in flight, wait or remaining, reset}, the
# verdict 0 (at the cap), 1 (out of tokens) or 2 (admitted); fractions as strings (Lua numbers
# would come back truncated to integers).
ADMIT_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, cap = tonumber(ARGV[1]), math.max(1, tonumber(ARGV[2])), tonumber(ARGV[3])
local lease = tonumber(ARGV[5])
local in_flight = 0
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  in_flight = redis.call('ZCARD', KEYS[2])
  if in_flight >= cap then
    return {0, in_flight, '0', '0'}
  end
end
local remaining, reset = 0, '0'
if rate > 0 then
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
  local tokens = tonumber(state[1]) or burst
  local stamp = tonumber(state[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
  if tokens < 1 then
    return {1, in_flight, string.format('%.6f', (1 - tokens) / rate), '0'}
  end
  tokens = tokens - 1
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'stamp', string.format('%.6f', now))
  -- no entry means a full bucket: it may go once it would be full again
  redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
  remaining = math.floor(tokens)
  reset = string.format('%.6f', (burst - tokens) / rate)
end
if cap > 0 then
  redis.call('ZADD', KEYS[2], string.format('%.6f', now + lease), ARGV[4])
  redis.call('PEXPIRE', KEYS[2], math.ceil(lease * 1000) + 1000)
  in_flight = in_flight + 1
end
return {2, in_flight, tostring(remaining), reset}
"""

# Extends a running call's lease; XX: a call already released (or expired) is not brought back.
RENEW_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease = tonumber(ARGV[2])
local renewed = redis.call('ZADD', KEYS[1], 'XX', 'CH', string.format('%.6f', now + lease), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(lease * 1000) + 1000)
return renewed
"""

# Frees a call's slot; reply: the key's calls still in flight.
RELEASE_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(t[1]) + tonumber(t[2]) / 1000000)
return redis.call('ZCARD', KEYS[1])
"""

ADMITTED, OVER_RATE, OVER_STREAMS = 2, 1, 0


class SharedLimitsError(ValueError):
    """A --limits-* value the gateway cannot start with; one line, never the URL's password."""


def redis_target(url: str) -> str:
    """What logs and metrics call the Redis of `url`: host:port (and db), never its credentials.
    SharedLimitsError when `url` is not redis:// or rediss://."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise SharedLimitsError(
            f"--limits-redis-url must start with redis:// or rediss://, not {parts.scheme or 'nothing'}://"
        )
    try:
        port = parts.port or 6379
    except ValueError:
        raise SharedLimitsError("--limits-redis-url has a port that is not a number") from None
    if not parts.hostname:
        raise SharedLimitsError("--limits-redis-url names no host")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    db = parts.path.strip("/")
    return f"{host}:{port}" + (f"/{db}" if db and db != "0" else "")


def share(limits: KeyLimits, replicas: int) -> KeyLimits:
    """One replica's share of a key's limits: each divided by `replicas`, rounded up, never 0."""
    if replicas <= 1:
        return limits
    return KeyLimits(
        rate=limits.rate / replicas,
        burst=math.ceil(limits.burst / replicas),
        max_streams=math.ceil(limits.max_streams / replicas),
    )


def key_names(key_id: str) -> tuple[str, str]:
    """The key's bucket and its calls in flight; one hash tag, so Redis Cluster keeps them together."""
    return f"{PREFIX}{{{key_id}}}:tokens", f"{PREFIX}{{{key_id}}}:calls"


class SharedLimiter:
    """KeyAdmission (see limits.py) with its state in Redis, falling back to this replica's share."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        replicas: int = 1,
        lease_s: float = LEASE_S,
        probe_interval_s: float = PROBE_INTERVAL_S,
        warn_interval_s: float = WARN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = redis_target(url)
        if timeout_s <= 0:
            raise SharedLimitsError(f"--limits-redis-timeout must be above 0 seconds, not {timeout_s:g}")
        if replicas < 1:
            raise SharedLimitsError(f"--limits-replicas must be 1 or more, not {replicas}")
        self.timeout_s, self.replicas, self.lease_s = timeout_s, replicas, lease_s
        self.probe_interval_s, self.warn_interval_s = probe_interval_s, warn_interval_s
        self._password = urllib.parse.urlsplit(url).password
        self._clock = clock
        # No retries inside redis-py, and each wait bounded by wait_for: a check waits one timeout at
        # most, then the share decides; a release, off the call's path, may take longer.
        self._redis = Redis.from_url(
            url,
            socket_timeout=max(timeout_s, CONNECT_TIMEOUT_S),
            socket_connect_timeout=max(timeout_s, CONNECT_TIMEOUT_S),
            retry=Retry(NoBackoff(), 0),
        )
        self._admit = self._redis.register_script(ADMIT_LUA)
        self._renew = self._redis.register_script(RENEW_LUA)
        self._release = self._redis.register_script(RELEASE_LUA)
        self._local = PerKeyLimiter(clock)
        self._in_flight: dict[str, int] = {}  # per key, what the last decision saw
        self.up = True
        self._next_probe = 0.0
        self._last_warning = -math.inf
        self._local_decisions = 0  # since the last warning
        self._releases: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Connects and loads the scripts, so the first call pays for neither; Redis down here is
        only a warning."""
        try:
            await asyncio.wait_for(self._load_scripts(), max(self.timeout_s, CONNECT_TIMEOUT_S))
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._down(exc)
            return
        log.info("per-key limits shared through Redis at %s", self.target)
        self._back()

    async def _load_scripts(self) -> None:
        for script in (ADMIT_LUA, RENEW_LUA, RELEASE_LUA):
            await self._redis.script_load(script)

    async def close(self) -> None:
        """Waits for the releases under way (CONNECT_TIMEOUT_S at most), then closes the connections;
        a release still unanswered is left to its lease."""
        if self._releases:
            await asyncio.wait(set(self._releases), timeout=max(self.timeout_s, CONNECT_TIMEOUT_S))
        for release in set(self._releases):
            release.cancel()
        await self._redis.aclose()

    def in_flight(self, key_id: str) -> int:
        """The key's calls in flight across the replicas, as the last decision on it saw them."""
        return self._in_flight.get(key_id, 0)

    def forget(self, keep: set[str]) -> None:
        """Drops what this replica keeps of keys gone from the file; their Redis entries expire."""
        self._local.forget(keep)
        for key_id in [k for k in self._in_flight if k not in keep]:
            del self._in_flight[key_id]

    @asynccontextmanager
    async def admit(self, key_id: str, limits: KeyLimits) -> AsyncIterator[Allowance]:
        """As PerKeyLimiter.admit, counted in Redis for every replica at once."""
        if limits.rate <= 0 and not limits.max_streams:
            yield UNLIMITED
            return
        call_id = secrets.token_hex(8)
        reply = await self._ask(key_id, limits, call_id)
        if reply is None:
            async with self._fallback(key_id, limits) as allowance:
                yield allowance
            return
        verdict, in_flight, number, reset = int(reply[0]), int(reply[1]), float(reply[2]), float(reply[3])
        self._in_flight[key_id] = in_flight
        if verdict == OVER_STREAMS:
            raise over_streams(key_id, in_flight, limits)
        if verdict == OVER_RATE:
            raise over_rate(key_id, limits, number)
        allowance = Allowance(max(1, limits.burst), int(number), reset) if limits.rate > 0 else UNLIMITED
        if not limits.max_streams:
            yield allowance
            return
        renewer = asyncio.create_task(self._keep_leased(key_id, call_id))
        try:
            yield allowance
        finally:
            renewer.cancel()
            # Its own task, so a second cancellation of this call cannot stop the release midway.
            await asyncio.shield(self._release_soon(key_id, call_id, self.timeout_s))

    async def _ask(self, key_id: str, limits: KeyLimits, call_id: str) -> list[Any] | None:
        """The admit script's reply; None when Redis is taken to be down or does not answer in time."""
        now = self._clock()
        if not self.up:
            if now < self._next_probe:
                return None
            self._next_probe = now + self.probe_interval_s  # this call is the probe: the rest wait
        args = (limits.rate, limits.burst, limits.max_streams, call_id, self.lease_s)
        try:
            reply: list[Any] = await asyncio.wait_for(
                self._admit(keys=key_names(key_id), args=args), self.timeout_s
            )
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._down(exc)
            if limits.max_streams:  # a slow Redis may still have run it: give the slot back
                self._release_soon(key_id, call_id, max(self.timeout_s, CONNECT_TIMEOUT_S))
            return None
        self._back()
        return reply

    def _release_soon(self, key_id: str, call_id: str, timeout_s: float) -> asyncio.Task[None]:
        """Frees the call's slot in a task of its own, which close() waits for."""
        release = asyncio.create_task(self._free(key_id, call_id, timeout_s))
        self._releases.add(release)
        release.add_done_callback(self._releases.discard)
        return release

    @asynccontextmanager
    async def _fallback(self, key_id: str, limits: KeyLimits) -> AsyncIterator[Allowance]:
        """This replica alone decides, on its share of the key's limits."""
        self._local_decisions += 1
        async with contextlib.AsyncExitStack() as stack:
            try:
                allowance = await stack.enter_async_context(
                    self._local.admit(key_id, share(limits, self.replicas))
                )
            except ServiceError:
                metrics.limits_fallback("refused")
                # Its share's calls times the replicas: the estimate that tells a cap refusal apart.
                self._in_flight[key_id] = self._local.in_flight(key_id) * self.replicas
                raise
            metrics.limits_fallback("admitted")
            yield allowance

    async def _keep_leased(self, key_id: str, call_id: str) -> None:
        """Renews the call's lease while it runs; a renewal Redis misses is left to the next one."""
        calls = key_names(key_id)[1]
        while True:
            await asyncio.sleep(self.lease_s / 3)
            with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._renew(keys=(calls,), args=(call_id, self.lease_s)), self.timeout_s
                )

    async def _free(self, key_id: str, call_id: str, timeout_s: float) -> None:
        """Frees the call's slot; when Redis misses this, the lease frees it (LEASE_S at most)."""
        try:
            left = await asyncio.wait_for(
                self._release(keys=(key_names(key_id)[1],), args=(call_id,)), timeout_s
            )
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._down(exc)
            return
        self._in_flight[key_id] = int(left)

    def _down(self, exc: BaseException) -> None:
        now = self._clock()
        if self.up or now - self._last_warning >= self.warn_interval_s:
            since = (
                f"; {self._local_decisions} calls decided here since the last warning" if not self.up else ""
            )
            log.warning(
                "shared per-key limits: Redis at %s did not answer (%s); each key gets this replica's "
                "share (1/%d) of its limits until it does%s",
                self.target,
                self._describe(exc),
                self.replicas,
                since,
            )
            self._last_warning, self._local_decisions = now, 0
        if self.up:
            self._next_probe = now + self.probe_interval_s
        self.up = False
        metrics.limits_shared_up(self.target, False)

    def _back(self) -> None:
        if not self.up:
            log.info("shared per-key limits: Redis at %s answers again; limits are shared again", self.target)
        self.up = True
        metrics.limits_shared_up(self.target, True)

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, asyncio.TimeoutError) and not str(exc):
            return f"no answer within {self.timeout_s:g} s"
        text = f"{type(exc).__name__}: {exc}"
        return text.replace(self._password, "***") if self._password else text
