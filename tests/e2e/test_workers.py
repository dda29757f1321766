"""`bgremove serve --workers 2`: two gateway processes on one port and one embedded Triton, with the
pod's health, metrics, worker restarts, drain and death as a user of the pod sees them."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from bgremove_gateway.runtime.budget import PER_REQUEST_OVERHEAD_BYTES, image_bytes_estimate
from bgremove_gateway.runtime.shared_budget import ADMISSION_PREFIX
from bgremove_gateway.service.workers import METRICS_PREFIX, remove_orphaned_metrics
from bgremove_gateway.triton.embedded import process_alive
from e2e_helpers import jpeg_bytes, stream_remove, upload_messages
from load_helpers import children, descendants
from service_harness import GatewayProcess, free_port

JPEG = jpeg_bytes(skdata.chelsea())
WORKER_MODULE = "bgremove_gateway.service.workers"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Pod:
    def __init__(self, *extra: str) -> None:
        self.metrics_port = free_port()
        self.gateway = GatewayProcess(
            args=[
                "--workers",
                "2",
                "--metrics-listen",
                f"127.0.0.1:{self.metrics_port}",
                "--drain-seconds",
                "60",
                *extra,
            ]
        )

    @property
    def pid(self) -> int:
        assert self.gateway.proc is not None
        return self.gateway.proc.pid

    def workers(self) -> list[int]:
        return [p for p in children(self.pid) if WORKER_MODULE in _cmdline(p)]

    def tritons(self) -> list[int]:
        return children(self.pid, "tritonserver")

    def all_serving(self) -> bool:
        """SERVING on several fresh connections in a row: whichever worker the kernel picks is ready."""
        return all(self.gateway.health() == health_pb2.HealthCheckResponse.SERVING for _ in range(8))

    def samples(self) -> Samples:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_until(condition: Callable[[], object], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return bool(condition())


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def by_worker(samples: Samples, name: str) -> dict[str, float]:
    return {dict(labels)["worker"]: v for (n, labels), v in samples.items() if n == name}


# Channels of one process to one target share a connection unless told otherwise.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def service_info(target: str) -> None:
    """One call on a connection of its own, so the kernel picks a worker for it afresh."""
    with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
        pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(pb.GetServiceInfoRequest(), timeout=30)


@pytest.fixture(scope="module")
def pod(prepared_repo: Path) -> Iterator[Pod]:
    pod = Pod()
    with pod.gateway.serving():
        assert wait_until(pod.all_serving, 60)
        yield pod


def test_one_triton_serves_two_workers_that_share_the_port_and_the_load(pod: Pod) -> None:
    assert len(pod.workers()) == 2
    assert len(pod.tritons()) == 1
    assert pod.all_serving()
    before = pod.samples()
    for _ in range(90):
        service_info(pod.gateway.target)
    threads = [threading.Thread(target=stream_remove, args=(pod.gateway.target, JPEG)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = pod.samples()
    served = {
        worker: calls - by_worker(before, "bgremove_worker_calls_total").get(worker, 0.0)
        for worker, calls in by_worker(after, "bgremove_worker_calls_total").items()
    }
    assert set(served) == {"0", "1"}
    # Connections are spread by a hash of their addresses: 90 of them give each worker 30 or more.
    assert min(served.values()) >= 30, served
    calls = total(after, "bgremove_calls_total") - total(before, "bgremove_calls_total")
    assert calls == sum(served.values()) == 96
    ok = {"method": "StreamRemoveBackground", "code": "OK", "format": "unspecified", "model": "u2netp"}
    done = after.get(("bgremove_calls_total", frozenset(ok.items())), 0.0)
    assert done - before.get(("bgremove_calls_total", frozenset(ok.items())), 0.0) == 6
    # The workers share the pod's one budget and stream cap; the pod reports it once.
    assert total(after, "bgremove_memory_budget_bytes") == 1536 * 1024 * 1024
    assert total(after, "bgremove_streams_limit") == 64
    assert total(after, "bgremove_workers") == 2


def test_a_killed_worker_is_restarted_and_the_pod_keeps_serving(pod: Pod) -> None:
    victim = pod.workers()[0]
    before = pod.samples()
    pod_calls = total(before, "bgremove_calls_total")
    assert pod_calls > 0
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: len(pod.workers()) == 2 and victim not in pod.workers(), 60)
    assert wait_until(lambda: total(pod.samples(), "bgremove_worker_restarts_total") == 1, 30)
    assert any("was killed by signal 9" in line and "restarting it" in line for line in pod.gateway.lines)
    assert wait_until(pod.all_serving, 60)
    for _ in range(10):
        service_info(pod.gateway.target)
    # The dead worker's calls stay in the pod's totals: the counter never goes back.
    assert total(pod.samples(), "bgremove_calls_total") == pod_calls + 10
    assert len(pod.tritons()) == 1


def test_a_dead_triton_is_restarted_by_the_parent_and_the_workers_follow_it(pod: Pod) -> None:
    (triton,) = pod.tritons()
    os.kill(triton, signal.SIGKILL)
    assert wait_until(lambda: pod.gateway.health() != health_pb2.HealthCheckResponse.SERVING, 10)
    assert wait_until(lambda: total(pod.samples(), "bgremove_triton_restarts_total") == 1, 120)
    assert wait_until(pod.all_serving, 30)
    assert len(pod.tritons()) == 1 and pod.tritons() != [triton]
    # Both workers serve again: the kernel may hand a new connection to either.
    for _ in range(4):
        assert stream_remove(pod.gateway.target, JPEG)[0].width == 451


def test_sigterm_drains_a_call_in_flight_on_each_worker_and_leaves_no_process(pod: Pod) -> None:
    """Last in this module: it stops the pod."""
    processes = descendants(pod.pid)
    released = threading.Event()
    results: list[object] = []

    def held_upload():  # type: ignore[no-untyped-def]
        msgs = list(upload_messages(JPEG, "image/jpeg", chunk=8192))
        yield from msgs[:2]
        released.wait(60)
        yield from msgs[2:]

    def client() -> None:
        with grpc.insecure_channel(pod.gateway.target, options=OWN_CONNECTION) as channel:
            try:
                got = list(
                    pb_grpc.BackgroundRemovalStub(channel).StreamRemoveBackground(held_upload(), timeout=180)
                )
                results.append(got[0].header.width)
            except grpc.RpcError as exc:
                results.append(exc.code())

    threads: list[threading.Thread] = []

    def in_flight() -> dict[str, float]:
        return by_worker(pod.samples(), "bgremove_worker_calls_in_flight")

    # New connections until each worker has a call in flight (the kernel picks by a hash).
    while len(threads) < 16 and min(in_flight().get(w, 0.0) for w in ("0", "1")) < 1:
        threads.append(threading.Thread(target=client))
        threads[-1].start()
        wait_until(lambda: sum(in_flight().values()) >= len(threads), 15)
    assert min(in_flight().values()) >= 1, in_flight()
    pod.gateway.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert wait_until(lambda: pod.gateway.health() != health_pb2.HealthCheckResponse.SERVING, 10)
    released.set()
    for t in threads:
        t.join(120)
    assert results == [451] * len(threads)
    assert pod.gateway.proc.wait(60) == 0  # type: ignore[union-attr]
    assert wait_until(lambda: not any(process_alive(p) for p in processes), 10)
    text = pod.gateway.log_text()
    # Triton stops last, after both workers drained.
    assert text.rindex("Triton stopped") > max(i for i in _all(text, "INFO bgremove.gateway stopped"))


def _all(text: str, needle: str) -> list[int]:
    found, at = [], text.find(needle)
    while at != -1:
        found.append(at)
        at = text.find(needle, at + 1)
    assert len(found) == 2, found
    return found


def test_the_pod_dies_with_its_parent(prepared_repo: Path) -> None:
    """SIGKILL of the parent (OOM, a node drain gone wrong): workers and Triton go with it."""
    pod = Pod()
    pod.gateway.start()
    try:
        pod.gateway.wait_serving()
        assert wait_until(lambda: len(pod.workers()) == 2 and len(pod.tritons()) == 1, 30)
        processes = descendants(pod.pid)
        assert len(processes) >= 3
        pod.gateway.proc.kill()  # type: ignore[union-attr]
        pod.gateway.proc.wait(10)  # type: ignore[union-attr]
        assert wait_until(lambda: not any(process_alive(p) for p in processes), 60), [
            _cmdline(p) for p in processes if process_alive(p)
        ]
        with pytest.raises(grpc.RpcError):
            service_info(pod.gateway.target)
        # What the killed parent could not remove, the next pod on this /dev/shm does.
        left = [d.name for d in remove_orphaned_metrics(Path("/dev/shm"))]
        assert any(name.startswith(f"{METRICS_PREFIX}{pod.pid}-") for name in left), left
        left = [d.name for d in remove_orphaned_metrics(Path("/dev/shm"), ADMISSION_PREFIX)]
        assert any(name.startswith(f"{ADMISSION_PREFIX}{pod.pid}-") for name in left), left
    finally:
        pod.gateway.stop()


def _large_call(target: str, data: bytes, hold: threading.Event | None = None) -> int | grpc.RpcError:
    """A PNG cut-out of `data` on a connection of its own (the kernel picks its worker afresh): the
    result's width, or the error. With `hold`, the last chunk waits for it, the rest held in flight."""
    messages = list(upload_messages(data, "image/png"))

    def upload() -> Iterator[pb.UploadRequest]:
        yield from messages[:-1]
        if hold is not None:
            hold.wait(120)
        yield messages[-1]

    with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
        try:
            got = list(pb_grpc.BackgroundRemovalStub(channel).StreamRemoveBackground(upload(), timeout=180))
        except grpc.RpcError as exc:
            return exc
        return got[0].header.width


def _answered_since(pod: Pod, before: Samples) -> dict[str, float]:
    """Calls each worker answered since `before`."""
    now = by_worker(pod.samples(), "bgremove_worker_calls_total")
    then = by_worker(before, "bgremove_worker_calls_total")
    return {w: now.get(w, 0.0) - then.get(w, 0.0) for w in ("0", "1")}


def _until_both_answered(pod: Pod, data: bytes, most: int) -> list[int | grpc.RpcError]:
    """Large calls on new connections until each worker answered one (the kernel picks by a hash)."""
    before = pod.samples()
    outcomes: list[int | grpc.RpcError] = []
    while len(outcomes) < most and min(_answered_since(pod, before).values()) < 1:
        outcomes.append(_large_call(pod.gateway.target, data))
    assert min(_answered_since(pod, before).values()) >= 1, outcomes
    return outcomes


def test_the_pods_one_budget_admits_a_large_image_on_either_worker_but_never_two_at_once(
    prepared_repo: Path,
) -> None:
    """A worker used to get 1/N of --memory-budget-bytes, which refused an image one process served."""
    side = 1000
    noise = np.random.default_rng(7).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG", compress_level=1)
    png = buf.getvalue()  # noise: the upload is about as large as the pixels, and held in flight
    one = len(png) + image_bytes_estimate(side, side, pb.OUTPUT_FORMAT_PNG) + PER_REQUEST_OVERHEAD_BYTES
    # One image (and its parser's copies) fits with room to spare; in half of it, a worker's old
    # share, it never fits, nor does a second image beside one held upload.
    budget = one + len(png) // 2
    pod = Pod("--memory-budget-bytes", str(budget))
    with pod.gateway.serving():
        assert wait_until(pod.all_serving, 60)
        assert total(pod.samples(), "bgremove_memory_budget_bytes") == budget
        release = threading.Event()
        held: list[int | grpc.RpcError] = []
        holder = threading.Thread(target=lambda: held.append(_large_call(pod.gateway.target, png, release)))
        holder.start()
        try:
            assert wait_until(
                lambda: total(pod.samples(), "bgremove_memory_reserved_bytes") >= len(png) // 2, 30
            )
            # The held upload counts on both workers: each refuses a second image, with the pod's budget.
            for refused in _until_both_answered(pod, png, 16):
                assert isinstance(refused, grpc.RpcError), refused
                assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                details = refused.details() or ""
                assert "the gateway is at its memory budget" in details
                assert f"of {budget} are free" in details
        finally:
            release.set()
            holder.join(180)
        assert held == [side]
        # Alone, the large image fits on whichever worker the kernel picks.
        served = _until_both_answered(pod, png, 12)
        assert served == [side] * len(served)
        assert wait_until(lambda: total(pod.samples(), "bgremove_memory_reserved_bytes") == 0, 10)
        # Workers killed while one holds an upload: the parent returns what it held to the pod.
        release.clear()
        holder = threading.Thread(target=_large_call, args=(pod.gateway.target, png, release))
        holder.start()
        try:
            assert wait_until(
                lambda: total(pod.samples(), "bgremove_memory_reserved_bytes") >= len(png) // 2, 30
            )
            victims = pod.workers()  # both: the one holding the upload among them
            for victim in victims:
                os.kill(victim, signal.SIGKILL)
            assert wait_until(lambda: len(pod.workers()) == 2 and not set(victims) & set(pod.workers()), 60)
            assert wait_until(pod.all_serving, 60)
            assert wait_until(lambda: total(pod.samples(), "bgremove_memory_reserved_bytes") == 0, 10)
            served = _until_both_answered(pod, png, 12)
            assert served == [side] * len(served)
        finally:
            release.set()
            holder.join(180)
