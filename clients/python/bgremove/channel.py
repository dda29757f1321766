"""Channel settings shared by the sync and asyncio clients."""

from __future__ import annotations

import ipaddress
import sys
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc

DEFAULT_TARGET = "127.0.0.1:50051"
MiB = 1024 * 1024

try:
    __version__ = metadata.version("bgremove-client")
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


class InsecureKeyWarning(UserWarning):
    """An API key is sent without TLS to a target that is not this machine: anyone on the network
    path can read it and call the service as its owner."""


# Target schemes that never leave this machine.
_LOCAL_SCHEMES = ("unix:", "unix-abstract:", "vsock:")


def is_local_target(target: str) -> bool:
    """True when a gRPC target can only reach this machine: a unix socket, localhost, or loopback
    addresses (127.0.0.0/8, ::1) as `host:port`, `[::1]:port`, `dns:///host:port`,
    `ipv4:127.0.0.1:50051` or `ipv6:[::1]:50051`. A host name other than localhost may resolve
    anywhere, so it is not local."""
    text = target.strip()
    lowered = text.lower()
    if lowered.startswith(_LOCAL_SCHEMES):
        return True
    if lowered.startswith(("ipv4:", "ipv6:")):
        # One or more addresses, comma-separated: all of them must be loopback.
        return all(_is_loopback_host(_host(part)) for part in text[5:].split(","))
    if lowered.startswith("dns:"):
        text = text[4:]
        if text.startswith("//"):  # dns://[authority]/host:port: the authority is the DNS server
            text = text[2:].partition("/")[2]
    elif "://" in text:  # another resolver (xds, a custom one): nothing to tell where it leads
        return False
    return _is_loopback_host(_host(text))


def _host(address: str) -> str:
    """ "host:port" -> "host", "[::1]:50051" -> "::1", "::1" -> "::1", "host" -> "host"."""
    address = address.strip()
    if address.startswith("["):
        return address[1:].partition("]")[0]
    if address.count(":") > 1:  # a bare IPv6 address, no port
        return address
    return address.partition(":")[0]


def _is_loopback_host(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def plaintext_key_warning(target: str, *, api_key: str | None, tls: bool, hint: str) -> str | None:
    """The warning to give when an API key would go in plaintext to another machine; None when
    there is no key, TLS is on, or the target is this machine. `hint` says how to turn TLS on."""
    if not api_key or tls or is_local_target(target):
        return None
    return (
        f"the API key is sent without TLS to {target}, which is not this machine: anyone on the "
        f"network path can read it and use it; {hint}"
    )


_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def warn_outside(warning: Warning) -> None:
    """warnings.warn, attributed to the first caller outside this package (what Python 3.12's
    skip_file_prefixes does), so the line shown is the user's, however deep the call came from."""
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and _in_package(frame.f_code.co_filename):
        level, frame = level + 1, frame.f_back
    warnings.warn(warning, stacklevel=level + 1)


def _in_package(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(_PACKAGE_DIR + "/")
