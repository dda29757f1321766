"""Async load for the reliability tests: many concurrent calls, each with its exact outcome, and
what a process holds (RSS, peak RSS, open file descriptors) read from /proc."""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from e2e_helpers import upload_messages

MASK = pb.Options(format=pb.OUTPUT_FORMAT_MASK)


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    retry_after_s: float | None
    header: pb.ResultHeader | None
    body: bytes
    latency_s: float

    @property
    def ok(self) -> bool:
        return bool(self.code == grpc.StatusCode.OK)

    def mask(self) -> npt.NDArray[np.uint8]:
        return np.asarray(Image.open(io.BytesIO(self.body)))


def _retry_after(exc: grpc.RpcError) -> float | None:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds() / 1e9)
    return None


# Blocking gRPC on threads, not grpc.aio: when the server refuses a stream before the client has
# sent all of it (overload, not ready), grpc.aio can report INTERNAL "Internal error from Core"
# in place of the server's status (grpc/grpc#36066); these tests assert the exact status.
_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="load")


def _remove_blocking(
    stub: pb_grpc.BackgroundRemovalStub,
    messages: Iterator[pb.UploadRequest],
    timeout: float,
) -> Outcome:
    started = time.monotonic()
    header: pb.ResultHeader | None = None
    parts: list[bytes] = []
    try:
        for msg in stub.StreamRemoveBackground(messages, timeout=timeout):
            if msg.HasField("header"):
                header = msg.header
            else:
                parts.append(msg.chunk)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
        details: str = exc.details() or ""  # type: ignore[attr-defined]
        return Outcome(code, details, _retry_after(exc), None, b"", time.monotonic() - started)
    return Outcome(grpc.StatusCode.OK, "", None, header, b"".join(parts), time.monotonic() - started)


async def remove(
    stub: pb_grpc.BackgroundRemovalStub,
    data: bytes,
    options: pb.Options = MASK,
    *,
    messages: Iterator[pb.UploadRequest] | None = None,
    timeout: float = 120.0,
) -> Outcome:
    """One StreamRemoveBackground on a blocking stub (grpc.insecure_channel), run on a thread;
    never raises for a gRPC status, returns it."""
    upload = messages if messages is not None else upload_messages(data, "image/jpeg", options)
    return await asyncio.get_running_loop().run_in_executor(_THREADS, _remove_blocking, stub, upload, timeout)


async def drive(requests: int, concurrency: int, call: Callable[[int], Awaitable[Outcome]]) -> list[Outcome]:
    """`requests` calls, `concurrency` at a time; outcomes in request order."""
    results: list[Outcome | None] = [None] * requests
    indices = iter(range(requests))

    async def worker() -> None:
        for i in indices:
            results[i] = await call(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def codes(outcomes: list[Outcome]) -> Counter[str]:
    return Counter(o.code.name for o in outcomes)


def small_jpeg(array: npt.NDArray[np.uint8], width: int) -> bytes:
    image = Image.fromarray(array).convert("RGB")
    image = image.resize((width, max(1, round(image.height * width / image.width))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ------------------------------------------------------------------------------- /proc


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss_bytes(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def peak_rss_bytes(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


def reset_peak_rss(pid: int) -> None:
    """Starts VmHWM again from the current RSS (Linux clear_refs, value 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int, name: str) -> list[int]:
    """Direct children of `pid` whose command is `name`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        command = stat[stat.index("(") + 1 : stat.rindex(")")]
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and command == name[:15]:
            found.append(int(entry))
    return found
