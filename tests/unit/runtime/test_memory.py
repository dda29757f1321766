"""IdleTrim: freed memory goes back to the OS only once the gateway is idle, never mid-burst."""

from __future__ import annotations

import asyncio
import threading

from bgremove_gateway.runtime.memory import IdleTrim, configure_allocator


class Recorder:
    def __init__(self) -> None:
        self.calls = 0
        self.done = threading.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.done.set()


async def test_trims_once_after_the_last_call_ends() -> None:
    trim = Recorder()
    idle = IdleTrim(delay_s=0.05, trim=trim)
    idle.enter()
    idle.enter()
    idle.leave()
    await asyncio.sleep(0.15)
    assert trim.calls == 0, "one call is still in flight"
    idle.leave()
    assert await asyncio.to_thread(trim.done.wait, 5)
    await asyncio.sleep(0.15)
    assert trim.calls == 1


async def test_a_call_starting_within_the_delay_postpones_the_trim() -> None:
    trim = Recorder()
    idle = IdleTrim(delay_s=0.2, trim=trim)
    for _ in range(5):  # back-to-back calls, as from a client at concurrency 1
        idle.enter()
        await asyncio.sleep(0.05)
        idle.leave()
        await asyncio.sleep(0.01)
    assert trim.calls == 0
    assert await asyncio.to_thread(trim.done.wait, 5)
    assert trim.calls == 1 and idle.trims == 1


def test_allocator_is_configured_on_glibc() -> None:
    assert configure_allocator()
