"""TLS mismatches against the real gateway: each says its likely cause, not only "Socket closed".

The mutual-TLS gateway here reuses the session gateway's embedded Triton (--triton-url), so it
starts in about a second; the session gateway itself is the plaintext one.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from skimage import data as skdata

from bgremove import BgRemoveError, Client
from bgremove.errors import ConnectionHint
from e2e_helpers import jpeg_bytes
from pki import Pki, make_pki
from service_harness import BGREMOVE, GatewayProcess

JPEG = jpeg_bytes(skdata.chelsea())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_gateway(gateway: GatewayProcess, pki: Pki) -> Iterator[GatewayProcess]:
    """TLS that requires a client certificate from the test CA; no API keys."""
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
        ]
    )
    gw.start()
    try:
        # The health check speaks plaintext, which this listener refuses: wait for a real call.
        _wait_for_tls(gw, pki)
        yield gw
    finally:
        gw.stop()


def _wait_for_tls(gw: GatewayProcess, pki: Pki) -> None:
    with _client(gw.target, pki, "client") as client:
        for _ in range(240):
            assert gw.proc is not None and gw.proc.poll() is None, gw.log_text()
            try:
                client.service_info(timeout=5)
                return
            except BgRemoveError:
                time.sleep(0.5)
    raise RuntimeError("mutual-TLS gateway not serving:\n" + gw.log_text())


def _client(target: str, pki: Pki, cert: str | None) -> Client:
    return Client(
        target,
        root_certificates=pki.ca,
        certificate_chain=Path(pki.path(f"{cert}.pem")).read_bytes() if cert else None,
        private_key=Path(pki.path(f"{cert}.key")).read_bytes() if cert else None,
        timeout=30,
    )


def _remove(tmp_path: Path, target: str, *flags: str) -> subprocess.CompletedProcess[str]:
    photo = tmp_path / "in.jpg"
    photo.write_bytes(JPEG)
    return subprocess.run(
        [BGREMOVE, "remove", str(photo), "-o", str(tmp_path / "out.png"), "--target", target, *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _tls_flags(pki: Pki, cert: str | None) -> list[str]:
    flags = ["--tls-ca", pki.path("ca.pem")]
    if cert:
        flags += ["--tls-cert", pki.path(f"{cert}.pem"), "--tls-key", pki.path(f"{cert}.key")]
    return flags


def test_the_cli_with_the_right_settings_gets_its_cutout(
    mtls_gateway: GatewayProcess, pki: Pki, tmp_path: Path
) -> None:
    out = _remove(tmp_path, mtls_gateway.target, *_tls_flags(pki, "client"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("flags", "hint"),
    [
        # Plaintext against the TLS listener: gRPC says only "Socket closed".
        ("plaintext", ConnectionHint.SERVER_MAY_USE_TLS),
        # TLS without the client certificate the listener requires: "Socket closed" as well.
        ("no-cert", ConnectionHint.SERVER_MAY_WANT_A_CERTIFICATE),
        ("rogue-cert", ConnectionHint.SERVER_MAY_REFUSE_THE_CERTIFICATE),
        # TLS with the system's roots, which do not include the test CA.
        ("system-roots", ConnectionHint.SERVER_CERTIFICATE_UNTRUSTED),
    ],
)
def test_the_cli_names_the_likely_cause_against_mutual_tls(
    mtls_gateway: GatewayProcess, pki: Pki, tmp_path: Path, flags: str, hint: ConnectionHint
) -> None:
    chosen = {
        "plaintext": [],
        "no-cert": _tls_flags(pki, None),
        "rogue-cert": [
            *_tls_flags(pki, None),
            "--tls-cert",
            pki.path("rogue.pem"),
            "--tls-key",
            pki.path("rogue.key"),
        ],
        "system-roots": ["--tls"],
    }[flags]
    out = _remove(tmp_path, mtls_gateway.target, *chosen)
    assert out.returncode == 1
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"bgremove remove: cannot reach the server at {mtls_gateway.target}: ")
    assert line.endswith(f" ({hint.cli})")
    assert not (tmp_path / "out.png").exists()


def test_the_cli_with_tls_against_a_plaintext_gateway_hears_it_may_not_speak_tls(
    gateway: GatewayProcess, pki: Pki, tmp_path: Path
) -> None:
    out = _remove(tmp_path, gateway.target, *_tls_flags(pki, None))
    assert out.returncode == 1
    (line,) = out.stderr.splitlines()
    assert "Tls handshake failed" in line or "Ssl handshake failed" in line
    assert line.endswith(f" ({ConnectionHint.SERVER_MAY_NOT_SPEAK_TLS.cli})")
    assert "drop --tls" in line


def test_the_library_names_the_cause_in_its_own_words(mtls_gateway: GatewayProcess, pki: Pki) -> None:
    with Client(mtls_gateway.target, timeout=30) as client, pytest.raises(BgRemoveError) as caught:
        client.remove(JPEG)
    error = caught.value
    assert error.code is grpc.StatusCode.UNAVAILABLE
    assert "Socket closed" in error.message
    assert error.hint is ConnectionHint.SERVER_MAY_USE_TLS
    assert error.message.endswith(
        "(if the server uses TLS: pass tls=True or root_certificates; if it requires "
        "client certificates: certificate_chain and private_key too)"
    )
    with _client(mtls_gateway.target, pki, None) as client, pytest.raises(BgRemoveError) as caught:
        client.remove(JPEG)
    assert caught.value.message.endswith(
        "(the server may require a client certificate: pass certificate_chain and private_key)"
    )
