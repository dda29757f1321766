"""The one exception callers catch: the server's status code, message and rich details."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import grpc

# protobuf ships no type stubs in this environment; the generated *_pb2.pyi cover our own messages.
from google.protobuf import message as pb_message  # type: ignore[import-untyped]
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

_DETAILS_KEY = "grpc-status-details-bin"
# grpc.aio replaces the server's status with this when the server ends a call while the client is
# still sending the upload, e.g. an overloaded server refusing it at once (grpc/grpc#36066). Our
# server never sends it; the sync API is not affected.
_AIO_LOST_STATUS = "Internal error from Core"
LOST_STATUS_RETRY_AFTER_S = 1.0
# A sync call's error is the grpc.Call itself; grpc.aio.AioRpcError is not a grpc.Call but has the
# same synchronous code() / details() / trailing_metadata().
_CALL_TYPES = (grpc.Call, grpc.aio.AioRpcError)


class ConnectionHint(enum.Enum):
    """The likely cause of a connection that failed during the TLS handshake, by what the client
    tried; gRPC itself says only "Socket closed" or an OpenSSL error code. Each value is the hint
    in the library's words, then in the CLI's flags."""

    # A plaintext client whose connection the server closed at once: a TLS listener does that.
    SERVER_MAY_USE_TLS = (
        "if the server uses TLS: pass tls=True or root_certificates; if it requires client "
        "certificates: certificate_chain and private_key too",
        "if the server uses TLS: connect with --tls or --tls-ca FILE; if it requires client "
        "certificates: give --tls-cert and --tls-key too",
    )
    # A TLS client without a certificate whose handshake the server ended: mutual TLS.
    SERVER_MAY_WANT_A_CERTIFICATE = (
        "the server may require a client certificate: pass certificate_chain and private_key",
        "the server may require a client certificate: give --tls-cert and --tls-key",
    )
    # A TLS client with a certificate whose handshake the server ended.
    SERVER_MAY_REFUSE_THE_CERTIFICATE = (
        "the server may not trust the client certificate (certificate_chain): it must be signed by a "
        "CA the server accepts",
        "the server may not trust the client certificate given with --tls-cert: it must be signed by "
        "a CA the server accepts",
    )
    # The server's certificate failed verification.
    SERVER_CERTIFICATE_UNTRUSTED = (
        "the server's certificate is not signed by a CA in root_certificates (or the system's roots)",
        "the server's certificate is not signed by a CA in --tls-ca (or the system's roots)",
    )
    # A TLS client whose handshake got an answer that was not TLS.
    SERVER_MAY_NOT_SPEAK_TLS = (
        "the server may not speak TLS: connect without tls, root_certificates and client certificates",
        "the server may not speak TLS: drop --tls, --tls-ca, --tls-cert and --tls-key",
    )

    @property
    def api(self) -> str:
        return self.value[0]

    @property
    def cli(self) -> str:
        return self.value[1]


@dataclass(frozen=True)
class Transport:
    """How a client connects, so a failed connection can be explained; see ConnectionHint."""

    tls: bool
    client_certificate: bool


# How gRPC words a connection the peer closed or reset during the handshake.
_CLOSED = ("socket closed", "connection reset", "end of file", "broken pipe", "connection closed")


def connection_hint(code: grpc.StatusCode, details: str, transport: Transport) -> ConnectionHint | None:
    """The likely cause of an UNAVAILABLE that failed while connecting, or None (a refused
    connection, an unknown host, a busy server: gRPC's own words say enough)."""
    if code is not grpc.StatusCode.UNAVAILABLE:
        return None
    text = details.lower()
    if "handshake failed" in text:
        if not transport.tls:
            return None
        if "certificate_verify_failed" in text:
            return ConnectionHint.SERVER_CERTIFICATE_UNTRUSTED
        return ConnectionHint.SERVER_MAY_NOT_SPEAK_TLS
    # Only while connecting: a call that loses an established connection says "Socket closed" too.
    if "failed to connect" not in text or not any(words in text for words in _CLOSED):
        return None
    if not transport.tls:
        return ConnectionHint.SERVER_MAY_USE_TLS
    if not transport.client_certificate:
        return ConnectionHint.SERVER_MAY_WANT_A_CERTIFICATE
    return ConnectionHint.SERVER_MAY_REFUSE_THE_CERTIFICATE


@dataclass(frozen=True)
class FieldViolation:
    """One entry of a google.rpc.BadRequest: which request field was wrong, and why."""

    field: str
    description: str


@dataclass
class BgRemoveError(Exception):
    code: grpc.StatusCode
    message: str
    # Field violations from a google.rpc.BadRequest detail (INVALID_ARGUMENT, RESOURCE_EXHAUSTED).
    violations: tuple[FieldViolation, ...] = ()
    # Seconds the server asked the caller to wait before retrying (google.rpc.RetryInfo).
    retry_after_s: float | None = None
    # Every detail of the rich status, unpacked where the type is known (BadRequest, RetryInfo, ...).
    details: tuple[pb_message.Message, ...] = field(default_factory=tuple)
    # The likely cause of a connection that failed in the TLS handshake; its words (.api) end message.
    hint: ConnectionHint | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def message_for_cli(self) -> str:
        """message, with the hint in the CLI's flags (--tls, ...) instead of the library's words."""
        if self.hint is None:
            return self.message
        return f"{self.message.removesuffix(f' ({self.hint.api})')} ({self.hint.cli})"

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, transport: Transport | None = None) -> BgRemoveError:
        """Wraps a failed call (sync grpc.RpcError or grpc.aio.AioRpcError; both are grpc.Call).

        With the client's transport, a connection that failed in the TLS handshake gets its likely
        cause appended to the message (see ConnectionHint)."""
        if not isinstance(error, _CALL_TYPES):
            return cls(grpc.StatusCode.UNKNOWN, str(error))
        code: grpc.StatusCode = error.code()
        message: str = error.details() or code.name
        hint = None if transport is None else connection_hint(code, message, transport)
        if hint is not None:
            return cls(code, f"{message} ({hint.api})", hint=hint)
        if (
            isinstance(error, grpc.aio.AioRpcError)
            and code == grpc.StatusCode.INTERNAL
            and message == _AIO_LOST_STATUS
        ):
            # Most often the refusal was "busy, retry": the caller retries once the hint has passed.
            return cls(
                grpc.StatusCode.UNKNOWN,
                "the server ended the call before the whole upload was sent and grpc.aio lost its "
                "status (grpc/grpc#36066); the server may be at capacity, retry",
                retry_after_s=LOST_STATUS_RETRY_AFTER_S,
            )
        status = _rich_status(error)
        if status is None:
            return cls(code, message)
        return cls.from_status(code, message, status)

    @classmethod
    def from_status(cls, code: grpc.StatusCode, message: str, status: status_pb2.Status) -> BgRemoveError:
        details: list[pb_message.Message] = []
        violations: list[FieldViolation] = []
        retry_after_s: float | None = None
        for packed in status.details:
            if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                packed.Unpack(bad)
                details.append(bad)
                violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
            elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                packed.Unpack(retry)
                details.append(retry)
                retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
            else:
                details.append(packed)
        return cls(code, message, tuple(violations), retry_after_s, tuple(details))


def _rich_status(error: grpc.Call | grpc.aio.AioRpcError) -> status_pb2.Status | None:
    try:
        status: status_pb2.Status | None = rpc_status.from_call(error)
        return status
    except ValueError:
        # from_call refuses a status whose code or message disagrees with the call's (a proxy may
        # rewrite the message); the details are still the server's, so keep them.
        for key, value in error.trailing_metadata() or ():
            if key == _DETAILS_KEY:
                return status_pb2.Status.FromString(value)
        return None
