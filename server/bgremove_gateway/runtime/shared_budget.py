"""The admission counters of a pod of gateway processes (--workers), shared so that the memory budget
and the stream cap hold for the pod as a whole, not 1/N in each worker.

The parent creates a small file in a private (0700) tmpfs directory: one slot per worker, each two
64-bit counters (bytes reserved, streams open), and nothing else: never image data. Every process of
the pod maps it. A check-and-reserve takes an exclusive flock on the file, sums the slots and writes
its own, so two workers can never together go over the budget; a worker writes only its own slot.
A dead worker's flock goes with it (the kernel drops it), and the parent zeroes its slot before
starting it again, so what it held is not lost to the pod.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

# The table's path, which the parent gives each worker in its environment.
ADMISSION_ENV: Final = "BGREMOVE_ADMISSION_TABLE"
# The pod's admission directory: this prefix, the parent's pid, a random part.
ADMISSION_PREFIX: Final = "bgremove-admission-"
TABLE_NAME: Final = "table"
# Counters per slot: bytes reserved, streams open.
FIELDS: Final = 2
COUNTER_BYTES: Final = 8


class AdmissionTable:
    """The pod's slots, mapped in this process; `locked()` around every read-check-write."""

    def __init__(self, path: Path, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"an admission table needs at least 1 slot, got {workers}")
        self.path = path
        self.workers = workers
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(self._fd).st_size
            if size != workers * FIELDS * COUNTER_BYTES:
                raise ValueError(f"admission table {path} holds {size} bytes, not {workers} slots")
            self._map = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        self._counters = memoryview(self._map).cast("q")

    @classmethod
    def create(cls, directory: Path, workers: int) -> AdmissionTable:
        """A new table of zeroed slots in `directory` (the parent's, before it starts any worker)."""
        path = directory / TABLE_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, workers * FIELDS * COUNTER_BYTES)  # a sparse file reads as zeros
        finally:
            os.close(fd)
        return cls(path, workers)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Excludes every other process of the pod (not this process's other threads: flock is per
        open file, hence MemoryBudget's own lock around this)."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def totals(self) -> tuple[int, int]:
        """(bytes reserved, streams open) summed over the pod's slots; exact under locked()."""
        c = self._counters
        return sum(c[0::FIELDS]), sum(c[1::FIELDS])

    def slot(self, index: int) -> tuple[int, int]:
        """(bytes reserved, streams open) of worker `index`."""
        at = self._at(index)
        return self._counters[at], self._counters[at + 1]

    def add(self, index: int, nbytes: int, streams: int) -> None:
        """Changes worker `index`'s own slot; call it under locked()."""
        at = self._at(index)
        self._counters[at] += nbytes
        self._counters[at + 1] += streams

    def clear(self, index: int) -> None:
        """Returns what worker `index` held to the pod: the parent does it once that worker is dead."""
        at = self._at(index)
        with self.locked():
            self._counters[at] = 0
            self._counters[at + 1] = 0

    def _at(self, index: int) -> int:
        if not 0 <= index < self.workers:
            raise ValueError(f"slot {index} of {self.workers} does not exist")
        return index * FIELDS

    def close(self) -> None:
        self._counters.release()  # the map cannot close while a view of it is alive
        self._map.close()
        os.close(self._fd)


def create_pod_table(base: Path, workers: int) -> AdmissionTable:
    """The parent's table in a new private directory under `base` (tmpfs: /dev/shm)."""
    directory = Path(tempfile.mkdtemp(prefix=f"{ADMISSION_PREFIX}{os.getpid()}-", dir=base))
    try:
        return AdmissionTable.create(directory, workers)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def remove_pod_table(table: AdmissionTable) -> None:
    """Unmaps the parent's table and removes its directory."""
    table.close()
    shutil.rmtree(table.path.parent, ignore_errors=True)
