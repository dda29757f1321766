"""What a listener demands of its callers: TLS, client certificates, API keys; decided at startup.

- Plaintext on a non-loopback address is refused unless --insecure says so explicitly.
- Auth is required on a non-loopback address: API keys (--api-keys-file) or client certificates
  (--tls-client-ca). Without either, --insecure allows anonymous calls (a trusted network, or TLS
  and auth done by a mesh); otherwise every call is refused.
- On loopback, auth is off unless keys are configured, so `make run` then `bgremove remove` works.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from bgremove_gateway.access.control import KeyStore, Policy
from bgremove_gateway.access.keys import KeyFileError
from bgremove_gateway.config import Security

log = logging.getLogger("bgremove.gateway")


class ListenerError(ValueError):
    """The listener's security settings cannot be used; one line that says why and what to give."""


def host_of(address: str) -> str:
    """ "0.0.0.0:50051" -> "0.0.0.0", "[::1]:50051" -> "::1", "localhost:1" -> "localhost"."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(address: str) -> bool:
    """True only for addresses that cannot be reached from another machine."""
    host = host_of(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ListenerError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class Listener:
    credentials: grpc.ServerCredentials | None  # None: plaintext
    policy: Policy


def server_credentials(security: Security) -> grpc.ServerCredentials | None:
    """TLS credentials from the PEM files, checked now: gRPC itself would only fail at a handshake."""
    cert, key, client_ca = security.tls_cert, security.tls_key, security.tls_client_ca
    if cert is None and key is None:
        if client_ca is not None:
            raise ListenerError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    if cert is None or key is None:
        raise ListenerError("--tls-cert and --tls-key go together: give both")
    cert_pem, key_pem = _read(cert, "certificate (--tls-cert)"), _read(key, "private key (--tls-key)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ListenerError(
            f"--tls-cert {cert} and --tls-key {key} are not a PEM certificate and its private key "
            f"({exc.reason})"
        ) from None
    ca_pem = None
    if client_ca is not None:
        ca_pem = _read(client_ca, "client CA (--tls-client-ca)")
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise ListenerError(
                f"--tls-client-ca {client_ca} is not a PEM CA certificate ({exc.reason})"
            ) from None
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=ca_pem is not None
    )


def listener(listen: str, security: Security) -> Listener:
    """Checks the settings against the rules above; ListenerError when they must not be served."""
    credentials = server_credentials(security)
    loopback = is_loopback(listen)
    if credentials is None and not loopback and not security.insecure:
        raise ListenerError(
            f"refusing plaintext gRPC on {listen}, which is not a loopback address: give --tls-cert "
            f"and --tls-key, or --insecure to allow plaintext on a trusted network"
        )
    keys = None
    if security.api_keys_file is not None:
        try:
            keys = KeyStore(security.api_keys_file)
        except KeyFileError as exc:
            raise ListenerError(str(exc)) from None
    client_certs = security.tls_client_ca is not None
    require_auth = not loopback and not security.insecure
    if credentials is None and not loopback:
        log.warning("serving plaintext on %s (--insecure): use TLS outside a trusted network", listen)
    if keys is None and not client_certs and require_auth:
        log.warning(
            "no API keys (--api-keys-file) and no client CA (--tls-client-ca) on non-loopback %s: "
            "every call will be refused UNAUTHENTICATED",
            listen,
        )
    if keys is not None and not len(keys):
        log.warning("keys file %s has no keys yet: add one with `bgremove keys add`", keys.path)
    if security.health_listen is not None and security.health_listen == listen:
        raise ListenerError(f"--health-listen {security.health_listen} must differ from --listen")
    return Listener(credentials, Policy(keys=keys, client_certs=client_certs, require_auth=require_auth))
