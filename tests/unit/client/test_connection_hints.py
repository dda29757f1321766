"""A connection that fails in the TLS handshake says why it likely failed, not only "Socket closed".

Real handshakes against in-process gRPC servers (plaintext, TLS, mutual TLS) with certificates from
tests/support/pki.py; tests/e2e/test_tls_messages.py does the same against the real gateway."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image

from bgremove import AsyncClient, BgRemoveError, Client
from bgremove.errors import ConnectionHint, Transport, connection_hint
from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc
from loop_server import LoopThreadServer
from pki import Pki, make_pki


class Servicer(bgremove_pb2_grpc.BackgroundRemovalServicer):
    async def GetServiceInfo(
        self, request: pb.GetServiceInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetServiceInfoResponse:
        return pb.GetServiceInfoResponse(version="test")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _read(pki: Pki, name: str) -> bytes:
    return Path(pki.path(name)).read_bytes()


@pytest.fixture(scope="module")
def servers(pki: Pki) -> Iterator[dict[str, LoopThreadServer]]:
    pair = [(_read(pki, "server.key"), _read(pki, "server.pem"))]
    made = {
        "plaintext": LoopThreadServer(Servicer()),
        "tls": LoopThreadServer(Servicer(), grpc.ssl_server_credentials(pair)),
        "mtls": LoopThreadServer(
            Servicer(), grpc.ssl_server_credentials(pair, root_certificates=pki.ca, require_client_auth=True)
        ),
    }
    yield made
    for server in made.values():
        server.close()


def _settings(pki: Pki, client: str) -> dict[str, Any]:
    """Client keyword arguments: plaintext, TLS without a certificate, with ours, with a rogue one."""
    if client == "plaintext":
        return {}
    settings: dict[str, Any] = {"root_certificates": pki.ca}
    if client in ("ours", "rogue"):
        cert = "client" if client == "ours" else "rogue"
        settings.update(certificate_chain=_read(pki, f"{cert}.pem"), private_key=_read(pki, f"{cert}.key"))
    if client == "system-roots":
        settings = {"tls": True}
    return settings


CASES = [
    ("plaintext", "tls", ConnectionHint.SERVER_MAY_USE_TLS),
    ("plaintext", "mtls", ConnectionHint.SERVER_MAY_USE_TLS),
    ("no-cert", "mtls", ConnectionHint.SERVER_MAY_WANT_A_CERTIFICATE),
    ("rogue", "mtls", ConnectionHint.SERVER_MAY_REFUSE_THE_CERTIFICATE),
    ("no-cert", "plaintext", ConnectionHint.SERVER_MAY_NOT_SPEAK_TLS),
    ("ours", "plaintext", ConnectionHint.SERVER_MAY_NOT_SPEAK_TLS),
    ("system-roots", "tls", ConnectionHint.SERVER_CERTIFICATE_UNTRUSTED),
]


@pytest.mark.parametrize(("client", "server", "hint"), CASES)
def test_sync_client_names_the_likely_cause(
    pki: Pki, servers: dict[str, LoopThreadServer], client: str, server: str, hint: ConnectionHint
) -> None:
    with Client(servers[server].target, timeout=10, **_settings(pki, client)) as c:
        with pytest.raises(BgRemoveError) as caught:
            c.service_info()
        with pytest.raises(BgRemoveError) as removing:
            c.remove(b"\xff\xd8\xff" + b"\0" * 64)
    for error in (caught.value, removing.value):
        assert error.code is grpc.StatusCode.UNAVAILABLE
        assert error.hint is hint
        assert error.message.endswith(f" ({hint.api})")
        assert error.message_for_cli().endswith(f" ({hint.cli})")
        assert hint.api not in error.message_for_cli()


@pytest.mark.parametrize(("client", "server", "hint"), CASES)
def test_async_client_names_the_likely_cause(
    pki: Pki, servers: dict[str, LoopThreadServer], client: str, server: str, hint: ConnectionHint
) -> None:
    async def call() -> BgRemoveError:
        async with AsyncClient(servers[server].target, timeout=10, **_settings(pki, client)) as c:
            with pytest.raises(BgRemoveError) as caught:
                await c.remove(b"\xff\xd8\xff" + b"\0" * 64)
            return caught.value

    error = asyncio.run(call())
    assert (error.code, error.hint) == (grpc.StatusCode.UNAVAILABLE, hint)


@pytest.mark.parametrize("client", ["plaintext", "ours"])
def test_matching_settings_connect(pki: Pki, servers: dict[str, LoopThreadServer], client: str) -> None:
    server = "plaintext" if client == "plaintext" else "mtls"
    with Client(servers[server].target, timeout=10, **_settings(pki, client)) as c:
        assert c.service_info().version == "test"


@pytest.mark.parametrize("tls", [False, True])
def test_nothing_listening_gets_no_tls_hint(unused_tcp_port: int, tls: bool) -> None:
    with (
        Client(f"127.0.0.1:{unused_tcp_port}", tls=tls, timeout=10) as c,
        pytest.raises(BgRemoveError) as caught,
    ):
        c.service_info()
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert caught.value.hint is None
    assert caught.value.message.endswith("Connection refused")


@pytest.mark.parametrize(
    ("code", "details"),
    [
        # A call that loses an established connection: the server went away, not a TLS mismatch.
        (grpc.StatusCode.UNAVAILABLE, "Socket closed"),
        (grpc.StatusCode.UNAVAILABLE, "Connection reset by peer"),
        (grpc.StatusCode.UNAVAILABLE, "queue full"),
        (grpc.StatusCode.INTERNAL, "failed to connect to all addresses; last error: Socket closed"),
    ],
)
def test_other_failures_get_no_hint(code: grpc.StatusCode, details: str) -> None:
    for transport in (
        Transport(tls=False, client_certificate=False),
        Transport(tls=True, client_certificate=True),
    ):
        assert connection_hint(code, details, transport) is None


@pytest.mark.parametrize(
    ("server", "flags", "hint"),
    [
        ("mtls", [], ConnectionHint.SERVER_MAY_USE_TLS),
        ("mtls", ["--tls-ca", "{ca}"], ConnectionHint.SERVER_MAY_WANT_A_CERTIFICATE),
        ("plaintext", ["--tls-ca", "{ca}"], ConnectionHint.SERVER_MAY_NOT_SPEAK_TLS),
        ("tls", ["--tls"], ConnectionHint.SERVER_CERTIFICATE_UNTRUSTED),
    ],
)
def test_the_cli_says_it_in_one_line_with_its_flags(
    pki: Pki,
    servers: dict[str, LoopThreadServer],
    tmp_path: Path,
    server: str,
    flags: list[str],
    hint: ConnectionHint,
) -> None:
    photo = tmp_path / "a.jpg"
    Image.new("RGB", (8, 8)).save(photo)
    target = servers[server].target
    args = [f.format(ca=pki.path("ca.pem")) for f in flags]
    # gRPC's own log line on a failed handshake is muted by the command, not by this environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPC_VERBOSITY", "OTEL_"))}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bgremove.cli",
            "remove",
            photo,
            "-o",
            tmp_path / "a.png",
            "--target",
            target,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"bgremove remove: cannot reach the server at {target}: failed to connect")
    assert line.endswith(f" ({hint.cli})")
