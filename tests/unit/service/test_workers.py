"""--workers: the flag, what a pod shares and splits among its workers, the ports it holds, and the
scrape-time figures each worker copies for the parent."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from bgremove_gateway.config import Settings, TritonSettings, add_serve_arguments, settings_from_args
from bgremove_gateway.runtime import metrics
from bgremove_gateway.runtime.budget import share
from bgremove_gateway.service.server import StartupError, _grpc_options
from bgremove_gateway.service.workers import (
    METRICS_PREFIX,
    check_pod,
    hold_port,
    remove_orphaned_metrics,
    worker_settings,
)

MiB = 1 << 20


def parse(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser, env or {})
    return settings_from_args(parser.parse_args(argv))


def test_workers_default_to_the_usable_cores_and_take_the_flag_over_the_environment() -> None:
    assert parse([]).workers == len(os.sched_getaffinity(0))
    assert parse([], {"BGREMOVE_WORKERS": "3"}).workers == 3
    assert parse(["--workers", "1"], {"BGREMOVE_WORKERS": "3"}).workers == 1


@pytest.mark.parametrize(("total", "parts"), [(64, 2), (64, 3), (7, 7), (1536 * MiB + 1, 5)])
def test_shares_add_up_to_the_whole_and_differ_by_one_at_most(total: int, parts: int) -> None:
    shares = [share(total, parts, i) for i in range(parts)]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1


def test_a_share_that_does_not_exist_is_refused() -> None:
    with pytest.raises(ValueError, match="part 2 of 2"):
        share(10, 2, 2)


def test_each_worker_admits_against_the_pods_whole_budget_and_uses_the_parents_triton() -> None:
    pod = Settings(workers=3, memory_budget_bytes=1536 * MiB, max_concurrent_streams=64, cpu_workers=4)
    workers = [worker_settings(pod, i, "127.0.0.1:8201") for i in range(3)]
    # Not split: the workers count against these together (runtime/shared_budget.py).
    assert {w.memory_budget_bytes for w in workers} == {1536 * MiB}
    assert {w.max_concurrent_streams for w in workers} == {64}
    # Threads and encode processes: the pod's count split, at least one each.
    assert [w.cpu_workers for w in workers] == [2, 1, 1]
    assert [w.worker for w in workers] == [0, 1, 2]
    for w in workers:
        assert w.workers == 3 and w.metrics_listen is None
        assert w.triton.urls == ("127.0.0.1:8201",) and not w.triton.embedded


def test_with_external_tritons_the_workers_use_them() -> None:
    pod = Settings(workers=2, triton=TritonSettings(urls=("triton:8001",)))
    assert worker_settings(pod, 1, None).triton.urls == ("triton:8001",)


def test_a_pod_that_cannot_be_made_is_one_clear_line() -> None:
    with pytest.raises(StartupError, match="--workers must be at least 1, got 0"):
        check_pod(Settings(workers=0))
    # A pod-wide stream cap below the worker count is fine: the workers share it.
    check_pod(Settings(workers=3, max_concurrent_streams=2))


def test_only_a_worker_shares_its_port() -> None:
    assert ("grpc.so_reuseport", 0) in _grpc_options(Settings())
    assert ("grpc.so_reuseport", 1) in _grpc_options(replace(Settings(), worker=0))


def test_the_pod_holds_its_port_for_its_workers_and_refuses_a_taken_one() -> None:
    held, address = hold_port("127.0.0.1:0")
    try:
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        # A worker binds the held port with SO_REUSEPORT, as gRPC does, and listens.
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", int(port)))
            worker.listen()
            # A second pod on the same port is refused, not let in to share it.
            with pytest.raises(StartupError, match=f"cannot listen on {address}: address in use"):
                hold_port(address)
    finally:
        held.close()


def test_a_unix_socket_cannot_be_shared_by_workers() -> None:
    with pytest.raises(StartupError, match="--workers needs HOST:PORT listeners"):
        hold_port("unix:/tmp/bgremove.sock")


class Figures:
    def __init__(self) -> None:
        self.calls = 5.0
        self.open = 2.0

    def describe(self) -> list[object]:
        return []

    def collect(self) -> list[object]:
        calls = CounterMetricFamily("bgremove_test_mirror_calls", "calls", labels=["replica"])
        calls.add_metric(["a"], self.calls)
        return [calls, GaugeMetricFamily("bgremove_test_mirror_open", "open", value=self.open)]


def test_a_worker_copies_its_scrape_time_figures_counters_by_what_they_grew() -> None:
    mirror, figures = metrics._Mirror(), Figures()
    mirror.publish(figures)  # type: ignore[arg-type]
    figures.calls, figures.open = 8.0, 1.0
    mirror.publish(figures)  # type: ignore[arg-type]
    counter = mirror.counters["bgremove_test_mirror_calls"].labels("a")
    assert counter._value.get() == 8.0
    assert mirror.gauges["bgremove_test_mirror_open"]._value.get() == 1.0
    # A counter that went back (a replica dropped and re-added) never makes the pod's total go back.
    figures.calls = 3.0
    mirror.publish(figures)  # type: ignore[arg-type]
    assert counter._value.get() == 8.0


def test_a_killed_pods_metrics_directory_is_removed_by_the_next_pod_and_a_live_ones_kept(
    tmp_path: Path,
) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = tmp_path / f"{METRICS_PREFIX}{int(gone.stdout)}-abc"
    live = tmp_path / f"{METRICS_PREFIX}{os.getpid()}-def"
    for directory in (dead, live):
        directory.mkdir()
        (directory / "counter_123.db").write_bytes(b"")
    assert remove_orphaned_metrics(tmp_path) == [dead]
    assert not dead.exists() and live.exists()
