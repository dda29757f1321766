"""One exception type for every refusal, carrying the gRPC status the caller will see.

Pipeline steps raise ServiceError; only the servicer turns it into a status, so each step stays
testable without gRPC machinery and no stack trace ever reaches a caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2


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
