"""`bgremove bench`: service, Triton-direct and model-alone measured in one run, in fair rounds."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from skimage import data as skdata

from bgremove_gateway.cli import build_parser
from bgremove_gateway.tools import bench
from bgremove_gateway.tools.bench import OK, Outcome, Target, default_rounds, interleaved, serves
from e2e_helpers import jpeg_bytes
from service_harness import BGREMOVE, GatewayProcess


async def test_rounds_alternate_the_targets_and_cover_every_request_once() -> None:
    log: list[tuple[str, int]] = []

    def target(name: str) -> Target:
        async def call(i: int) -> Outcome:
            log.append((name, i))
            return OK if i % 5 else Outcome("UNAVAILABLE")

        async def close() -> None:
            pass

        return Target(name, call, close)

    runs = await interleaved([target("a"), target("b")], concurrency=2, requests=10, rounds=3)
    # Rounds of 3, 4 and 3 requests; the order flips every round: a b | b a | a b.
    expected = [("a", {0, 1, 2}), ("b", {0, 1, 2}), ("b", {3, 4, 5, 6}), ("a", {3, 4, 5, 6})]
    expected += [("a", {7, 8, 9}), ("b", {7, 8, 9})]
    blocks, at = [], 0
    for name, indices in expected:
        chunk = log[at : at + len(indices)]
        blocks.append((chunk[0][0], {i for _, i in chunk}))
        assert {n for n, _ in chunk} == {name}
        at += len(indices)
    assert blocks == expected and at == len(log)
    for run in runs:
        assert run.statuses == {"OK": 8, "UNAVAILABLE": 2} and run.wall_s > 0


async def test_the_gateways_cpu_is_counted_over_the_service_rounds_only() -> None:
    cpu = [0.0]  # the gateway's CPU seconds: 20 ms a service call, nothing for the other target

    def target(name: str, cost_s: float, clock: bool) -> Target:
        async def call(i: int) -> Outcome:
            cpu[0] += cost_s
            return OK

        async def close() -> None:
            pass

        return Target(name, call, close, cpu_clock=(lambda: cpu[0]) if clock else None)

    service, triton = await interleaved(
        [target("service", 0.020, True), target("triton", 0.5, False)], concurrency=2, requests=8, rounds=4
    )
    assert service.cpu_s == pytest.approx(8 * 0.020) and triton.cpu_s is None
    summary = service.summary()
    assert summary["gateway_cpu_ms_per_request"] == pytest.approx(20.0)
    assert summary["gateway_cores_used"] == pytest.approx(service.cpu_s / service.wall_s, rel=1e-2)
    assert triton.summary()["gateway_cpu_ms_per_request"] is None


def test_a_benchmark_only_model_without_a_target_gets_the_benchs_own_gateway() -> None:
    ns = build_parser().parse_args(["bench", "--images", "x.jpg", "--model", "instant"])
    assert serves(ns)
    ns = build_parser().parse_args(["bench", "--images", "x.jpg", "--model", "instant", "--target", "h:1"])
    assert not serves(ns)
    assert not serves(build_parser().parse_args(["bench", "--images", "x.jpg"]))
    assert serves(build_parser().parse_args(["bench", "--images", "x.jpg", "--serve"]))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--model", "instant", "--serve", "--target", "h:1"],
            "bgremove bench: --serve starts its own gateway and Triton: drop --target and --triton-url",
        ),
        (
            ["--target", "h:1", "--gateway-pid", str(2**22 + 1)],
            f"bgremove bench: --gateway-pid {2**22 + 1}: no such process on this machine",
        ),
    ],
)
def test_contradictions_are_refused_before_anything_is_sent(argv: list[str], message: str) -> None:
    ns = build_parser().parse_args(["bench", "--images", "x.jpg", *argv])
    with pytest.raises(SystemExit) as exit_:
        bench.run(ns)
    assert str(exit_.value) == message


def test_default_rounds_keep_every_worker_busy() -> None:
    assert default_rounds(1, 24) == 8
    assert default_rounds(4, 32) == 4
    assert default_rounds(16, 16) == 1


@pytest.mark.slow
def test_bench_reports_service_triton_and_model_with_ratios(gateway: GatewayProcess, tmp_path: Path) -> None:
    (tmp_path / "cat.jpg").write_bytes(jpeg_bytes(skdata.chelsea()))
    (tmp_path / "coffee.jpg").write_bytes(jpeg_bytes(skdata.coffee()))
    out = subprocess.run(
        [
            BGREMOVE,
            "bench",
            "--target",
            gateway.target,
            "--triton-url",
            f"127.0.0.1:{gateway.triton_grpc_port}",
            "--model-alone",
            "--images",
            str(tmp_path),
            "--concurrency",
            "1",
            "--requests",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["images"] == 2 and report["rounds"] == 2
    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) == {"service", "triton", "model"}
    for run in runs.values():
        assert run["statuses"] == {"OK": 4}
        assert 0 < run["p50_ms"] <= run["p99_ms"]
    ratios = report["ratios"]
    for key in ("service_over_model_throughput", "service_over_triton_throughput"):
        assert 0 < ratios[key] < 10
    # The service does strictly more than Triton direct: what it adds is a real, finite number.
    assert math.isfinite(ratios["gateway_added_p50_ms"])
    expected = runs["service"]["p50_ms"] - runs["triton"]["p50_ms"]
    assert ratios["gateway_added_p50_ms"] == pytest.approx(expected, abs=0.2)
