"""The chart's `helm test` pod, run here as the pod runs it: the rendered command (the gateway
image's Python with files/helm-test.py) and the pod's environment, against real gateways, with
only the Service address and file paths pointed at this machine."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_python import Chart

from bgremove_gateway.access.keys import KeyLimits, new_key, write_keys
from pki import Pki, make_pki
from service_harness import GatewayProcess, free_port

CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "bgremove"

Obj = dict[str, Any]


def rendered_test_pod(values: Obj) -> Obj:
    with Chart.load(CHART_DIR) as chart:
        manifests = chart.render(values, name="demo", namespace="imaging")
    (pod,) = [
        doc for doc in yaml.safe_load_all(manifests["bgremove/templates/tests/test-service.yaml"]) if doc
    ]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    found: Obj = pod
    return found


def run_pod(
    pod: Obj, target: str, files: dict[str, str] | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """The pod's container command with its environment; Secret values and the mounted files'
    paths come from `env` and `files` (mount path -> local directory)."""
    (c,) = pod["spec"]["containers"]
    assert c["command"][0] == "python"
    values = {e["name"]: e.get("value", "") for e in c["env"]}
    for mount, local in (files or {}).items():
        values = {name: value.replace(mount, local) for name, value in values.items()}
    values.update(env, BGREMOVE_TEST_TARGET=target)
    return subprocess.run(
        [sys.executable, *c["command"][1:]],
        env={"PATH": os.environ["PATH"], "GRPC_VERBOSITY": "ERROR", **values},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_passes_against_a_serving_gateway(gateway: GatewayProcess) -> None:
    result = run_pod(rendered_test_pod({}), gateway.target)
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout and "u2netp" in result.stdout


def test_fails_with_a_reason_when_the_service_is_down_or_open() -> None:
    result = run_pod(rendered_test_pod({}), f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "gRPC health check on 127.0.0.1:" in result.stderr and "UNAVAILABLE" in result.stderr


def test_keys_on_without_a_test_key_expects_a_refusal(gateway: GatewayProcess) -> None:
    pod = rendered_test_pod({"gateway": {"auth": {"enabled": True, "existingSecret": "keys"}}})
    # This gateway has no keys: an answer without one means auth is off, which the test must catch.
    result = run_pod(pod, gateway.target)
    assert result.returncode == 1 and "answered without an API key" in result.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def locked(
    gateway: GatewayProcess, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, str]]:
    """A gateway with mutual TLS and API keys, on the session gateway's Triton; and a key."""
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    record, key = new_key("helm-test", KeyLimits(rate=0, burst=0, max_streams=0))
    write_keys(keys, [record])
    gw = GatewayProcess(
        args=[
            "--triton-url",
            f"127.0.0.1:{gateway.triton_grpc_port}",
            "--tls-cert",
            pki.path("server.pem"),
            "--tls-key",
            pki.path("server.key"),
            "--tls-client-ca",
            pki.path("ca.pem"),
            "--api-keys-file",
            str(keys),
        ]
    )
    gw.start()
    try:
        yield gw, key
    finally:
        gw.stop()


def test_passes_over_mutual_tls_with_a_key(
    locked: tuple[GatewayProcess, str], pki: Pki, tmp_path: Path
) -> None:
    gw, key = locked
    pod = rendered_test_pod(
        {
            "gateway": {
                "tls": {"enabled": True, "existingSecret": "gw-cert", "clientAuth": True},
                "auth": {"enabled": True, "existingSecret": "gw-keys"},
            },
            "tests": {
                "tls": {"clientSecret": "client-cert", "serverName": "localhost"},
                "apiKey": {"existingSecret": "test-key"},
            },
        }
    )
    # The Secrets' files, where the pod mounts them.
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "ca.crt").write_bytes(pki.ca)
    (tmp_path / "client").mkdir()
    (tmp_path / "client" / "tls.crt").write_bytes(pki.client.cert)
    (tmp_path / "client" / "tls.key").write_bytes(pki.client.key)
    files = {
        "/etc/bgremove-test/ca": str(tmp_path / "ca"),
        "/etc/bgremove-test/client": str(tmp_path / "client"),
    }
    deadline = time.monotonic() + 240
    while True:  # the gateway starts while this runs; its health is not plaintext to poll
        result = run_pod(pod, gw.target, files, BGREMOVE_TEST_API_KEY=key)
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        assert gw.proc is not None and gw.proc.poll() is None, gw.log_text()
        time.sleep(1)
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout
    # A wrong key is refused, and the test says so.
    result = run_pod(pod, gw.target, files, BGREMOVE_TEST_API_KEY=key[:-2] + "xx")
    assert result.returncode == 1 and "GetServiceInfo" in result.stderr and "UNAUTHENTICATED" in result.stderr
    # Half a client certificate is named, and without one the handshake fails.
    (tmp_path / "client" / "tls.crt").unlink()
    result = run_pod(pod, gw.target, files, BGREMOVE_TEST_API_KEY=key)
    assert result.returncode == 1 and "needs both tls.crt and tls.key" in result.stderr
    (tmp_path / "client" / "tls.key").unlink()
    result = run_pod(pod, gw.target, files, BGREMOVE_TEST_API_KEY=key)
    assert result.returncode == 1 and "gRPC health check" in result.stderr
