"""Startup failures, a dead backend, and graceful drain, each with a real gateway process."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from e2e_helpers import jpeg_bytes, stream_remove, upload_messages
from service_harness import BGREMOVE, GatewayProcess, free_port


def _run_serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BGREMOVE, "serve", *args], capture_output=True, text=True, timeout=timeout)


def test_port_taken_is_one_clear_line() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        out = _run_serve("--listen", f"127.0.0.1:{port}", "--triton-url", "127.0.0.1:1", timeout=60)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("bgremove serve: cannot listen on 127.0.0.1:") and str(port) in last
    assert "Traceback" not in out.stderr


def _occupy(port: int) -> socket.socket | None:
    """Listens on 127.0.0.1:`port`; None when something else already does (taken either way)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    sock.listen()
    return sock


@pytest.mark.parametrize("workers", [1, 2])
def test_default_http_and_metrics_ports_taken_leave_grpc_serving(
    gateway: GatewayProcess, workers: int
) -> None:
    # A second gateway beside `make run`: its defaults are taken; it serves gRPC and says what it lacks.
    held = [_occupy(8080), _occupy(9464)]
    try:
        env = {
            "BGREMOVE_HTTP_LISTEN": "127.0.0.1:8080",
            "BGREMOVE_METRICS_LISTEN": "127.0.0.1:9464",
            "BGREMOVE_WORKERS": str(workers),
        }
        second = GatewayProcess(args=["--triton-url", f"127.0.0.1:{gateway.triton_grpc_port}"], env=env)
        with second.serving():
            log = second.log_text()
            assert "127.0.0.1:8080" in log and "serving no HTTP API" in log
            assert "serving no metrics" in log
    finally:
        for sock in held:
            if sock is not None:
                sock.close()


def test_an_http_address_asked_for_must_be_free() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        out = _run_serve(
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--http-listen",
            f"127.0.0.1:{port}",
            "--triton-url",
            "127.0.0.1:1",
            "--workers",
            "1",
            timeout=60,
        )
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"bgremove serve: cannot serve HTTP on 127.0.0.1:{port}: Address already in use")


def test_missing_model_repository_is_one_clear_line(tmp_path: Path) -> None:
    out = _run_serve(
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--model-repository",
        str(tmp_path / "nowhere"),
        "--triton-grpc-port",
        str(free_port()),
        "--triton-http-port",
        str(free_port()),
        "--triton-metrics-port",
        str(free_port()),
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("bgremove serve:") and "prepare-models" in last


def test_triton_down_fails_fast_with_unavailable() -> None:
    gw = GatewayProcess(args=["--triton-url", f"127.0.0.1:{free_port()}"])
    gw.start()
    try:
        deadline = time.monotonic() + 30
        while gw.health() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert gw.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        started = time.monotonic()
        with grpc.insecure_channel(gw.target) as channel, pytest.raises(grpc.RpcError) as err:
            list(
                pb_grpc.BackgroundRemovalStub(channel).StreamRemoveBackground(
                    upload_messages(jpeg_bytes(skdata.chelsea()), "image/jpeg"), timeout=30
                )
            )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not ready" in (err.value.details() or "")
        assert time.monotonic() - started < 5
    finally:
        assert gw.stop() == 0


def test_sigterm_finishes_in_flight_streams_and_refuses_new(gateway: GatewayProcess) -> None:
    """A second gateway over the session's Triton: SIGTERM with 20 uploads half sent; all 20 still
    complete, while health turns NOT_SERVING and new calls are refused."""
    gw = GatewayProcess(
        args=["--triton-url", f"127.0.0.1:{gateway.triton_grpc_port}", "--drain-seconds", "90"]
    )
    gw.start()
    gw.wait_serving()
    jpeg = jpeg_bytes(skdata.chelsea())
    released = threading.Event()
    started = threading.Semaphore(0)
    results: list[object] = []

    def held_upload():  # type: ignore[no-untyped-def]
        msgs = list(upload_messages(jpeg, "image/jpeg", chunk=8192))
        yield from msgs[:2]
        started.release()
        released.wait(60)
        yield from msgs[2:]

    def client() -> None:
        with grpc.insecure_channel(gw.target) as channel:
            try:
                got = list(
                    pb_grpc.BackgroundRemovalStub(channel).StreamRemoveBackground(held_upload(), timeout=180)
                )
                results.append(got[0].header.width)
            except grpc.RpcError as exc:
                results.append(exc.code())

    threads = [threading.Thread(target=client) for _ in range(20)]
    for t in threads:
        t.start()
    for _ in threads:
        assert started.acquire(timeout=30)
    time.sleep(0.5)  # the second chunk reaches the gateway
    assert gw.proc is not None
    gw.proc.send_signal(15)
    time.sleep(1.0)
    assert gw.health() in (health_pb2.HealthCheckResponse.NOT_SERVING, None)
    with grpc.insecure_channel(gw.target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as err:
            list(stub.StreamRemoveBackground(upload_messages(jpeg, "image/jpeg"), timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    released.set()
    for t in threads:
        t.join(120)
    assert results == [451] * 20
    assert gw.proc.wait(60) == 0
    # The shared Triton is untouched.
    assert stream_remove(gateway.target, jpeg)[0].width == 451
