"""Channel settings shared by the sync and asyncio clients."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from typing import Any

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"
MiB = 1024 * 1024

try:
    __version__ = metadata.version("bgremove")
except metadata.PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"

# Results arrive in chunks (256 KiB by default), but a generous limit keeps a server configured with
# bigger chunks, or a large GetServiceInfo, from tripping gRPC's 4 MiB default.
_DEFAULTS: dict[str, Any] = {
    "grpc.max_receive_message_length": 64 * MiB,
    "grpc.max_send_message_length": 64 * MiB,
    # Servers refuse pings more frequent than their minimum interval (gRPC's default: 5 minutes,
    # answered with GOAWAY "too_many_pings"), so ping no faster than that; a call's deadline already
    # bounds how long a dead peer can hold it.
    "grpc.keepalive_time_ms": 300_000,
    "grpc.keepalive_timeout_ms": 20_000,
    "grpc.primary_user_agent": f"bgremove-python/{__version__}",
}


def channel_options(extra: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    """The defaults above, each overridden by the caller's option of the same name."""
    merged = dict(_DEFAULTS)
    merged.update(extra or ())
    return list(merged.items())


def channel_credentials(
    *,
    tls: bool,
    root_certificates: bytes | None,
    certificate_chain: bytes | None,
    private_key: bytes | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials when any TLS setting is given (system roots when no CA); None for plaintext."""
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("mutual TLS needs both certificate_chain and private_key")
    if not tls and root_certificates is None and certificate_chain is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates, private_key=private_key, certificate_chain=certificate_chain
    )


def call_metadata(api_key: str | None, carrier: dict[str, str]) -> list[tuple[str, str]]:
    """The API key as a bearer token, plus the trace-context headers the propagator produced."""
    pairs = [("authorization", f"Bearer {api_key}")] if api_key else []
    # gRPC metadata keys must be lowercase; W3C headers already are, but a custom propagator may not be.
    pairs.extend((key.lower(), value) for key, value in carrier.items())
    return pairs
