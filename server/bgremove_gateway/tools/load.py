"""Driving a running service with many calls at once, each ending in one exact outcome.

`bgremove bench` measures with it; the reliability tests (tests/support/load_helpers.py) load the
service with it. Streamed calls run on a blocking stub in threads, not on grpc.aio: when a server
refuses a stream before the client has sent all of it (overload, not ready), grpc.aio can report
INTERNAL "Internal error from Core" in place of the server's status (grpc/grpc#36066), which would
miscount what the service answered.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc
import httpx
import numpy as np
import numpy.typing as npt
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Outcome:
    """How one call ended: its status (a grpc.StatusCode, or its name such as "UNAVAILABLE"), the
    status message, the RetryInfo delay of a refusal, and a result's header and bytes."""

    code: grpc.StatusCode
    details: str = ""
    retry_after_s: float | None = None
    header: pb.ResultHeader | None = None
    body: bytes = b""
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.code, str):
            object.__setattr__(self, "code", grpc.StatusCode[self.code])

    @property
    def ok(self) -> bool:
        return bool(self.code == grpc.StatusCode.OK)

    @property
    def status(self) -> str:
        """The status's name: "OK", "RESOURCE_EXHAUSTED", ..."""
        name: str = self.code.name
        return name

    @property
    def retry_hinted(self) -> bool:
        """Whether a refusal said when to retry (google.rpc.RetryInfo)."""
        return self.retry_after_s is not None

    def mask(self) -> npt.NDArray[np.uint8]:
        """The result's image as an array (a MASK result: its matte)."""
        return np.asarray(Image.open(io.BytesIO(self.body)))


OK = Outcome(grpc.StatusCode.OK)

Call = Callable[[int], Awaitable[Outcome]]


def retry_after(exc: grpc.RpcError) -> float | None:
    """The delay a refused call's google.rpc.RetryInfo asks for; None when it carries none."""
    status = rpc_status.from_call(exc)
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds() / 1e9)
    return None


def upload_messages(
    data: bytes, content_type: str, options: pb.Options | None = None, chunk: int = 64 * 1024
) -> Iterator[pb.UploadRequest]:
    """A streamed upload of `data`: the header (with its SHA-256), then chunks of `chunk` bytes."""
    yield pb.UploadRequest(
        header=pb.UploadHeader(
            content_type=content_type,
            total_size=len(data),
            sha256=hashlib.sha256(data).digest(),
            options=options or pb.Options(),
        )
    )
    for i in range(0, len(data), chunk):
        yield pb.UploadRequest(chunk=data[i : i + chunk])


def stream_remove(
    stub: pb_grpc.BackgroundRemovalStub,
    messages: Iterable[pb.UploadRequest],
    timeout: float,
    *,
    keep_result: bool = True,
) -> Outcome:
    """One StreamRemoveBackground on a blocking stub (call it from a thread); never raises for a
    gRPC status, returns it. Without `keep_result` the result's bytes are read and dropped."""
    started = time.monotonic()
    header: pb.ResultHeader | None = None
    parts: list[bytes] = []
    try:
        for msg in stub.StreamRemoveBackground(iter(messages), timeout=timeout):
            if msg.HasField("header"):
                header = msg.header
            elif keep_result:
                parts.append(msg.chunk)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
        details: str = exc.details() or ""  # type: ignore[attr-defined]
        return Outcome(code, details, retry_after(exc), latency_s=time.monotonic() - started)
    return Outcome(grpc.StatusCode.OK, "", None, header, b"".join(parts), time.monotonic() - started)


async def drive(
    requests: int | range,
    concurrency: int,
    call: Call,
    record: Callable[[Outcome, float], None] | None = None,
) -> list[Outcome]:
    """Sends calls `requests` (a count, or the range of indices to send) on `concurrency` workers;
    returns their outcomes in request order. `record(outcome, latency_ms)` sees each as it ends."""
    indices = range(requests) if isinstance(requests, int) else requests
    pending = iter(indices)
    results: dict[int, Outcome] = {}

    async def worker() -> None:
        for i in pending:
            started = time.perf_counter()
            outcome = await call(i)
            if record is not None:
                record(outcome, (time.perf_counter() - started) * 1000)
            results[i] = outcome

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [results[i] for i in indices]


# The HTTP API's statuses as the gRPC codes Outcome counts (http/responses.py maps the other way).
HTTP_CODES: dict[int, grpc.StatusCode] = {
    200: grpc.StatusCode.OK,
    400: grpc.StatusCode.INVALID_ARGUMENT,
    403: grpc.StatusCode.UNAUTHENTICATED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def http_remove(
    client: httpx.Client, url: str, image: bytes, fields: dict[str, str], timeout: float
) -> Outcome:
    """One POST /v1.0/removebg (multipart, as remove.bg's clients send it) on a blocking client;
    never raises for an HTTP status, returns it as the gRPC code the gateway counts it under."""
    started = time.monotonic()
    try:
        r = client.post(url, files={"image_file": ("image", image)}, data=fields, timeout=timeout)
    except httpx.HTTPError as exc:
        return Outcome(grpc.StatusCode.UNAVAILABLE, type(exc).__name__, latency_s=time.monotonic() - started)
    latency = time.monotonic() - started
    if r.status_code != 200:
        retry = r.headers.get("retry-after")
        code = HTTP_CODES.get(r.status_code, grpc.StatusCode.UNKNOWN)
        return Outcome(code, r.text[:300], float(retry) if retry else None, latency_s=latency)
    return Outcome(grpc.StatusCode.OK, "", None, None, r.content, latency)
