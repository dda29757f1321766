"""The pod-wide memory budget and stream cap of --workers: MemoryBudgets of several processes counting
in one shared admission table never admit more than the pod's budget together, and what a dead
worker held returns to the pod."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from bgremove_gateway.config import Settings
from bgremove_gateway.errors import ServiceError
from bgremove_gateway.runtime.budget import PER_REQUEST_OVERHEAD_BYTES, MemoryBudget
from bgremove_gateway.runtime.shared_budget import (
    ADMISSION_ENV,
    ADMISSION_PREFIX,
    AdmissionTable,
    create_pod_table,
    remove_pod_table,
)
from bgremove_gateway.service.server import _admission

MiB = 1 << 20

# A worker of a pod, as a process of its own: reserves and releases in a loop from two threads,
# checking after every reservation, under the pod's lock, that the pod is within its budget.
CONTENDER = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path
    from bgremove_gateway.errors import ServiceError
    from bgremove_gateway.runtime.budget import MemoryBudget
    from bgremove_gateway.runtime.shared_budget import AdmissionTable

    path, slot, budget, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    start_at = float(sys.argv[5])
    admission = MemoryBudget(budget, 3, AdmissionTable(path, 2), slot)
    observer = AdmissionTable(path, 2)  # its own open file: its flock excludes this process's too
    seen = {"admitted": 0, "refused": 0, "peak": 0}
    lock = threading.Lock()

    def work():
        for _ in range(rounds):
            ticket = admission.ticket()
            try:
                ticket.enter()
                ticket.reserve(7 << 20, "an image")
                with observer.locked():
                    reserved, streams = observer.totals()
                time.sleep(0.0002)  # holds it a moment, as a call does, so that holds overlap
                with lock:
                    seen["admitted"] += 1
                    seen["peak"] = max(seen["peak"], reserved)
                    assert streams <= 3
            except ServiceError:
                with lock:
                    seen["refused"] += 1
            finally:
                ticket.release()

    threads = [threading.Thread(target=work) for _ in range(3)]
    time.sleep(max(0.0, start_at - time.time()))  # both processes start contending together
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(seen))
    """
)

# A worker that dies holding what it reserved (and, with "lock", the pod's lock itself).
DIES_HOLDING = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from bgremove_gateway.runtime.budget import MemoryBudget
    from bgremove_gateway.runtime.shared_budget import AdmissionTable

    table = AdmissionTable(Path(sys.argv[1]), 2)
    ticket = MemoryBudget(64 << 20, 4, table, 1).ticket()
    ticket.enter()
    ticket.reserve(40 << 20, "an image")
    if sys.argv[2] == "lock":
        table.locked().__enter__()
    print("held", flush=True)
    time.sleep(60)
    """
)


@pytest.fixture
def table(tmp_path: Path) -> Iterator[AdmissionTable]:
    made = create_pod_table(tmp_path, 2)
    yield made
    remove_pod_table(made)


def budgets(table: AdmissionTable, budget: int, streams: int) -> tuple[MemoryBudget, MemoryBudget]:
    """Two workers of one pod, in this process, each with its own open table as a worker has."""
    return (
        MemoryBudget(budget, streams, AdmissionTable(table.path, 2), 0),
        MemoryBudget(budget, streams, AdmissionTable(table.path, 2), 1),
    )


def test_the_table_is_private_and_holds_only_two_counters_a_worker(table: AdmissionTable) -> None:
    assert table.path.parent.name.startswith(f"{ADMISSION_PREFIX}{os.getpid()}-")
    assert table.path.parent.stat().st_mode & 0o777 == 0o700
    assert table.path.stat().st_mode & 0o777 == 0o600
    assert table.path.stat().st_size == 2 * 2 * 8
    with pytest.raises(ValueError, match="not 3 slots"):
        AdmissionTable(table.path, 3)


def test_a_reservation_in_one_worker_counts_against_the_other(table: AdmissionTable) -> None:
    first, second = budgets(table, 64 * MiB, 8)
    held = first.ticket()
    held.enter()
    held.reserve(40 * MiB, "an image")
    # 40 MiB fits either worker's budget alone, not both at once: the second is refused, with the
    # pod's free bytes and a retry hint.
    refused = second.ticket()
    refused.enter()
    with pytest.raises(ServiceError) as exc:
        refused.reserve(40 * MiB, "an image")
    free = 64 * MiB - 40 * MiB - 2 * PER_REQUEST_OVERHEAD_BYTES
    assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert exc.value.retry_after_s is not None
    assert f"the gateway is at its memory budget: an image needs {40 * MiB} bytes, {free} of" in str(
        exc.value
    )
    assert second.reserved_bytes == first.reserved_bytes == 40 * MiB + 2 * PER_REQUEST_OVERHEAD_BYTES
    refused.release()
    # Released on the first worker, it fits on the second.
    held.release()
    assert table.totals() == (0, 0)
    admitted = second.ticket()
    admitted.enter()
    admitted.reserve(40 * MiB, "an image")
    assert table.slot(0) == (0, 0)
    assert table.slot(1) == (40 * MiB + PER_REQUEST_OVERHEAD_BYTES, 1)
    admitted.release()
    assert table.totals() == (0, 0)


def test_the_stream_cap_is_the_pods(table: AdmissionTable) -> None:
    first, second = budgets(table, 64 * MiB, 3)
    tickets = [first.ticket(), first.ticket(), second.ticket()]
    for ticket in tickets:
        ticket.enter()
    with pytest.raises(ServiceError, match="too many concurrent streams: 3 open, the limit is 3"):
        second.ticket().enter()
    tickets[0].release()  # a slot freed on one worker is one the other may take
    again = second.ticket()
    again.enter()
    assert (first.streams, table.slot(0)[1], table.slot(1)[1]) == (3, 1, 2)


def test_two_processes_under_contention_never_exceed_the_pods_budget(
    table: AdmissionTable, tmp_path: Path
) -> None:
    script = tmp_path / "contender.py"
    script.write_text(CONTENDER)
    budget, rounds = 20 * MiB, 300  # room for two 7 MiB images (and their overheads), not three
    start_at = time.time() + 3  # after both have imported the gateway
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(table.path),
                str(slot),
                str(budget),
                str(rounds),
                str(start_at),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for slot in (0, 1)
    ]
    results = []
    for worker in workers:
        out, _ = worker.communicate(timeout=120)
        assert worker.returncode == 0
        results.append(json.loads(out))
    assert all(r["admitted"] + r["refused"] == 3 * rounds for r in results)
    # Both admitted, calls were refused and two were held at once: they contended, and together
    # never went beyond the budget.
    assert all(r["admitted"] > 0 for r in results) and sum(r["refused"] for r in results) > 0, results
    assert 8 * MiB < max(r["peak"] for r in results) <= budget, results
    assert table.totals() == (0, 0)


@pytest.mark.parametrize("holding", ["reservations", "lock"])
def test_a_dead_workers_reservations_return_to_the_pod_when_its_slot_is_cleared(
    table: AdmissionTable, tmp_path: Path, holding: str
) -> None:
    script = tmp_path / "dies.py"
    script.write_text(DIES_HOLDING)
    worker = subprocess.Popen(
        [sys.executable, str(script), str(table.path), holding], stdout=subprocess.PIPE, text=True
    )
    try:
        assert worker.stdout is not None and worker.stdout.readline() == "held\n"
        os.kill(worker.pid, signal.SIGKILL)
        assert worker.wait(30) == -signal.SIGKILL
        # The kernel drops a dead process's lock; its reservations stay until the parent clears them.
        survivor = MemoryBudget(64 * MiB, 4, AdmissionTable(table.path, 2), 0)
        assert survivor.reserved_bytes == 40 * MiB + PER_REQUEST_OVERHEAD_BYTES
        ticket = survivor.ticket()
        ticket.enter()
        with pytest.raises(ServiceError, match="at its memory budget"):
            ticket.reserve(40 * MiB, "an image")
        started = time.monotonic()
        table.clear(1)
        assert time.monotonic() - started < 1
        ticket.reserve(40 * MiB, "an image")
        assert table.slot(1) == (0, 0)
        ticket.release()
        assert table.totals() == (0, 0)
    finally:
        worker.kill()
        worker.wait()


def test_one_process_keeps_its_own_budget_without_any_table(
    table: AdmissionTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ADMISSION_ENV, str(table.path))
    alone = _admission(Settings(workers=1, memory_budget_bytes=64 * MiB))
    ticket = alone.ticket()
    ticket.enter()
    assert alone.reserved_bytes == PER_REQUEST_OVERHEAD_BYTES
    assert table.totals() == (0, 0)  # the variable is a pod's, not this single gateway's
    worker = _admission(Settings(workers=2, worker=1, memory_budget_bytes=64 * MiB))
    worker.ticket().enter()
    assert table.slot(1) == (PER_REQUEST_OVERHEAD_BYTES, 1)
