"""The CPU time a gateway has used, from /proc: the gateway process and its children (the encode
workers), without the embedded Triton and what runs under it (its Python-backend stubs).

CPU seconds per request is the figure that survives a shared, noisy machine: throughput drifts
with whatever else runs, the CPU a request costs does not.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# Processes whose subtree is not the gateway's: the embedded Triton (its comm, 15 characters at most).
TRITON_COMMANDS = ("tritonserver",)


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    command: str
    cpu_s: float  # user + system time of all its threads, as /proc/PID/stat counts it


def read_stat(pid: int | str) -> ProcStat | None:
    """One process's /proc/PID/stat; None when it is gone or unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command sits in parentheses and may itself hold spaces or parentheses.
    command = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    # After the command: state, ppid, ... utime is field 14 and stime 15 of the whole line.
    utime, stime = int(fields[11]), int(fields[12])
    return ProcStat(int(pid), int(fields[1]), command, (utime + stime) / _TICKS_PER_S)


def _all_stats() -> list[ProcStat]:
    stats = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and (stat := read_stat(entry.name)) is not None:
                stats.append(stat)
    return stats


def gateway_processes(pid: int, exclude: Iterable[str] = TRITON_COMMANDS) -> list[ProcStat]:
    """`pid` and its descendants, less every subtree rooted at a command in `exclude`."""
    stats = _all_stats()
    children: dict[int, list[ProcStat]] = {}
    root = None
    for stat in stats:
        children.setdefault(stat.ppid, []).append(stat)
        if stat.pid == pid:
            root = stat
    if root is None:
        raise ProcessLookupError(f"no process {pid}")
    skip = set(exclude)
    found, pending = [], [root]
    while pending:
        stat = pending.pop()
        if stat.command in skip:
            continue
        found.append(stat)
        pending.extend(children.get(stat.pid, []))
    return found


def gateway_cpu_s(pid: int) -> float:
    """CPU seconds used so far by the gateway `pid` and its children, Triton's subtree excluded.
    Children that exited are no longer counted: the encode workers live as long as the gateway."""
    return sum(p.cpu_s for p in gateway_processes(pid))
