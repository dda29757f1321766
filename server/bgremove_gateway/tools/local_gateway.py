"""A gateway of the benchmark's own: `bgremove serve` with an embedded Triton on free loopback
ports, started for one measurement and stopped after it (`bgremove bench --serve`)."""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_POLL_S = 0.5


@dataclass(frozen=True)
class LocalGateway:
    target: str  # the gateway's gRPC address
    triton_url: str  # its embedded Triton's gRPC address, for Triton-direct runs
    pid: int  # the gateway process, whose CPU time the bench reads


class GatewayStartError(RuntimeError):
    """The gateway exited or did not become SERVING in time; the message ends with its last log lines."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return bool(check.status == health_pb2.HealthCheckResponse.SERVING)


def _drain(stream: IO[bytes], lines: collections.deque[str]) -> None:
    """Keeps the gateway's last log lines for an error message; reading also keeps its pipe from filling."""
    for raw in stream:
        lines.append(raw.decode("utf-8", "replace").rstrip())


@contextlib.contextmanager
def local_gateway(
    load_models: Sequence[str] = (),
    model_repository: Path | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 240.0,
) -> Iterator[LocalGateway]:
    """Starts the gateway (serving `load_models` as well as the default ones), yields it once
    SERVING, and stops it (SIGTERM, then SIGKILL) on the way out."""
    target, triton_port = f"127.0.0.1:{free_port()}", free_port()
    argv = [sys.executable, "-m", "bgremove_gateway.cli", "serve", "--listen", target]
    argv += ["--triton-grpc-port", str(triton_port), "--triton-http-port", str(free_port())]
    argv += ["--triton-metrics-port", str(free_port()), "--log-level", "WARNING", "--drain-seconds", "2"]
    argv += [f"--load-model={m}" for m in load_models]
    if model_repository is not None:
        argv += ["--model-repository", str(model_repository)]
    argv += list(extra_args)
    # No exporter and no fixed side listeners (metrics, HTTP API), which a running `make run` holds;
    # an environment variable for a flag this build lacks is simply ignored.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env |= {"BGREMOVE_METRICS_LISTEN": "", "BGREMOVE_HTTP_LISTEN": ""}
    proc = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    log: collections.deque[str] = collections.deque(maxlen=20)
    reader = threading.Thread(target=_drain, args=(proc.stdout, log), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _serving(target):
            if proc.poll() is not None or time.monotonic() > deadline:
                state = (
                    f"exited with {proc.returncode}" if proc.returncode is not None else "not SERVING in time"
                )
                raise GatewayStartError(f"the bench's gateway {state}: " + " | ".join(log))
            time.sleep(_POLL_S)
        yield LocalGateway(target, f"127.0.0.1:{triton_port}", proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(5)
