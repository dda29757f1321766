"""TLS and mutual TLS: the listener rules at startup, and real handshakes against the real gateway.

The gateways here reuse the session gateway's embedded Triton (--triton-url), so each starts in
about a second; the CA and certificates are made per module by tests/support/pki.py.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from skimage import data as skdata

from bgremove import BgRemoveError, Client
from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from bgremove_gateway.access.keys import KeyLimits, new_key, write_keys
from bgremove_gateway.access.tls import ListenerError, is_loopback, listener
from bgremove_gateway.config import Security
from e2e_helpers import jpeg_bytes
from pki import Pki, make_pki
from service_harness import BGREMOVE, GatewayProcess, free_port

JPEG = jpeg_bytes(skdata.chelsea())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def api_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("auth") / "keys.json"
    record, key = new_key("tls-tests", KeyLimits(rate=0, burst=0, max_streams=0))
    write_keys(path, [record])
    return path, key


# --- the rules, without a server ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.9.9.9:1", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("10.1.2.3:50051", False),
        ("gateway.internal:50051", False),
    ],
)
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_plaintext_on_loopback_needs_no_flag_and_no_auth() -> None:
    lst = listener("127.0.0.1:50051", Security())
    assert lst.credentials is None
    assert lst.policy.keys is None and not lst.policy.require_auth


def test_plaintext_on_a_pod_address_is_refused_without_insecure() -> None:
    with pytest.raises(ListenerError, match=r"refusing plaintext gRPC on 0\.0\.0\.0:50051.*--insecure"):
        listener("0.0.0.0:50051", Security())
    lst = listener("0.0.0.0:50051", Security(insecure=True))
    assert lst.credentials is None and not lst.policy.require_auth


def test_tls_on_a_pod_address_requires_auth(pki: Pki) -> None:
    security = Security(tls_cert=Path(pki.path("server.pem")), tls_key=Path(pki.path("server.key")))
    lst = listener("0.0.0.0:50051", security)
    assert lst.credentials is not None and lst.policy.require_auth


@pytest.mark.parametrize(
    ("files", "words"),
    [
        ({"tls_cert": "server.pem"}, "--tls-cert and --tls-key go together"),
        ({"tls_key": "server.key"}, "--tls-cert and --tls-key go together"),
        ({"tls_client_ca": "ca.pem"}, "--tls-client-ca needs --tls-cert and --tls-key"),
        (
            {"tls_cert": "server.pem", "tls_key": "client.key"},
            "are not a PEM certificate and its private key",
        ),
        ({"tls_cert": "ca.pem", "tls_key": "absent.key"}, "cannot read the private key"),
        ({"tls_cert": "server.pem", "tls_key": "server.key", "tls_client_ca": "server.key"}, "not a PEM CA"),
    ],
)
def test_unusable_tls_files_are_named(pki: Pki, files: dict[str, str], words: str) -> None:
    security = Security(**{k: Path(pki.path(v)) for k, v in files.items()})  # type: ignore[arg-type]
    with pytest.raises(ListenerError, match=words):
        listener("127.0.0.1:50051", security)


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BGREMOVE, "serve", "--triton-url", "127.0.0.1:1", *args], capture_output=True, text=True, timeout=60
    )


def test_serve_refuses_plaintext_on_a_non_loopback_address_in_one_line() -> None:
    port = free_port()
    out = _serve("--listen", f"0.0.0.0:{port}")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == (
        f"bgremove serve: refusing plaintext gRPC on 0.0.0.0:{port}, which is not a loopback address: "
        f"give --tls-cert and --tls-key, or --insecure to allow plaintext on a trusted network"
    )


def test_serve_names_a_bad_certificate_in_one_line(pki: Pki) -> None:
    out = _serve("--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("client.key"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("bgremove serve: --tls-cert ")


# --- real handshakes ------------------------------------------------------------------------------


def _start(args: list[str], health_port: int | None = None) -> GatewayProcess:
    gw = GatewayProcess(args=args, health_port=health_port)
    gw.start()
    try:
        gw.wait_serving()
    except BaseException:
        gw.stop()
        raise
    return gw


@pytest.fixture(scope="module")
def mtls_gateway(gateway: GatewayProcess, pki: Pki, api_key: tuple[Path, str]) -> Iterator[GatewayProcess]:
    """Mutual TLS and API keys on the serving port; plaintext health-only on another."""
    health_port = free_port()
    gw = _start(
        [
            "--triton-url",
            f"127.0.0.1:{gateway.triton_grpc_port}",
            "--tls-cert",
            pki.path("server.pem"),
            "--tls-key",
            pki.path("server.key"),
            "--tls-client-ca",
            pki.path("ca.pem"),
            "--api-keys-file",
            str(api_key[0]),
            "--health-listen",
            f"127.0.0.1:{health_port}",
        ],
        health_port,
    )
    yield gw
    gw.stop()


def _tls_client(pki: Pki, target: str, cert: str | None, key: str | None, api_key: str | None) -> Client:
    return Client(
        target,
        root_certificates=pki.ca,
        certificate_chain=Path(pki.path(cert)).read_bytes() if cert else None,
        private_key=Path(pki.path(key)).read_bytes() if key else None,
        api_key=api_key,
        timeout=60,
    )


@pytest.mark.slow
def test_mutual_tls_client_with_a_key_gets_its_cutout(
    mtls_gateway: GatewayProcess, pki: Pki, api_key: tuple[Path, str]
) -> None:
    with _tls_client(pki, mtls_gateway.target, "client.pem", "client.key", api_key[1]) as client:
        result = client.remove(JPEG)
    assert (result.width, result.height) == (451, 300) and result.data.startswith(b"\x89PNG")


@pytest.mark.slow
def test_plaintext_client_is_refused_on_the_tls_listener(mtls_gateway: GatewayProcess) -> None:
    with Client(mtls_gateway.target, timeout=10) as client, pytest.raises(BgRemoveError) as caught:
        client.remove(JPEG)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.slow
@pytest.mark.parametrize(("cert", "key"), [(None, None), ("rogue.pem", "rogue.key")])
def test_client_without_a_trusted_certificate_is_refused(
    mtls_gateway: GatewayProcess, pki: Pki, api_key: tuple[Path, str], cert: str | None, key: str | None
) -> None:
    """No client certificate, or one from another CA: the handshake fails before any request."""
    with (
        _tls_client(pki, mtls_gateway.target, cert, key, api_key[1]) as client,
        pytest.raises(BgRemoveError) as caught,
    ):
        client.remove(JPEG)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.slow
def test_a_trusted_certificate_still_needs_an_api_key(mtls_gateway: GatewayProcess, pki: Pki) -> None:
    with (
        _tls_client(pki, mtls_gateway.target, "client.pem", "client.key", None) as client,
        pytest.raises(BgRemoveError) as caught,
    ):
        client.remove(JPEG)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "requires an API key" in caught.value.message


@pytest.mark.slow
def test_health_listener_serves_health_in_plaintext_and_nothing_else(mtls_gateway: GatewayProcess) -> None:
    assert mtls_gateway.health() == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(f"127.0.0.1:{mtls_gateway.health_port}") as channel:
        status = (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service="bgremove.v1.BackgroundRemoval"), timeout=5)
            .status
        )
        assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(pb.GetServiceInfoRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.slow
def test_grpcurl_can_check_health_on_the_health_listener(mtls_gateway: GatewayProcess) -> None:
    grpcurl = Path(sys.executable).with_name("grpcurl")
    out = subprocess.run(
        [str(grpcurl), "-plaintext", f"127.0.0.1:{mtls_gateway.health_port}", "grpc.health.v1.Health/Check"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert '"status": "SERVING"' in out.stdout
    listed = subprocess.run(
        [str(grpcurl), "-plaintext", f"127.0.0.1:{mtls_gateway.health_port}", "list"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert listed.stdout.split() == ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]


@pytest.mark.slow
def test_cli_speaks_mutual_tls_with_an_api_key(
    mtls_gateway: GatewayProcess, pki: Pki, api_key: tuple[Path, str], tmp_path: Path
) -> None:
    photo = tmp_path / "in.jpg"
    photo.write_bytes(JPEG)
    out = subprocess.run(
        [
            BGREMOVE,
            "remove",
            str(photo),
            "-o",
            str(tmp_path / "out.png"),
            "--target",
            mtls_gateway.target,
            "--tls-ca",
            pki.path("ca.pem"),
            "--tls-cert",
            pki.path("client.pem"),
            "--tls-key",
            pki.path("client.key"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"BGREMOVE_API_KEY": api_key[1], "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG")


@contextlib.contextmanager
def pod_gateway(gateway: GatewayProcess, *args: str) -> Iterator[GatewayProcess]:
    """A gateway bound to 0.0.0.0 (reached here through 127.0.0.1), health on a plaintext port."""
    port, health_port = free_port(), free_port()
    gw = GatewayProcess(
        args=[
            "--listen",
            f"0.0.0.0:{port}",
            "--triton-url",
            f"127.0.0.1:{gateway.triton_grpc_port}",
            "--health-listen",
            f"127.0.0.1:{health_port}",
            *args,
        ],
        port=port,
        health_port=health_port,
    )
    with gw.serving():
        yield gw


@pytest.mark.slow
def test_tls_on_a_pod_address_with_keys(gateway: GatewayProcess, pki: Pki, api_key: tuple[Path, str]) -> None:
    """0.0.0.0 with TLS (no client certificates) and keys: a key is the way in."""
    tls = ("--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.key"))
    with pod_gateway(gateway, *tls, "--api-keys-file", str(api_key[0])) as gw:
        with _tls_client(pki, gw.target, None, None, api_key[1]) as client:
            assert client.remove(JPEG).width == 451
        with _tls_client(pki, gw.target, None, None, None) as client, pytest.raises(BgRemoveError) as caught:
            client.remove(JPEG)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.slow
def test_tls_on_a_pod_address_without_any_auth_refuses_every_call(gateway: GatewayProcess, pki: Pki) -> None:
    with pod_gateway(
        gateway, "--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.key")
    ) as gw:
        with _tls_client(pki, gw.target, None, None, None) as client, pytest.raises(BgRemoveError) as caught:
            client.remove(JPEG)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "no API keys configured" in caught.value.message
        assert "every call will be refused UNAUTHENTICATED" in gw.log_text()


@pytest.mark.slow
def test_insecure_allows_plaintext_on_a_pod_address(gateway: GatewayProcess) -> None:
    with pod_gateway(gateway, "--insecure") as gw:
        with Client(gw.target, timeout=60) as client:
            assert client.remove(JPEG).width == 451
        assert "serving plaintext on 0.0.0.0" in gw.log_text()


@pytest.mark.slow
def test_client_certificates_alone_authenticate_on_a_pod_address(gateway: GatewayProcess, pki: Pki) -> None:
    """Mutual TLS without API keys: the certificate is the credential, and its subject names the
    caller in the access log."""
    tls = ("--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.key"))
    with pod_gateway(gateway, *tls, "--tls-client-ca", pki.path("ca.pem")) as gw:
        with _tls_client(pki, gw.target, "client.pem", "client.key", None) as client:
            assert client.remove(JPEG).width == 451
        with (
            _tls_client(pki, gw.target, "rogue.pem", "rogue.key", None) as client,
            pytest.raises(BgRemoveError) as caught,
        ):
            client.remove(JPEG)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        time.sleep(0.3)
        assert "bgremove.access key=cn=client-a peer=" in gw.log_text()
