"""What the pool knows about one Triton replica: load, recent latency and errors, and its circuit
breaker. Pure bookkeeping with the clock passed in, so every rule is testable without a network.

The breaker: a replica is ejected after EJECT_AFTER_FAILURES consecutive failed calls that blame
it, or at once when a health probe fails. It is re-admitted only when a probe passes again and its
ejection time is over; that time doubles with each ejection that no successful call separates
(1 s, 2 s, 4 s ... 30 s), so a replica that passes probes but fails real calls is tried less and
less often instead of every probe interval.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from bgremove_gateway.triton.client import Failure

EJECT_AFTER_FAILURES = 3
BASE_EJECTION_S = 1.0
MAX_EJECTION_S = 30.0
# Exponentially weighted averages: each new call moves them this far towards its own value.
EWMA_WEIGHT = 0.2
# Assumed for a replica nothing has been measured on yet: one U2-Net-P image on a CPU.
INITIAL_LATENCY_S = 0.2
# How much a replica's recent error rate inflates its score (at 100% errors: 5x the cost).
ERROR_PENALTY = 4.0
NOT_PROBED = "not probed yet"


@dataclass
class ReplicaState:
    address: str  # host:port dialled
    source: str  # the --triton-url it came from
    inflight: int = 0
    latency_s: float = INITIAL_LATENCY_S
    error_rate: float = 0.0
    ready_models: frozenset[str] = frozenset()
    # Each ready model's input side, from its Triton metadata; absent while unknown.
    input_sizes: dict[str, int] = field(default_factory=dict)
    # A replica is out until its first probe passes: nothing is sent to an endpoint never seen up.
    ejected: bool = True
    ejected_until: float = 0.0
    reason: str = NOT_PROBED
    ejections: int = 0  # consecutive ejections with no successful call in between
    consecutive_failures: int = 0
    retiring: bool = False  # gone from DNS: finishes its in-flight calls, gets no new ones
    calls: int = 0
    failures: int = field(default=0)

    def usable(self, model: str) -> bool:
        return not self.ejected and not self.retiring and model in self.ready_models

    def score(self) -> float:
        """Lower is better: expected wait behind this replica's own queue, inflated by recent errors."""
        return (self.inflight + 1) * max(self.latency_s, 1e-3) * (1.0 + ERROR_PENALTY * self.error_rate)

    def on_success(self, elapsed_s: float) -> None:
        self.calls += 1
        self.latency_s += EWMA_WEIGHT * (elapsed_s - self.latency_s)
        self.error_rate -= EWMA_WEIGHT * self.error_rate
        self.consecutive_failures = 0
        self.ejections = 0

    def on_failure(self, failure: Failure, reason: str, now: float) -> bool:
        """Records a failed call; True when this failure ejected the replica."""
        self.calls += 1
        if failure is not Failure.REPLICA:
            # A full queue or a passed deadline says the replica is busy, not broken: it stays in,
            # and looks slower so that the next pick prefers another.
            if failure is Failure.OVERLOADED:
                self.latency_s *= 1.0 + EWMA_WEIGHT
            return False
        self.failures += 1
        self.error_rate += EWMA_WEIGHT * (1.0 - self.error_rate)
        self.consecutive_failures += 1
        if self.consecutive_failures >= EJECT_AFTER_FAILURES and not self.ejected:
            self.eject(reason, now)
            return True
        return False

    def eject(self, reason: str, now: float) -> None:
        if not self.ejected:
            self.ejections += 1
            self.ejected_until = now + min(BASE_EJECTION_S * 2 ** (self.ejections - 1), MAX_EJECTION_S)
        self.ejected = True
        self.reason = reason

    def sizes_wanted(self, models: Iterable[str]) -> list[str]:
        """Of the models a probe found ready, those whose input size to ask Triton for: new to this
        replica since its last probe (a reload may have changed it) or still unknown."""
        return [m for m in models if m not in self.ready_models or m not in self.input_sizes]

    def on_probe(
        self, models: Iterable[str], error: str, now: float, sizes: Mapping[str, int] | None = None
    ) -> str | None:
        """Applies one health probe (and the input sizes learnt with it); returns "ejected" or
        "readmitted" when that changed."""
        if error:
            self.ready_models = frozenset()
            self.input_sizes = {}
            if not self.ejected:
                self.eject(f"health check failed: {error}", now)
                return "ejected"
            if self.reason == NOT_PROBED:
                self.reason = f"health check failed: {error}"
            # Otherwise the reason stays what ejected it (e.g. "killed by signal 9"), which says
            # more than the "connection refused" every probe of a dead replica gets.
            return None
        self.ready_models = frozenset(models)
        kept = {m: n for m, n in self.input_sizes.items() if m in self.ready_models}
        self.input_sizes = kept | {m: n for m, n in (sizes or {}).items() if m in self.ready_models}
        if self.ejected and now >= self.ejected_until:
            self.ejected = False
            self.consecutive_failures = 0
            self.reason = ""
            return "readmitted"
        return None


def pick(
    replicas: Iterable[ReplicaState], model: str, exclude: frozenset[str] = frozenset()
) -> ReplicaState | None:
    """The usable replica with the lowest score; ties broken at random so equal replicas share."""
    candidates = [r for r in replicas if r.usable(model) and r.address not in exclude]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (r.score(), random.random()))
