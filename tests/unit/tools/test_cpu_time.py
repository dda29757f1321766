"""The gateway's CPU time from /proc: its process and children, never the embedded Triton's subtree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from bgremove_gateway.tools.cpu_time import gateway_cpu_s, gateway_processes, read_stat

# Burns argv[1] CPU seconds, says so, then idles until killed.
BURN = (
    "import sys, time\n"
    "end = time.process_time() + float(sys.argv[1])\n"
    "while time.process_time() < end: pass\n"
    "print('done', flush=True)\n"
    "time.sleep(120)\n"
)
# Names itself tritonserver (PR_SET_NAME), starts a burning child (a Python-backend stub), burns too.
TRITON = (
    "import ctypes, subprocess, sys\n"
    "ctypes.CDLL(None).prctl(15, b'tritonserver', 0, 0, 0)\n"
    "burn = sys.argv[1]\n"
    "subprocess.Popen([sys.executable, '-c', burn, '0.6'], stdout=sys.stdout)\n"
    "sys.argv[1:] = ['0.6']\n"
    "exec(burn)\n"
)
# The "gateway": an encode-worker-like child that burns 0.3 s, and a Triton that burns 1.2 s.
GATEWAY = (
    "import subprocess, sys\n"
    "burn, triton = sys.argv[1], sys.argv[2]\n"
    "subprocess.Popen([sys.executable, '-c', burn, '0.3'], stdout=sys.stdout)\n"
    "subprocess.Popen([sys.executable, '-c', triton, burn], stdout=sys.stdout)\n"
    "import time; time.sleep(120)\n"
)


@pytest.fixture
def gateway() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", GATEWAY, BURN, TRITON],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for _ in range(3):  # the worker, Triton and its stub have each burnt their share
            assert proc.stdout.readline().strip() == "done"
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_counts_the_gateway_and_its_workers_but_not_tritons_subtree(gateway: subprocess.Popen[str]) -> None:
    found = {p.pid: p.command for p in gateway_processes(gateway.pid)}
    assert gateway.pid in found and len(found) == 2  # the gateway and its worker
    assert "tritonserver" not in found.values()
    # The worker's 0.3 s and two interpreters' start-up, without Triton's 1.2 s.
    assert 0.3 <= gateway_cpu_s(gateway.pid) < 0.9


def test_a_process_that_is_gone_reads_as_none() -> None:
    stat = read_stat(os.getpid())
    assert stat is not None and stat.pid == os.getpid() and stat.cpu_s > 0
    assert read_stat(2**22 + 1) is None  # above the kernel's pid_max
    with pytest.raises(ProcessLookupError):
        gateway_processes(2**22 + 1)
