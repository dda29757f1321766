"""Triton locked down against other local users: its admin APIs (model loading above all) refuse
calls without the per-start key on both ports while the gateway keeps serving, no model can be
loaded or unloaded even with the key, and the Python backend's shared memory (request tensors) is
out of other users' reach. Also: the gateway sends a configured key on every call."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2
from skimage import data as skdata
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from bgremove_gateway.config import TritonSettings, add_triton_arguments, triton_settings_from_args
from bgremove_gateway.triton.client import (
    ADMIN_HEADER,
    TritonInference,
    grpc_admin_headers,
    http_admin_headers,
)
from bgremove_gateway.triton.embedded import ADMIN_PROTOCOLS, SHM, EmbeddedTriton, private_shm_launch
from load_helpers import children, remove, small_jpeg
from service_harness import GatewayProcess, free_port

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
NOT_MODEL_CONTROL = "explicit model load / unload is not allowed"


def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *command], capture_output=True, text=True, check=False)


def triton_args(pid: int) -> dict[str, str]:
    """Triton's --flag=value arguments, read the way any local user can: /proc/PID/cmdline."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def refusals(grpc_url: str, http_url: str, key: str | None) -> dict[str, str]:
    """What Triton answers each admin call on both ports ("" where it was NOT refused), sending
    `key` as the admin key (None: none)."""
    g = grpcclient.InferenceServerClient(grpc_url)
    h = httpclient.InferenceServerClient(http_url)
    gh, hh = grpc_admin_headers(key), http_admin_headers(key)
    calls: dict[str, Callable[[], object]] = {
        "grpc index": lambda: g.get_model_repository_index(headers=gh),
        "grpc load": lambda: g.load_model("u2netp", headers=gh),
        "grpc unload": lambda: g.unload_model("u2netp", headers=gh),
        "grpc shared memory": lambda: g.register_system_shared_memory("x", "/x", 64, headers=gh),
        # Settings as they already are: a call that gets through changes nothing.
        "grpc trace": lambda: g.update_trace_settings(settings={"trace_rate": "1000"}, headers=gh),
        "grpc logging": lambda: g.update_log_settings(settings={"log_info": True}, headers=gh),
        "http index": lambda: h.get_model_repository_index(headers=hh),
        "http load": lambda: h.load_model("u2netp", headers=hh),
        "http unload": lambda: h.unload_model("u2netp", headers=hh),
        "http shared memory": lambda: h.get_system_shared_memory_status(headers=hh),
    }
    answers: dict[str, str] = {}
    try:
        for name, call in calls.items():
            try:
                call()
                answers[name] = ""
            except InferenceServerException as exc:
                answers[name] = exc.message() or str(exc)
    finally:
        g.close()
        h.close()
    return answers


# ------------------------------------------------------------------ the gateway's embedded Triton


@pytest.mark.slow
async def test_admin_apis_refuse_callers_without_the_key_while_the_gateway_serves(
    gateway: GatewayProcess,
) -> None:
    assert gateway.proc is not None
    (triton_pid,) = children(gateway.proc.pid, "tritonserver")
    args = triton_args(triton_pid)
    assert args["model-control-mode"] == "none" and "load-model" not in args
    grpc_url, http_url = f"127.0.0.1:{args['grpc-port']}", f"127.0.0.1:{args['http-port']}"
    protocols, _, header = args["grpc-restricted-protocol"].partition(":")
    assert set(protocols.split(",")) == set(ADMIN_PROTOCOLS) >= {"model-repository", "shared-memory"}
    assert args["http-restricted-api"] == args["grpc-restricted-protocol"]
    name, _, key = header.partition("=")
    assert name == ADMIN_HEADER and len(key) >= 32

    for attempt in (None, "wrong"):
        answers = await asyncio.to_thread(refusals, grpc_url, http_url, attempt)
        for call, answer in answers.items():
            assert "restricted, expecting header" in answer, (call, answer)

    # Nothing changed: the model is still there and the gateway serves with it.
    client = grpcclient_aio.InferenceServerClient(grpc_url)
    try:
        assert await client.is_model_ready("u2netp")
    finally:
        await client.close()
    assert gateway.health() == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        info = stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10)
        assert [(m.name, m.ready) for m in info.models if m.name == "u2netp"] == [("u2netp", True)]
        outcome = await remove(stub, small_jpeg(skdata.astronaut(), 160))
        assert outcome.ok, outcome.details
    # Never logged, not even in Triton's own output, which the session gateway logs at DEBUG.
    log = gateway.log_text()
    assert "starting Triton:" in log and "<admin key>" in log
    assert key not in log


# ------------------------------------------------------------------ an EmbeddedTriton of our own


@pytest_asyncio.fixture(scope="module")
async def triton(prepared_repo: Path) -> AsyncIterator[EmbeddedTriton]:
    server = EmbeddedTriton(
        TritonSettings(
            grpc_port=free_port(),
            http_port=free_port(),
            metrics_port=free_port(),
            model_repository=prepared_repo,
            startup_timeout_s=120.0,
        )
    )
    await server.start()
    yield server
    await server.stop()


@pytest.mark.slow
async def test_even_the_key_cannot_load_or_unload_a_model(triton: EmbeddedTriton) -> None:
    answers = await asyncio.to_thread(refusals, triton.grpc_url, triton.http_url, triton.admin_key)
    for call in ("grpc load", "grpc unload", "http load", "http unload"):
        assert NOT_MODEL_CONTROL in answers[call], (call, answers[call])
    assert answers["grpc index"] == answers["http index"] == "", "the key opens the restricted APIs"

    client = grpcclient_aio.InferenceServerClient(triton.grpc_url)
    try:
        assert await client.is_model_ready("u2netp")
        index = await client.get_model_repository_index(
            headers=grpc_admin_headers(triton.admin_key), as_json=True
        )
    finally:
        await client.close()
    # Triton's repository holds the prepared, served models only.
    assert sorted(m["name"] for m in index["models"]) == triton.models


@pytest.mark.slow
async def test_shared_memory_is_out_of_other_users_reach(triton: EmbeddedTriton) -> None:
    assert os.geteuid() == 0, "reads as another user through setpriv"
    client = TritonInference(triton.grpc_url)
    try:
        mask = await client.infer("u2netp", np.asarray(skdata.astronaut()[:320, :320], np.uint8))
        assert mask.shape == (320, 320)
    finally:
        await client.close()
    regions = triton.shm_regions()
    assert regions, "the Python backend passes tensors to its stub through shared memory"
    for region in regions:
        assert region.stat().st_mode & 0o777 == 0o600, region
        read = await asyncio.to_thread(as_nobody, "cat", str(region))
        assert read.returncode != 0 and "Permission denied" in read.stderr, read
    if private_shm_launch(SHM) is None:
        pytest.skip("this system allows no mount namespace: Triton shares /dev/shm (regions made 0600)")
    # Triton's /dev/shm is a directory of its own that other users cannot even list.
    assert triton.shm_private and triton.shm_dir is not None and triton.shm_dir.parent == SHM
    assert triton.shm_dir.stat().st_mode & 0o777 == 0o700
    assert not {r.name for r in regions} & set(os.listdir(SHM))
    listing = await asyncio.to_thread(as_nobody, "ls", str(triton.shm_dir))
    assert listing.returncode != 0 and "Permission denied" in listing.stderr


_AS_NOBODY = """
import json, subprocess, sys, tempfile
from pathlib import Path
from bgremove_gateway.triton.embedded import SHM, private_shm_launch

private = Path(tempfile.mkdtemp(prefix="bgremove-test-", dir=SHM))
prefix = private_shm_launch(private)
if prefix is not None:
    subprocess.run([*prefix, "sh", "-c", "umask 022; : > /dev/shm/region"], check=True)
print(json.dumps({"prefix": prefix, "dir": str(private), "files": sorted(p.name for p in private.iterdir())}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to another user through setpriv")
def test_an_unprivileged_user_gets_a_private_dev_shm_too() -> None:
    """What a gateway run by an ordinary user gives its Triton: a user namespace where it may bind
    its own directory on /dev/shm (root needs no user namespace)."""
    allowed = subprocess.run(
        [*NOBODY, "unshare", "--user", "--map-root-user", "--mount", "true"], check=False
    )
    if allowed.returncode != 0:
        pytest.skip("this system allows unprivileged users no user namespace")
    run = subprocess.run(
        [*NOBODY, sys.executable, "-c", _AS_NOBODY], capture_output=True, text=True, check=True, cwd="/"
    )
    result = json.loads(run.stdout)
    private = Path(result["dir"])
    try:
        assert result["prefix"] is not None and "--user" in result["prefix"]
        assert result["files"] == ["region"], "what the command put in /dev/shm is in the private directory"
        assert private.stat().st_mode & 0o777 == 0o700 and private.stat().st_uid == 65534
        assert "region" not in os.listdir(SHM)
    finally:
        subprocess.run(["rm", "-rf", str(private)], check=False)


def test_root_gets_a_mount_namespace_without_a_user_namespace(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("root only")
    prefix = private_shm_launch(tmp_path)
    if prefix is None:
        pytest.skip("this system allows no mount namespace")
    assert Path(prefix[0]).name == "unshare" and "--user" not in prefix and prefix[-1] == str(tmp_path)


# ------------------------------------------------------------------ the key for external Tritons


class _RecordingTriton(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Just enough of Triton for a probe; records the metadata of every call, and refuses the
    repository index the way a locked-down Triton does."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    def _record(self, name: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.calls.append((name, {k: str(v) for k, v in context.invocation_metadata() or ()}))

    async def ServerReady(self, request: Any, context: Any) -> service_pb2.ServerReadyResponse:
        self._record("ServerReady", context)
        return service_pb2.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: Any, context: Any) -> service_pb2.ModelReadyResponse:
        self._record(f"ModelReady {request.name}", context)
        return service_pb2.ModelReadyResponse(ready=request.name == "u2netp")

    async def ModelStatistics(self, request: Any, context: Any) -> service_pb2.ModelStatisticsResponse:
        self._record("ModelStatistics", context)
        stats = [service_pb2.ModelStatistics(name=n, version="1") for n in ("u2net", "u2netp")]
        return service_pb2.ModelStatisticsResponse(model_stats=stats)

    async def ModelMetadata(self, request: Any, context: Any) -> service_pb2.ModelMetadataResponse:
        self._record(f"ModelMetadata {request.name}", context)
        shapes = {"u2netp": [-1, 320, 320, 3], "isnet": [-1, 1024, 1024, 3], "odd": [-1, 320, 160, 3]}
        if request.name not in shapes:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.name}'")
        image = service_pb2.ModelMetadataResponse.TensorMetadata(
            name="image", datatype="UINT8", shape=shapes[request.name]
        )
        return service_pb2.ModelMetadataResponse(name=request.name, inputs=[image])

    async def RepositoryIndex(self, request: Any, context: Any) -> None:
        self._record("RepositoryIndex", context)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "This protocol is restricted")


@pytest_asyncio.fixture
async def recording_triton() -> AsyncIterator[tuple[str, _RecordingTriton]]:
    server = grpc.aio.server()
    servicer = _RecordingTriton()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", servicer
    await server.stop(0)


@pytest.mark.parametrize("key", [None, "s3cret-Key_1"])
async def test_probe_needs_no_restricted_api_and_sends_a_configured_key(
    recording_triton: tuple[str, _RecordingTriton], key: str | None
) -> None:
    url, servicer = recording_triton
    client = TritonInference(url, admin_key=key)
    try:
        # READY models only (u2net is loaded but not ready), without the repository index.
        assert await client.probe(timeout_s=5) == (["u2netp"], "")
    finally:
        await client.close()
    assert {name for name, _ in servicer.calls} == {
        "ServerReady",
        "ModelStatistics",
        "ModelReady u2net",
        "ModelReady u2netp",
    }
    for name, metadata in servicer.calls:
        sent = metadata.get(f"triton-grpc-protocol-{ADMIN_HEADER}")
        assert sent == key, name


async def test_input_sizes_come_from_model_metadata(recording_triton: tuple[str, _RecordingTriton]) -> None:
    url, servicer = recording_triton
    client = TritonInference(url, admin_key="s3cret-Key_1")
    try:
        sizes, problems = await client.input_sizes(["u2netp", "isnet", "odd", "gone"], timeout_s=5)
    finally:
        await client.close()
    assert sizes == {"u2netp": 320, "isnet": 1024}
    assert set(problems) == {"odd", "gone"}
    assert "no 'image' input of shape [N, S, S, 3]" in problems["odd"]
    assert "unknown model" in problems["gone"]
    for name, metadata in servicer.calls:
        assert metadata.get(f"triton-grpc-protocol-{ADMIN_HEADER}") == "s3cret-Key_1", name


@pytest.fixture
def no_bgremove_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in [n for n in os.environ if n.startswith("BGREMOVE_")]:
        monkeypatch.delenv(name)
    yield


def _triton_settings(argv: list[str], env: dict[str, str]) -> TritonSettings:
    parser = argparse.ArgumentParser()
    add_triton_arguments(parser, env)
    return triton_settings_from_args(parser.parse_args(argv))


def test_admin_key_file_from_flag_or_environment(tmp_path: Path, no_bgremove_env: None) -> None:
    key_file = tmp_path / "admin-key"
    key_file.write_text("s3cret-Key_1\n")
    assert _triton_settings([], {}).admin_key_file is None
    assert _triton_settings([], {}).read_admin_key() is None
    from_env = _triton_settings([], {"BGREMOVE_TRITON_ADMIN_KEY_FILE": str(key_file)})
    assert from_env.admin_key_file == key_file
    assert from_env.read_admin_key() == "s3cret-Key_1", "a trailing newline is not part of the key"
    from_flag = _triton_settings(
        ["--triton-admin-key-file", str(key_file)], {"BGREMOVE_TRITON_ADMIN_KEY_FILE": "/elsewhere"}
    )
    assert from_flag.admin_key_file == key_file
    assert "s3cret" not in repr(from_flag)


def test_unreadable_or_empty_admin_key_file_is_named_not_shown(tmp_path: Path) -> None:
    missing = TritonSettings(admin_key_file=tmp_path / "missing")
    with pytest.raises(ValueError, match=r"cannot read the Triton admin key file .*missing"):
        missing.read_admin_key()
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(ValueError, match=r"admin key file .*empty is empty"):
        TritonSettings(admin_key_file=tmp_path / "empty").read_admin_key()
