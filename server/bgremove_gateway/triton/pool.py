"""A pool of Triton replicas: membership from --triton-url (re-resolved), health probes, the
choice of replica for each call, and retry on another replica when one dies under a call.

Retry policy (inference is idempotent and the upload is already in memory, so the caller never
re-sends):
- a call that fails because its replica is gone, exiting or lost the model (UNAVAILABLE, a reset
  or closed stream, "unknown model" from a Triton unloading on shutdown, a Triton-side INTERNAL)
  is tried on another replica, up to MAX_ATTEMPTS replicas, within the request's deadline;
- a full Triton queue ("Exceeds maximum queue size") is NOT retried elsewhere: the replica chosen
  was already the least loaded one, so the fleet is at capacity, and moving the call would only
  push that overload onto the next queue. The caller gets RESOURCE_EXHAUSTED with a RetryInfo
  hint at once;
- a passed deadline (ours, or Triton's queue timeout that carries it) and a request Triton refuses
  as malformed are answered as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import numpy.typing as npt
from opentelemetry import trace

from bgremove_gateway.errors import NOT_READY_RETRY_AFTER_S, ServiceError
from bgremove_gateway.pipeline.contract import MODEL_INPUT_SIZE
from bgremove_gateway.runtime import metrics
from bgremove_gateway.triton.client import Failure, InferError, TritonInference
from bgremove_gateway.triton.replica import ReplicaState, pick
from bgremove_gateway.triton.targets import Target, parse_target, resolve

log = logging.getLogger("bgremove.backends")

MAX_ATTEMPTS = 3
# Re-resolution asked for by an ejection waits at least this long after the previous one.
MIN_RESOLVE_GAP_S = 1.0

Resolver = Callable[[Target], Awaitable[list[str]]]


@dataclass
class _Member:
    state: ReplicaState
    client: TritonInference


@dataclass(frozen=True)
class PoolStatus:
    """What health and GetServiceInfo report: the default model is served when any replica has it."""

    ready: bool
    models: tuple[str, ...]
    summary: str
    # (model, input side) for the ready models whose side Triton's metadata gave, by name.
    input_sizes: tuple[tuple[str, int], ...] = ()


class TritonPool:
    def __init__(
        self,
        urls: Sequence[str],
        *,
        default_model: str,
        infer_timeout_s: float = 60.0,
        resolve_interval_s: float = 10.0,
        probe_interval_s: float = 1.0,
        probe_timeout_s: float = 1.0,
        resolver: Resolver = resolve,
        admin_key: str | None = None,
    ) -> None:
        if not urls:
            raise ValueError("at least one --triton-url is needed")
        self.targets = [parse_target(u) for u in urls]  # ValueError names the bad one
        self.default_model = default_model
        self.infer_timeout_s = infer_timeout_s
        self.resolve_interval_s = resolve_interval_s
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self._resolver = resolver
        # Sent to every replica on every call: opens the APIs a locked-down Triton restricts.
        self._admin_key = admin_key
        self._members: dict[str, _Member] = {}
        self._known: dict[Target, list[str]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._resolve_soon = asyncio.Event()
        self._last_resolve = 0.0
        self.changed = asyncio.Event()
        self._status = PoolStatus(False, (), "no Triton replica probed yet")
        self._size_warned: set[tuple[str, str]] = set()  # (replica, model) whose size is unknown

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Resolves and probes once (so the first status is real), then keeps both up to date."""
        await self._resolve_all()
        await self.probe_all()
        self._tasks.append(asyncio.create_task(self._probe_loop(), name="triton-pool-probe"))
        if not all(t.is_literal for t in self.targets):
            self._tasks.append(asyncio.create_task(self._resolve_loop(), name="triton-pool-resolve"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for member in list(self._members.values()):
            await member.client.close()
        self._members.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # ------------------------------------------------------------------ status

    @property
    def status(self) -> PoolStatus:
        return self._status

    @property
    def replicas(self) -> list[ReplicaState]:
        return [m.state for m in self._members.values()]

    def _publish(self) -> None:
        states = [m.state for m in self._members.values() if not m.state.retiring]
        serving = [s for s in states if s.usable(self.default_model)]
        models = sorted({m for s in states if not s.ejected for m in s.ready_models})
        down = [f"{s.address} ({s.reason})" for s in states if s.ejected]
        summary = f"{len(serving)} of {len(states)} Triton replicas serve {self.default_model}"
        if not states:
            names = ", ".join(str(t) for t in self.targets)
            summary = f"no Triton replica: {names} resolved to no address"
        elif down:
            summary += "; down: " + ", ".join(down)
        # Replicas serve the same repository, so they agree; if one does not, the last one wins.
        sizes = {m: n for s in states if not s.ejected for m, n in s.input_sizes.items()}
        status = PoolStatus(bool(serving), tuple(models), summary, tuple(sorted(sizes.items())))
        if status != self._status:
            self.changed.set()
        self._status = status

    # ------------------------------------------------------------------ membership

    async def _resolve_loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._resolve_soon.wait(), self.resolve_interval_s)
            self._resolve_soon.clear()
            await asyncio.sleep(max(0.0, self._last_resolve + MIN_RESOLVE_GAP_S - time.monotonic()))
            await self._resolve_all()
            await self.probe_all()

    async def _resolve_all(self) -> None:
        self._last_resolve = time.monotonic()
        for target in self.targets:
            try:
                self._known[target] = await self._resolver(target)
            except OSError as exc:
                # A DNS hiccup must not empty the pool: keep what this name resolved to last.
                log.warning("cannot resolve Triton %s (%s); keeping %s", target, exc, self._known.get(target))
        wanted: dict[str, str] = {}
        for target in self.targets:
            for addr in self._known.get(target, []):
                wanted.setdefault(addr, str(target))
        for addr, source in wanted.items():
            member = self._members.get(addr)
            if member is None:
                client = TritonInference(addr, timeout_s=self.infer_timeout_s, admin_key=self._admin_key)
                self._members[addr] = _Member(ReplicaState(addr, source), client)
                log.info("Triton replica %s added (from %s)", addr, source)
            elif member.state.retiring:
                member.state.retiring = False
        for addr, member in list(self._members.items()):
            if addr not in wanted and not member.state.retiring:
                member.state.retiring = True
                log.info("Triton replica %s is gone from DNS: no new calls go to it", addr)
                self._retire_if_idle(member)
        self._publish()

    def _retire_if_idle(self, member: _Member) -> None:
        if member.state.retiring and member.state.inflight == 0:
            self._members.pop(member.state.address, None)
            # Closed in the background: this runs in an infer call's finally, maybe while cancelled.
            task = asyncio.create_task(member.client.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # ------------------------------------------------------------------ health

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            await self.probe_all()

    async def _probe(self, member: _Member) -> tuple[list[str], str, dict[str, int]]:
        """One replica's READY models, and the input sizes of those newly ready or still unknown."""
        models, error = await member.client.probe(timeout_s=self.probe_timeout_s)
        wanted = [] if error else member.state.sizes_wanted(models)
        if not wanted:
            return models, error, {}
        sizes, problems = await member.client.input_sizes(wanted, timeout_s=self.probe_timeout_s)
        for model, why in problems.items():
            # Warned once per model and replica: it is asked again at every probe until it answers.
            if (member.state.address, model) not in self._size_warned:
                self._size_warned.add((member.state.address, model))
                log.warning(
                    "cannot learn %s's input size from Triton %s (%s): images for it are resized to "
                    "%d until it can",
                    model,
                    member.state.address,
                    why,
                    MODEL_INPUT_SIZE,
                )
        for model in sizes:
            self._size_warned.discard((member.state.address, model))
        return models, error, sizes

    async def probe_all(self) -> None:
        """One health probe of every replica (is_server_ready + READY models, and the input size of
        each model that became ready), all at once."""
        members = [m for m in self._members.values() if not m.state.retiring]
        results = await asyncio.gather(*(self._probe(m) for m in members))
        now = time.monotonic()
        for member, (models, error, sizes) in zip(members, results, strict=True):
            change = member.state.on_probe(models, error, now, sizes)
            if change == "ejected":
                log.warning("Triton replica %s ejected: %s", member.state.address, member.state.reason)
            elif change == "readmitted":
                log.info("Triton replica %s re-admitted: models ready %s", member.state.address, models)
        self._publish()

    def mark_down(self, address: str, reason: str) -> None:
        """Ejects `address` now (the supervisor saw its process exit), ahead of the next probe."""
        member = self._members.get(address)
        if member is not None:
            member.state.eject(reason, time.monotonic())
            member.state.ready_models = frozenset()
            member.state.input_sizes = {}
            log.warning("Triton replica %s ejected: %s", address, reason)
            self._publish()

    # ------------------------------------------------------------------ inference

    def _not_ready(self, model: str) -> ServiceError:
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"inference backend unavailable: no Triton replica has model {model} ready "
            f"({self._status.summary}); retry in {NOT_READY_RETRY_AFTER_S:g} s",
            retry_after_s=NOT_READY_RETRY_AFTER_S,
        )

    async def infer(
        self, model: str, image: npt.NDArray[np.uint8], *, timeout_s: float | None = None
    ) -> npt.NDArray[np.uint8]:
        """Runs `model` on one image on the best replica, moving to another if that one fails."""
        budget = self.infer_timeout_s if timeout_s is None else min(self.infer_timeout_s, timeout_s)
        deadline = time.monotonic() + budget
        tried: set[str] = set()
        last: InferError | None = None
        failed_on: str | None = None
        span = trace.get_current_span()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            state = pick(self.replicas, model, frozenset(tried))
            if state is None:
                break
            if failed_on is not None:  # the call moves on from the replica that failed it
                metrics.triton_retried(failed_on)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "inference did not finish before the deadline"
                )
            member = self._members[state.address]
            tried.add(state.address)
            span.set_attribute("triton.attempts", attempt)
            span.set_attribute("triton.replica", state.address)
            state.inflight += 1
            started = time.monotonic()
            try:
                mask = await member.client.infer(model, image, timeout_s=remaining)
            except InferError as err:
                if state.on_failure(err.failure, err.message, time.monotonic()):
                    log.warning("Triton replica %s ejected: %s", state.address, err.message)
                    self._resolve_soon.set()
                    self._publish()
                if err.failure is not Failure.REPLICA:
                    raise
                last = err
                log.info("infer on %s failed (%s); trying another replica", state.address, err.message)
                failed_on = state.address
                continue
            finally:
                state.inflight -= 1
                self._retire_if_idle(member)
            state.on_success(time.monotonic() - started)
            return mask
        if last is None:
            raise self._not_ready(model)
        reason = last.message.removeprefix("inference backend unavailable: ")
        raise ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"inference backend unavailable: {len(tried)} Triton replica(s) failed the call, "
            f"last with: {reason}; retry in {NOT_READY_RETRY_AFTER_S:g} s",
            retry_after_s=NOT_READY_RETRY_AFTER_S,
        )
