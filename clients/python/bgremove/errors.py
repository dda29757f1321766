"""The one exception callers catch: the server's status code, message and rich details."""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> BgRemoveError:
        """Wraps a failed call (sync grpc.RpcError or grpc.aio.AioRpcError; both are grpc.Call)."""
        if not isinstance(error, _CALL_TYPES):
            return cls(grpc.StatusCode.UNKNOWN, str(error))
        code: grpc.StatusCode = error.code()
        message: str = error.details() or code.name
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
