"""What the HTTP API answers: remove.bg's result headers and JSON, its error shape, and the one table
that maps the gateway's gRPC status codes onto HTTP statuses.

remove.bg answers errors as `{"errors": [{"title": ..., "code": ..., "detail": ...}]}`; the detail is
the gateway's own message, which names the problem and the limit, as gRPC callers get it.
"""

from __future__ import annotations

import base64
import json
import math
import time
from dataclasses import dataclass
from typing import Final

import grpc
from starlette.responses import Response

from bgremove.v1 import bgremove_pb2 as pb
from bgremove_gateway.access.limits import Allowance
from bgremove_gateway.errors import ServiceError


@dataclass(frozen=True)
class HttpStatus:
    status: int
    title: str
    code: str  # remove.bg's machine-readable error code


@dataclass
class HttpError(ServiceError):
    """A refusal that only HTTP has (415, 408, ...): its own status, and a gRPC code for the metrics
    and the access log, which count both transports alike."""

    http: HttpStatus | None = None


# Every gRPC status the pipeline or access control raises, as HTTP answers it. RESOURCE_EXHAUSTED is
# three answers (see status_of): over a size limit, over a key's rate, or the gateway full.
STATUSES: Final[dict[grpc.StatusCode, HttpStatus]] = {
    grpc.StatusCode.INVALID_ARGUMENT: HttpStatus(400, "Invalid request", "invalid_request"),
    grpc.StatusCode.OUT_OF_RANGE: HttpStatus(400, "Invalid request", "invalid_request"),
    grpc.StatusCode.FAILED_PRECONDITION: HttpStatus(400, "Invalid request", "invalid_request"),
    grpc.StatusCode.UNAUTHENTICATED: HttpStatus(403, "Forbidden", "auth_failed"),
    grpc.StatusCode.PERMISSION_DENIED: HttpStatus(403, "Forbidden", "auth_failed"),
    grpc.StatusCode.NOT_FOUND: HttpStatus(404, "Not found", "not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: HttpStatus(413, "File too large", "file_too_large"),
    grpc.StatusCode.DEADLINE_EXCEEDED: HttpStatus(504, "Timeout", "timeout"),
    grpc.StatusCode.CANCELLED: HttpStatus(499, "Client closed request", "cancelled"),
    grpc.StatusCode.UNAVAILABLE: HttpStatus(503, "Service unavailable", "service_unavailable"),
    grpc.StatusCode.UNIMPLEMENTED: HttpStatus(501, "Not implemented", "not_implemented"),
    grpc.StatusCode.INTERNAL: HttpStatus(500, "Internal error", "internal_error"),
    grpc.StatusCode.UNKNOWN: HttpStatus(500, "Internal error", "internal_error"),
}
RATE_LIMITED: Final = HttpStatus(429, "Rate limit exceeded", "rate_limit_exceeded")
BUSY: Final = HttpStatus(503, "Service busy", "server_busy")
UNSUPPORTED_MEDIA: Final = HttpStatus(415, "Unsupported media type", "unsupported_media_type")
BODY_TIMEOUT: Final = HttpStatus(408, "Request timeout", "request_timeout")
TOO_LARGE: Final = STATUSES[grpc.StatusCode.RESOURCE_EXHAUSTED]
INTERNAL: Final = STATUSES[grpc.StatusCode.INTERNAL]


def status_of(err: ServiceError, *, by_key: bool = False) -> HttpStatus:
    """The HTTP answer to `err`; `by_key`: refused by the caller's own key limits (429, not 503)."""
    if isinstance(err, HttpError) and err.http is not None:
        return err.http
    if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.retry_after_s is not None:
        # A wait helps: the caller's key is over its rate or cap, or the gateway is full for now.
        return RATE_LIMITED if by_key else BUSY
    return STATUSES.get(err.code, INTERNAL)


def rate_headers(allowance: Allowance | None, now: float | None = None) -> dict[str, str]:
    """remove.bg's X-RateLimit-* for a key with a rate; none for a key without one."""
    if allowance is None or allowance.limit == 0:
        return {}
    now = time.time() if now is None else now
    return {
        "X-RateLimit-Limit": str(allowance.limit),
        "X-RateLimit-Remaining": str(max(0, allowance.remaining)),
        # remove.bg's Reset is a Unix time in seconds.
        "X-RateLimit-Reset": str(math.ceil(now + allowance.reset_s)),
    }


def error_response(err: ServiceError, headers: dict[str, str], *, by_key: bool = False) -> Response:
    status = status_of(err, by_key=by_key)
    body = {"errors": [{"title": status.title, "code": status.code, "detail": err.message}]}
    out = dict(headers)
    if err.retry_after_s is not None and status.status in (429, 503):
        out["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    return Response(json.dumps(body), status.status, out, media_type="application/json")


# remove.bg's X-Type: what it found in the photo. One U2-Net model tells no kinds apart.
FOREGROUND_TYPE: Final = "other"


def result_headers(header: pb.ResultHeader) -> dict[str, str]:
    """remove.bg's result headers: the output's size, and the subject's box in it."""
    box = header.foreground if header.HasField("foreground") else pb.BoundingBox()
    return {
        "X-Type": FOREGROUND_TYPE,
        "X-Width": str(header.width),
        "X-Height": str(header.height),
        "X-Foreground-Top": str(box.y),
        "X-Foreground-Left": str(box.x),
        "X-Foreground-Width": str(box.width),
        "X-Foreground-Height": str(box.height),
    }


def result_json(header: pb.ResultHeader, data: bytes) -> bytes:
    """remove.bg's JSON answer (`Accept: application/json`): the image in base64 and its figures."""
    box = header.foreground if header.HasField("foreground") else pb.BoundingBox()
    doc = {
        "data": {
            "result_b64": base64.b64encode(data).decode("ascii"),
            "foreground_top": box.y,
            "foreground_left": box.x,
            "foreground_width": box.width,
            "foreground_height": box.height,
            "width": header.width,
            "height": header.height,
            "type": FOREGROUND_TYPE,
        }
    }
    return json.dumps(doc).encode()
