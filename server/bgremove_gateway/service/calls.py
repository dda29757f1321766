"""A call's lifecycle: every response stream is closed inside its own call, never by the collector.

grpc.aio drives an async-generator handler with `async for` and abandons it when the call ends
mid-stream (cancel, deadline, disconnect): the generator is then closed later by the garbage
collector, in another task and Context, after the call's memory is freed. Code in its `finally`
that touches the call crashes the process (a segfault in cygrpc), and OpenTelemetry's interceptor
fails to detach its context there. This interceptor, outermost, turns every response-streaming
handler into a coroutine that writes with `context.write()`, and closes each generator opened for
the call, innermost first, in the call's own task before it returns.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger("bgremove.gateway")

T = TypeVar("T")

# The generators opened for the call being handled in this task; None outside a streaming call.
_opened: contextvars.ContextVar[list[AsyncGenerator[Any, None]] | None] = contextvars.ContextVar(
    "bgremove_opened_streams", default=None
)


def closed_with_call(stream: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    """Registers a response generator that an outer layer may abandon, so the call closes it."""
    opened = _opened.get()
    if opened is not None:
        opened.append(stream)
    return stream


async def _close_all(opened: list[AsyncGenerator[Any, None]]) -> None:
    for stream in reversed(opened):
        try:
            await stream.aclose()
        except Exception:  # a finally block that fails must not keep the others from closing
            log.exception("closing a response stream failed")


def _written(
    behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> None:
        opened: list[AsyncGenerator[Any, None]] = []
        token = _opened.set(opened)
        try:
            responses = behavior(request, context)
            if isinstance(responses, AsyncGenerator):
                opened.insert(0, responses)
            async for response in responses:
                await context.write(response)
        finally:
            await _close_all(opened)
            _opened.reset(token)

    return handler


def serializers(handler: grpc.RpcMethodHandler) -> dict[str, Any]:
    """`handler`'s message (de)serializers, for a handler that wraps it."""
    return {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }


class CallLifecycle(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Outermost interceptor: response streams are written, not yielded, and closed in the call."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        kw = serializers(handler)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_written(handler.unary_stream), **kw)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(_written(handler.stream_stream), **kw)
        return handler


@contextlib.asynccontextmanager
async def closing(stream: AsyncGenerator[T, None]) -> AsyncIterator[AsyncGenerator[T, None]]:
    """`contextlib.aclosing` that also registers the stream with the call (Python 3.10 has aclosing,
    but an outer layer that abandons us must still find the inner stream)."""
    closed_with_call(stream)
    try:
        yield stream
    finally:
        await stream.aclose()
