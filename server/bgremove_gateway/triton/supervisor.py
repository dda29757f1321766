"""Keeps the embedded Triton running: when it exits, report it down at once and start it again.

Restarts back off (1 s, 2 s, 4 s ... 30 s) while Triton keeps dying soon after starting, so a
crash loop (a broken model, memory exhaustion) does not spin; a Triton that ran for a while before
dying is restarted at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from bgremove_gateway.triton.embedded import EmbeddedTriton, TritonStartError

log = logging.getLogger("bgremove.supervisor")

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
# Running this long counts as healthy: the next crash restarts it without waiting.
STABLE_AFTER_S = 60.0


class TritonSupervisor:
    def __init__(
        self,
        triton: EmbeddedTriton,
        *,
        on_exit: Callable[[str], None],
        on_ready: Callable[[], Awaitable[None]],
    ) -> None:
        self.triton = triton
        self.on_exit = on_exit
        self.on_ready = on_ready
        self.restarts = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="triton-supervisor")

    async def stop(self) -> None:
        """Stops supervising (before the gateway stops Triton itself, so no restart races it)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        backoff = 0.0
        started = time.monotonic()
        while True:
            code = await self.triton.wait()
            ran_s = time.monotonic() - started
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            error = self.triton.last_error()
            reason = f"embedded Triton {how}" + (f": {error}" if error else "")
            log.error("%s after %.0f s; restarting it", reason, ran_s)
            self.on_exit(reason)
            backoff = 0.0 if ran_s >= STABLE_AFTER_S else max(FIRST_BACKOFF_S, backoff * 2)
            while True:
                backoff = min(backoff, MAX_BACKOFF_S)
                if backoff:
                    await asyncio.sleep(backoff)
                try:
                    await self.triton.start()
                    break
                except TritonStartError as exc:
                    backoff = max(FIRST_BACKOFF_S, backoff * 2)
                    first_line = str(exc).splitlines()[0]
                    log.error(
                        "restarting the embedded Triton failed (%s); next try in %g s", first_line, backoff
                    )
            started = time.monotonic()
            self.restarts += 1
            log.info("embedded Triton restarted (restart %d); models %s", self.restarts, self.triton.models)
            await self.on_ready()
