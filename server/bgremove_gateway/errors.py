"""One exception type for every refusal, carrying the gRPC status the caller will see.

Pipeline steps raise ServiceError; only the servicer and the access-control interceptor turn it
into a status (abort()), so each step stays testable without gRPC machinery and no stack trace ever
reaches a caller. How long each kind of refusal tells its caller to wait is set here, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

# --- RetryInfo: how long each refusal tells its caller to wait ----------------------------------
# The backend cannot serve (model loading, no replica ready, every replica tried failed): the pool
# probes every second and a replica's first ejection lasts one, so two seconds sees it change.
NOT_READY_RETRY_AFTER_S: Final = 2.0
# The gateway's memory budget or stream cap is full: about one request's run frees room.
BUDGET_RETRY_AFTER_S: Final = 1.0
# Triton's queue is full: about the time a full CPU batch takes, so a retry meets a moved-on queue.
OVERLOAD_RETRY_AFTER_S: Final = 1.0
# An API key is at its cap of calls in flight: a slot frees when one of its calls ends, about one
# inference on a busy CPU replica.
KEY_STREAMS_RETRY_AFTER_S: Final = 0.5
# --- How access control paces refusals (docs/decisions/code-refusal-pacing.md) -------------------
# Every refused call is answered after this pause, and key-check refusals ask for at least this
# much: a client that ignores RetryInfo then sends only as many calls per pause as it holds open.
REFUSAL_PAUSE_S: Final = 0.5
# The pause never grows past this, however long the RetryInfo it answers with.
MAX_REFUSAL_PAUSE_S: Final = 1.0
# What a RetryInfo shortened by the pause still asks for: a hint, never zero.
MIN_RETRY_AFTER_S: Final = 0.05
# Key-check refusals ask for their wait times a random 1 to 1 + this, so callers refused together
# come back spread out instead of in one burst (docs/decisions/code-refusal-pacing.md).
RETRY_SPREAD: Final = 1.0


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass
class ServiceError(Exception):
    code: grpc.StatusCode
    message: str
    violations: list[FieldViolation] = field(default_factory=list)
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def to_rpc_status(self) -> status_pb2.Status:
        """google.rpc.Status with BadRequest / RetryInfo details, for grpc_status.rpc_status.to_status."""
        details: list[any_pb2.Any] = []
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(bad)
            details.append(packed)
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            packed = any_pb2.Any()
            packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
            details.append(packed)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)


def invalid(field_name: str, message: str) -> ServiceError:
    """INVALID_ARGUMENT naming the offending field, mirrored in a BadRequest detail."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, [FieldViolation(field_name, message)])


def too_large(field_name: str, message: str) -> ServiceError:
    """Over a size limit: RESOURCE_EXHAUSTED, the status gRPC itself gives oversize messages, so
    clients handle our limits and the transport's the same way."""
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, [FieldViolation(field_name, message)])


async def abort(context: grpc.aio.ServicerContext, err: ServiceError) -> NoReturn:
    """Ends the call with `err`'s status, message and BadRequest/RetryInfo details."""
    status = rpc_status.to_status(err.to_rpc_status())
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")
