"""The real tritonserver from the nvidia-pytriton wheel, started by EmbeddedTriton on free
loopback ports: readiness, inference, dynamic batching, tracing, startup failures, clean stop."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
import pytest_asyncio
import skimage.data
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from PIL import Image

from bgremove_gateway.config import TritonSettings
from bgremove_gateway.triton.embedded import (
    TRACE_SERVICE_NAME,
    EmbeddedTriton,
    TritonStartError,
    _child_pids,
    parent_death_launch,
    process_alive,
)
from bgremove_gateway.triton.graph import ModelSource, available_models, prepare_model
from service_harness import OtlpReceiver, free_port
from synthetic_models import md5, synthetic_u2net

pytestmark = pytest.mark.slow

SIZE = 320
Image8 = npt.NDArray[np.uint8]


def settings(repo: Path, **overrides: object) -> TritonSettings:
    values: dict[str, object] = {
        "grpc_port": free_port(),
        "http_port": free_port(),
        "metrics_port": free_port(),
        "model_repository": repo,
        "startup_timeout_s": 120.0,
    }
    values.update(overrides)
    return TritonSettings(**values)  # type: ignore[arg-type]


def copy_repo(prepared_repo: Path, target: Path, models: tuple[str, ...] = ("u2netp",)) -> Path:
    """A private copy of the repository (configs, model.py symlink, built graphs) so tests never
    touch the checkout's, which a developer's `make run` may be serving."""
    for model in models:
        shutil.copytree(
            prepared_repo / model,
            target / model,
            symlinks=True,
            ignore=shutil.ignore_patterns("__pycache__", "model.onnx"),
        )
        if (prepared_repo / model / "1/model.onnx").is_file():
            shutil.copy(prepared_repo / model / "1/model.onnx", target / model / "1/model.onnx")
    return target


def photo(name: str, seed: int = 0) -> Image8:
    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    pixels = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.LANCZOS))
    # Distinct inputs per request, so a mix-up between requests of one batch would show.
    return np.roll(pixels, seed * 7, axis=1)


def infer_input(pixels: Image8) -> grpcclient.InferInput:
    batch = pixels[np.newaxis]
    inp = grpcclient.InferInput("image", list(batch.shape), "UINT8")
    inp.set_data_from_numpy(batch)
    return inp


def in_process(model_file: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


def listening_addresses(port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Local addresses with a LISTEN socket on `port`, from /proc/net/tcp{,6}; IPv4-mapped
    IPv6 addresses (gRPC binds those) as their IPv4 form."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            hex_address, hex_port = local.rsplit(":", 1)
            if state != "0A" or int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(hex_address)  # 32-bit words in host (little-endian) order
            address = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            found.add(address)
    return found


def backend_dir_of(pid: int) -> Path:
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    (backend_dir,) = [Path(a.split("=", 1)[1]) for a in cmdline if a.startswith("--backend-directory=")]
    return backend_dir


def triton_args(pid: int) -> dict[str, str]:
    """Triton's --flag=value arguments, from its command line."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def remove_shm_leftovers(prefix: str) -> list[int]:
    """Removes what a Triton left in /dev/shm under its region prefix; returns their modes."""
    modes = []
    for path in Path("/dev/shm").glob(f"{prefix}*"):
        modes.append(path.stat().st_mode & 0o777)
        shutil.rmtree(path, ignore_errors=True)
    return modes


def wait_until(condition: Callable[[], object], timeout_s: float) -> None:
    """Polls `condition` (run it with asyncio.to_thread); returns when true or out of time."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.fixture(scope="module")
def repo(prepared_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """u2netp plus a u2net folder filled from a synthetic stand-in with U2-Net's I/O layout (the
    real u2net.onnx is not on PyPI); its model.py stays the symlink to u2netp's."""
    target = copy_repo(prepared_repo, tmp_path_factory.mktemp("repo"), ("u2netp", "u2net"))
    source = synthetic_u2net(tmp_path_factory.mktemp("src") / "u2net.onnx")
    prepare_model(source, ModelSource("u2net", md5(source), "synthetic U2-Net stand-in"), target)
    assert (target / "u2net/1/model.py").is_symlink()
    return target


@pytest_asyncio.fixture(scope="module")
async def triton(repo: Path) -> AsyncIterator[EmbeddedTriton]:
    server = EmbeddedTriton(settings(repo))
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture(scope="module")
async def client(triton: EmbeddedTriton) -> AsyncIterator[grpcclient_aio.InferenceServerClient]:
    c = grpcclient_aio.InferenceServerClient(triton.grpc_url)
    yield c
    await c.close()


async def test_serves_every_prepared_model_ready(
    triton: EmbeddedTriton, client: grpcclient_aio.InferenceServerClient, repo: Path
) -> None:
    assert triton.running and triton.pid is not None
    assert triton.models == available_models(repo) == ["u2net", "u2netp"]
    assert triton.grpc_url == f"127.0.0.1:{triton.settings.grpc_port}"
    assert await client.is_server_ready()
    for model in triton.models:
        assert await client.is_model_ready(model)
    assert "successfully loaded 'u2netp'" in triton.log_tail(200)


def test_every_port_is_bound_to_loopback_only(triton: EmbeddedTriton) -> None:
    s = triton.settings
    for port in (s.grpc_port, s.http_port, s.metrics_port):
        assert listening_addresses(port) == {ipaddress.ip_address("127.0.0.1")}, port


@pytest.mark.parametrize("model", ["u2netp", "u2net"])
async def test_infer_matches_the_model_run_in_process(
    client: grpcclient_aio.InferenceServerClient, repo: Path, model: str
) -> None:
    pixels = photo("astronaut")
    result = await client.infer(model, [infer_input(pixels)])
    mask = result.as_numpy("mask")
    assert mask.shape == (1, SIZE, SIZE) and mask.dtype == np.uint8
    session = in_process(repo / model / "1/model.onnx")
    expected = session.run(None, {"image": pixels[np.newaxis]})[0]
    assert np.abs(mask.astype(int) - expected.astype(int)).max() <= 1
    assert mask.min() == 0 and mask.max() == 255


async def test_concurrent_requests_are_batched_and_answered_each_with_its_own_mask(
    client: grpcclient_aio.InferenceServerClient, repo: Path
) -> None:
    images = [photo("coffee" if i % 2 else "astronaut", seed=i) for i in range(16)]
    before = await client.get_inference_statistics("u2netp", as_json=True)
    results = await asyncio.gather(*(client.infer("u2netp", [infer_input(p)]) for p in images))

    def batches(stats: dict[str, Any]) -> dict[int, int]:
        (model,) = stats["model_stats"]
        return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in model["batch_stats"]}

    # Triton updates its statistics just after answering: under load the last batch can be
    # missing from a read made at once, so read until every image is counted (or 10 s pass).
    deadline = time.monotonic() + 10
    while True:
        after = await client.get_inference_statistics("u2netp", as_json=True)
        new = {size: n - batches(before).get(size, 0) for size, n in batches(after).items()}
        if sum(size * n for size, n in new.items()) >= len(images) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert sum(size * n for size, n in new.items()) == len(images)
    assert max(size for size, n in new.items() if n) > 1, f"no batch larger than one: {new}"

    session = in_process(repo / "u2netp/1/model.onnx")
    for pixels, result in zip(images, results, strict=True):
        expected = session.run(None, {"image": pixels[np.newaxis]})[0]
        assert np.abs(result.as_numpy("mask").astype(int) - expected.astype(int)).max() <= 1


# ------------------------------------------------------------------------------- failures


async def test_taken_port_is_named_before_anything_starts(prepared_repo: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedTriton(settings(prepared_repo, http_port=port))
        started = time.monotonic()
        with pytest.raises(TritonStartError) as err:
            await server.start()
    first_line = str(err.value).splitlines()[0]
    assert f"127.0.0.1:{port}" in first_line and "already in use" in first_line
    assert server.pid is None and time.monotonic() - started < 2


@pytest.mark.parametrize("state", ["absent", "empty"])
async def test_repository_without_models_says_to_prepare_them(tmp_path: Path, state: str) -> None:
    repo = tmp_path / "models"
    if state == "empty":
        (repo / "u2netp" / "configs").mkdir(parents=True)
    server = EmbeddedTriton(settings(repo))
    with pytest.raises(TritonStartError, match=r"make models.*bgremove prepare-models") as err:
        await server.start()
    assert str(repo) in str(err.value)
    assert server.pid is None


async def test_triton_dying_at_start_reports_exit_code_and_log_tail(
    prepared_repo: Path, tmp_path: Path
) -> None:
    repo = copy_repo(prepared_repo, tmp_path / "models")
    (repo / "u2netp/1/model.onnx").write_bytes(b"not an onnx model")
    server = EmbeddedTriton(settings(repo))
    with pytest.raises(TritonStartError) as err:
        await server.start()
    first, *rest = str(err.value).splitlines()
    assert first.startswith("Triton exited with code 1 during startup: ")
    assert "load failed for model 'u2netp'" in first and "INVALID_PROTOBUF" in first
    assert rest[0] == "its last log lines:"
    assert any("Waiting for in-flight requests" in line for line in rest)
    assert server.pid is not None and not process_alive(server.pid) and not server.running


async def test_not_ready_in_time_is_reported_and_cleaned_up(prepared_repo: Path, tmp_path: Path) -> None:
    repo = copy_repo(prepared_repo, tmp_path / "models")
    server = EmbeddedTriton(settings(repo, startup_timeout_s=0.3))
    with pytest.raises(TritonStartError, match=r"^Triton was not ready within 0.3s \(not ready: server"):
        await server.start()
    assert server.pid is not None and not process_alive(server.pid)


# ------------------------------------------------------------------------ tracing and stop


async def test_traces_exactly_the_requests_with_a_traceparent_and_stops_cleanly(
    prepared_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Triton's OpenTelemetry SDK reads the standard variable: export every 100 ms, not 5 s.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    receiver = OtlpReceiver()
    server = EmbeddedTriton(
        settings(copy_repo(prepared_repo, tmp_path / "models")),
        otlp_traces_url=f"{receiver.endpoint}/v1/traces",
    )
    try:
        await server.start()
        assert server.pid is not None
        stubs = _child_pids(server.pid)
        assert stubs, "the Python backend stub runs as Triton's child"
        backend_dir = backend_dir_of(server.pid)
        assert (backend_dir / "python/triton_python_backend_stub").is_file()

        expected = {"InferRequest", "u2netp", "compute"}
        c = grpcclient_aio.InferenceServerClient(server.grpc_url)
        pixels = photo("chelsea")
        # Triton's OTLP exporter has been seen to drop a batch when the machine is saturated by the
        # rest of the suite: a fresh traced request is sent then, up to three times.
        sent: set[str] = set()
        for _attempt in range(3):
            trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
            sent.add(trace_id)
            await c.infer("u2netp", [infer_input(pixels)])
            await c.infer(
                "u2netp", [infer_input(pixels)], headers={"traceparent": f"00-{trace_id}-{parent}-01"}
            )
            await c.infer("u2netp", [infer_input(pixels)])
            await asyncio.to_thread(
                wait_until,
                lambda trace_id=trace_id: expected <= {s.name for s in receiver.trace(trace_id)},
                20,
            )
            if expected <= {s.name for s in receiver.trace(trace_id)}:
                break
        await c.close()

        await asyncio.sleep(1)  # ten export periods: spans of the untraced requests would be here too
        spans = receiver.trace(trace_id)
        assert {s.service for s in spans} == {TRACE_SERVICE_NAME}
        assert expected <= {s.name for s in spans}
        root = next(s for s in spans if s.name == "InferRequest")
        assert root.parent_id == parent
        # rate=0: the requests without a traceparent left no trace at all.
        assert {s.trace_id for s in receiver.spans} <= sent

        pid = server.pid
        await server.stop()
        assert not server.running and not process_alive(pid)
        assert not [p for p in stubs if process_alive(p)]
        assert not backend_dir.parent.exists(), "the private backend directory is removed on stop"
    finally:
        await server.stop()
        receiver.close()


async def test_stop_kills_a_triton_that_ignores_sigterm(prepared_repo: Path, tmp_path: Path) -> None:
    server = EmbeddedTriton(settings(copy_repo(prepared_repo, tmp_path / "models")))
    await server.start()
    pid = server.pid
    assert pid is not None
    stubs = _child_pids(pid)
    os.kill(pid, signal.SIGSTOP)  # a hung server: SIGTERM stays pending
    started = time.monotonic()
    await server.stop(timeout_s=1)
    assert time.monotonic() - started < 10
    assert not process_alive(pid) and not [p for p in stubs if process_alive(p)]
    await server.stop()  # idempotent


async def test_stop_after_triton_was_killed_also_kills_its_orphaned_stubs(
    prepared_repo: Path, tmp_path: Path
) -> None:
    """SIGKILL reaches tritonserver alone; its stubs, no longer its children, still hold the output
    pipe. stop() (which a restart runs first) finds them by process group and ends them at once."""
    server = EmbeddedTriton(settings(copy_repo(prepared_repo, tmp_path / "models")))
    await server.start()
    pid = server.pid
    assert pid is not None
    stubs = _child_pids(pid)
    assert stubs
    os.kill(pid, signal.SIGKILL)
    assert await server.wait() == -signal.SIGKILL
    started = time.monotonic()
    await server.stop()
    assert not [p for p in stubs if process_alive(p)]
    assert time.monotonic() - started < 1.5, "the output pipe closed without waiting for the stubs"


_ORPHAN_SCRIPT = """
import asyncio, sys
from pathlib import Path
from bgremove_gateway.config import TritonSettings
from bgremove_gateway.triton.embedded import EmbeddedTriton

async def main() -> None:
    ports = [int(p) for p in sys.argv[2:5]]
    triton = EmbeddedTriton(TritonSettings(grpc_port=ports[0], http_port=ports[1], metrics_port=ports[2],
                                           model_repository=Path(sys.argv[1])))
    await triton.start()
    print(triton.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_triton_does_not_outlive_a_crashed_gateway(prepared_repo: Path, tmp_path: Path) -> None:
    repo = copy_repo(prepared_repo, tmp_path / "models")
    ports = [str(free_port()) for _ in range(3)]
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _ORPHAN_SCRIPT, str(repo), *ports, stdout=asyncio.subprocess.PIPE
    )
    assert gateway.stdout is not None
    line = await asyncio.wait_for(gateway.stdout.readline(), 120)
    triton_pid = int(line)
    assert process_alive(triton_pid)
    leftover = backend_dir_of(triton_pid).parent  # a killed gateway cannot remove it; we do
    shm_prefix = triton_args(triton_pid)["backend-config"].rsplit("shm-region-prefix-name=", 1)[1]
    gateway.kill()  # no stop(), no cleanup: like an OOM kill
    await gateway.wait()
    await asyncio.to_thread(wait_until, lambda: not process_alive(triton_pid), 30)
    assert not process_alive(triton_pid), "Triton kept running after its parent died"
    shutil.rmtree(leftover, ignore_errors=True)
    # Triton's private /dev/shm is left behind too, as private as it was.
    assert set(remove_shm_leftovers(shm_prefix)) <= {0o700}


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


_LAUNCHER = """
import asyncio, sys
from bgremove_gateway.triton.embedded import parent_death_launch

async def main():
    prefix, preexec = parent_death_launch()
    child = await asyncio.create_subprocess_exec(
        *prefix, "sleep", "120", start_new_session=True, preexec_fn=preexec
    )
    print(child.pid, flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


def test_what_the_gateway_starts_dies_with_it_and_needs_no_preexec_fn() -> None:
    """Triton is started the same way: if the gateway is killed, the kernel stops its Triton too.
    No preexec_fn, so Python vforks and gRPC's fork handlers never run in the child."""
    prefix, preexec = parent_death_launch()
    assert preexec is None and Path(prefix[0]).name == "setpriv"
    parent = subprocess.Popen([sys.executable, "-c", _LAUNCHER], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        # The PID is known as soon as setpriv starts; the death signal is set only once setpriv has
        # run and executed the command. Killing the parent before that (a busy machine) would test
        # nothing and leave the child behind.
        wait_until(lambda: _command_name(child) == "sleep", 10)
        assert _command_name(child) == "sleep", "setpriv did not start the command"
        parent.kill()
        parent.wait(10)
        wait_until(lambda: not process_alive(child), 10)
        assert not process_alive(child), "the child outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
