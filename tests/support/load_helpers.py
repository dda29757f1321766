"""Async load for the reliability tests: many concurrent calls, each with its exact outcome (the
outcome, the blocking call and the driver are bgremove_gateway.tools.load's, which `bgremove bench`
uses too), and what a process holds (RSS, peak RSS, open file descriptors) read from /proc."""

from __future__ import annotations

import asyncio
import io
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from bgremove_gateway.tools.load import Outcome, drive, stream_remove
from e2e_helpers import upload_messages

__all__ = [
    "MASK",
    "Outcome",
    "children",
    "codes",
    "drive",
    "open_fds",
    "peak_rss_bytes",
    "remove",
    "reset_peak_rss",
    "rss_bytes",
    "small_jpeg",
]

MASK = pb.Options(format=pb.OUTPUT_FORMAT_MASK)

# Streamed calls run on blocking stubs in these threads, not on grpc.aio (see tools/load.py): these
# tests assert the exact status.
_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="load")


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
    return await asyncio.get_running_loop().run_in_executor(_THREADS, stream_remove, stub, upload, timeout)


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


def children(pid: int, name: str | None = None) -> list[int]:
    """Direct children of `pid` whose command is `name` (None: all of them)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        command = stat[stat.index("(") + 1 : stat.rindex(")")]
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and (name is None or command == name[:15]):
            found.append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
    """Children of `pid`, their children, and so on."""
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found
