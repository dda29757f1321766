"""Refusing a client-streaming call so that an asyncio client sees the refusal, not INTERNAL.

When a server ends a call while the client is still writing, grpcio's asyncio client replaces the
server's status with `INTERNAL: Internal error from Core` whenever its next write fails after the
status arrived (grpc/grpc#36066, open in grpcio 1.81): a RESOURCE_EXHAUSTED with RetryInfo, or an
INVALID_ARGUMENT naming the problem, would reach the caller as a meaningless INTERNAL. Reading what
the client is still sending until it half-closes, within a small budget, lets every write finish
first. The budget keeps a refusal cheap: a client still sending past it gets the status anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

READ_OUT_BYTES = 4 * 1024 * 1024
READ_OUT_SECONDS = 2.0


async def read_out(
    requests: AsyncIterator[Any], max_bytes: int = READ_OUT_BYTES, max_s: float = READ_OUT_SECONDS
) -> int:
    """Reads and drops messages until the client half-closes or the budget is spent; returns the
    bytes dropped. Never raises: a broken stream has nothing left to protect."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_s
    dropped = 0
    with contextlib.suppress(Exception, asyncio.TimeoutError):
        messages = aiter(requests)
        while dropped < max_bytes and (left := deadline - loop.time()) > 0:
            message = await asyncio.wait_for(anext(messages), left)
            dropped += message.ByteSize()
    return dropped
