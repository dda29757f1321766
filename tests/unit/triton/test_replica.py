"""The pool's per-replica rules: which replica gets a call, when one is ejected and re-admitted."""

from __future__ import annotations

from collections import Counter

from bgremove_gateway.triton.client import Failure
from bgremove_gateway.triton.replica import (
    BASE_EJECTION_S,
    EJECT_AFTER_FAILURES,
    MAX_EJECTION_S,
    ReplicaState,
    pick,
)

MODEL = "u2netp"


def up(address: str, now: float = 0.0, models: tuple[str, ...] = (MODEL,)) -> ReplicaState:
    state = ReplicaState(address, source=address)
    assert state.on_probe(models, "", now) == "readmitted"
    return state


def test_a_replica_is_not_used_before_its_first_probe_passes() -> None:
    fresh = ReplicaState("10.0.0.1:8001", "triton:8001")
    assert pick([fresh], MODEL) is None
    assert fresh.on_probe([], "cannot connect: Connection refused", 0.0) is None
    assert pick([fresh], MODEL) is None and fresh.reason.endswith("Connection refused")
    assert fresh.on_probe([MODEL], "", 1.0) == "readmitted"
    assert pick([fresh], MODEL) is fresh


def test_least_loaded_replica_wins() -> None:
    a, b = up("a:1"), up("b:1")
    a.inflight, b.inflight = 3, 1
    assert pick([a, b], MODEL) is b
    b.inflight = 5
    assert pick([a, b], MODEL) is a


def test_a_slower_replica_gets_less_of_the_load() -> None:
    fast, slow = up("fast:1"), up("slow:1")
    for _ in range(20):
        fast.on_success(0.1)
        slow.on_success(0.4)
    # Send calls one after another, keeping the ones in flight: the fast replica takes about four
    # times as many before the slow one is worth its queue.
    for _ in range(10):
        pick([fast, slow], MODEL).inflight += 1  # type: ignore[union-attr]
    assert fast.inflight == 8 and slow.inflight == 2


def test_equal_replicas_share_the_calls() -> None:
    a, b = up("a:1"), up("b:1")
    counts = Counter(pick([a, b], MODEL).address for _ in range(400))  # type: ignore[union-attr]
    assert 120 < counts["a:1"] < 280


def test_recent_errors_make_a_replica_less_attractive() -> None:
    flaky, steady = up("flaky:1"), up("steady:1")
    flaky.on_failure(Failure.REPLICA, "Socket closed", 0.0)
    assert not flaky.ejected
    assert pick([flaky, steady], MODEL) is steady


def test_ejected_after_consecutive_failures_that_blame_the_replica() -> None:
    state = up("a:1")
    for i in range(EJECT_AFTER_FAILURES - 1):
        assert not state.on_failure(Failure.REPLICA, "Socket closed", float(i))
    assert state.on_failure(Failure.REPLICA, "Connection refused", 5.0)
    assert state.ejected and state.reason == "Connection refused"
    assert pick([state], MODEL) is None


def test_a_success_between_failures_resets_the_count() -> None:
    state = up("a:1")
    for _ in range(5):
        for _ in range(EJECT_AFTER_FAILURES - 1):
            state.on_failure(Failure.REPLICA, "reset", 0.0)
        state.on_success(0.2)
    assert not state.ejected


def test_a_full_queue_or_a_deadline_never_ejects() -> None:
    state = up("a:1")
    latency = state.latency_s
    for _ in range(10):
        assert not state.on_failure(Failure.OVERLOADED, "Exceeds maximum queue size", 0.0)
        assert not state.on_failure(Failure.DEADLINE, "deadline", 0.0)
    assert not state.ejected and state.error_rate == 0.0
    assert state.latency_s > latency, "a full replica looks slower to the next pick"


def test_a_failed_probe_ejects_at_once_and_a_passing_one_readmits() -> None:
    state = up("a:1")
    assert state.on_probe([], "Server exiting", 10.0) == "ejected"
    assert state.ejected and pick([state], MODEL) is None
    assert state.on_probe([], "cannot connect: Connection refused", 10.2) is None
    assert state.on_probe([MODEL], "", 10.5) is None, "not before its ejection time has passed"
    assert state.on_probe([MODEL], "", 10.0 + BASE_EJECTION_S) == "readmitted"
    assert pick([state], MODEL) is state


def test_ejection_time_doubles_while_the_replica_keeps_failing_real_calls() -> None:
    state = up("a:1")
    now = 0.0
    holds = []
    for _ in range(8):
        for _ in range(EJECT_AFTER_FAILURES):
            state.on_failure(Failure.REPLICA, "INTERNAL", now)
        holds.append(state.ejected_until - now)
        now = state.ejected_until
        assert state.on_probe([MODEL], "", now) == "readmitted"  # its probes keep passing
    assert holds == [1.0, 2.0, 4.0, 8.0, 16.0, MAX_EJECTION_S, MAX_EJECTION_S, MAX_EJECTION_S]
    state.on_success(0.2)
    for _ in range(EJECT_AFTER_FAILURES):
        state.on_failure(Failure.REPLICA, "INTERNAL", now)
    assert state.ejected_until - now == BASE_EJECTION_S, "a success starts the series again"


def test_only_replicas_with_the_model_ready_are_picked() -> None:
    small, both = up("small:1", models=("u2netp",)), up("both:1", models=("u2netp", "u2net"))
    assert pick([small, both], "u2net") is both
    small.inflight = 0
    both.inflight = 10
    assert pick([small, both], "u2netp") is small
    assert pick([small], "u2net") is None


def test_excluded_and_retiring_replicas_are_skipped() -> None:
    a, b = up("a:1"), up("b:1")
    assert pick([a, b], MODEL, frozenset({"a:1"})) is b
    assert pick([a, b], MODEL, frozenset({"a:1", "b:1"})) is None
    b.retiring = True
    assert pick([a, b], MODEL) is a


def test_input_sizes_are_asked_for_newly_ready_models_and_dropped_with_them() -> None:
    state = ReplicaState("a:1", "a:1")
    assert state.sizes_wanted([MODEL, "tiny"]) == [MODEL, "tiny"]
    assert state.on_probe([MODEL, "tiny"], "", 0.0, {MODEL: 320, "tiny": 1024, "gone": 64}) == "readmitted"
    assert state.input_sizes == {MODEL: 320, "tiny": 1024}
    assert state.sizes_wanted([MODEL, "tiny"]) == []
    # A model unloaded and loaded again is asked again: its new version may take another size.
    state.on_probe([MODEL], "", 1.0)
    assert state.input_sizes == {MODEL: 320}
    assert state.sizes_wanted([MODEL, "tiny"]) == ["tiny"]
    # A failed probe forgets them all.
    state.on_probe([], "Server exiting", 2.0)
    assert state.input_sizes == {} and state.sizes_wanted([MODEL]) == [MODEL]
