"""Who may call: API keys (or client certificates), then per-key admission, as a grpc.aio interceptor.

Health and reflection stay open so probes and grpcurl work without a key; every method of
bgremove.v1 goes through here. A refusal is a status with a message that says what to send, and
one access-log line; the key itself is never logged, only its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc

from bgremove_gateway.access.keys import KeyFileError, KeyLimits, KeyRecord, PresentedKey, read_keys
from bgremove_gateway.access.limits import (
    Allowance,
    GuessLimiter,
    KeyAdmission,
    PerKeyLimiter,
    SlowPath,
    peer_host,
)
from bgremove_gateway.access.log import Access, caller, short_method
from bgremove_gateway.errors import (
    MAX_REFUSAL_PAUSE_S,
    MIN_RETRY_AFTER_S,
    REFUSAL_PAUSE_S,
    ServiceError,
    abort,
)
from bgremove_gateway.runtime import metrics
from bgremove_gateway.service.calls import closed_with_call, closing, serializers
from bgremove_gateway.service.readout import read_out

log = logging.getLogger("bgremove.auth")

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
RELOAD_INTERVAL_S = 5.0


def unauthenticated(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, message)


class KeyStore:
    """The keys file in memory, by key id; reloaded when the file changes (a Secret update or
    `bgremove keys revoke`), so revoking takes effect without a restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: dict[str, KeyRecord] = {}
        self._stamp: tuple[int, int, int] | None = None
        # A key verified once with scrypt is then recognised by an HMAC under a per-process
        # secret: one scrypt per key per process instead of one per call, and what stays in
        # memory is neither the key nor anything that verifies it outside this process.
        self._pepper = os.urandom(32)
        self._verified: dict[str, bytes] = {}
        # Any other secret costs a scrypt, so guessing is limited before it (failures per address
        # and per id), and the scrypt checks run one at a time, off the event loop, behind a short
        # queue: guessing uses at most one core, never stalls the calls in flight, and a right key
        # not yet seen waits behind a few checks at most instead of every guess.
        self.guesses = GuessLimiter(min_retry_s=REFUSAL_PAUSE_S)
        self.slow = SlowPath(min_retry_s=REFUSAL_PAUSE_S)
        self.load()

    def __len__(self) -> int:
        return len(self._records)

    @property
    def ids(self) -> set[str]:
        return set(self._records)

    def _stat(self) -> tuple[int, int, int]:
        st = self.path.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size

    def load(self) -> None:
        """Reads the file; KeyFileError when it is missing or malformed."""
        try:
            stamp = self._stat()
        except OSError as exc:
            raise KeyFileError(
                f"keys file {self.path} cannot be read ({exc.strerror or exc}); "
                f"create it with `bgremove keys add NAME --file {self.path}`"
            ) from None
        records = {r.id: r for r in read_keys(self.path)}
        for key_id in list(self._verified):
            old, new = self._records.get(key_id), records.get(key_id)
            if new is None or old is None or new.hash != old.hash:
                del self._verified[key_id]
        self._records, self._stamp = records, stamp

    def reload_if_changed(self) -> bool:
        try:
            changed = self._stat() != self._stamp
            if changed:
                self.load()
        except (OSError, KeyFileError) as exc:
            # Keep serving with the keys last read rather than locking everyone out.
            log.error("keys file not reloaded, keeping the previous keys: %s", exc)
            return False
        if changed:
            live = sum(1 for r in self._records.values() if not r.revoked)
            log.info("keys file reloaded: %d active keys", live)
        return changed

    async def verify(self, presented: PresentedKey, peer: str = "-") -> KeyRecord:
        """The key's record, or ServiceError: UNAUTHENTICATED for a wrong key, RESOURCE_EXHAUSTED
        when `peer` (grpc's context.peer()) or the key id has failed too often lately."""
        record = self._records.get(presented.id)
        if record is None:  # costs nothing, so it is not limited
            raise unauthenticated("invalid API key")
        tag = hmac.new(self._pepper, presented.secret.encode(), hashlib.sha256).digest()
        known = self._verified.get(presented.id)
        if known is None or not hmac.compare_digest(known, tag):
            attempt = self.guesses.admit(presented.id, peer_host(peer))
            try:
                secret = presented.secret
                matched = await self.slow.run(lambda: record.hash.matches(secret), urgent=attempt.urgent)
            except ServiceError:
                attempt.refund()  # the queue was full: nothing was checked
                raise
            if not matched:
                attempt.failed()
                raise unauthenticated("invalid API key")
            attempt.refund()
            if self._records.get(presented.id) is not record:  # reloaded meanwhile
                return await self.verify(presented, peer)
            self._verified[presented.id] = tag
        if record.revoked:
            raise unauthenticated(f"API key {record.id} was revoked at {record.revoked}")
        return record


def presented_key(metadata: Any) -> str | None:
    """The key from `authorization: Bearer <key>` or `x-api-key: <key>`; None when neither is sent."""
    bearer = api_key = None
    for key, value in metadata or ():
        if not isinstance(value, str):
            continue
        if key == "authorization":
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise unauthenticated("authorization metadata must be `Bearer <API key>`")
            bearer = token.strip()
        elif key == "x-api-key":
            api_key = value.strip()
    if bearer is not None and api_key is not None and bearer != api_key:
        raise unauthenticated("authorization and x-api-key carry different keys: send one")
    return bearer if bearer is not None else api_key


@dataclass(frozen=True)
class Policy:
    """What the listener demands, decided at startup (see tls.py)."""

    keys: KeyStore | None  # keys configured: every call needs one
    client_certs: bool  # mutual TLS: the handshake already checked the caller's certificate
    require_auth: bool  # non-loopback without --insecure: no key and no certificate, no call


def _certificate_name(context: grpc.aio.ServicerContext) -> str | None:
    names = context.auth_context().get("x509_common_name") or []
    return f"cn={names[0].decode(errors='replace')}" if names else None


@dataclass(frozen=True)
class Admitted:
    """Who a call was admitted as, and what its key's rate has left (None: no per-key limits)."""

    key_id: str
    allowance: Allowance | None


class Refused(Exception):
    """A call refused by the access control: the error to answer with, the key id to log, and the
    key's limits once it was verified (for HTTP's X-RateLimit-* headers)."""

    def __init__(self, error: ServiceError, key_id: str, limits: KeyLimits | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.key_id = key_id
        self.limits = limits


class AccessControl(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, policy: Policy, admission: KeyAdmission | None = None) -> None:
        self.policy = policy
        self.admission = admission or PerKeyLimiter()

    async def identify(
        self, key_text: str | None, peer: str, cert_name: str | None
    ) -> tuple[str, KeyLimits | None]:
        """The caller's id for logs and the limits to admit it under (None: no per-key limits), from
        the key it presented, its peer (grpc's "ipv4:host:port" form) and its client certificate's
        name; the same for every transport."""
        p = self.policy
        if p.keys is not None:
            if key_text is None:
                raise unauthenticated(
                    "this service requires an API key: "
                    "send `authorization: Bearer <key>` or `x-api-key: <key>`"
                )
            parsed = PresentedKey.parse(key_text)
            if parsed is None:
                raise unauthenticated(
                    "malformed API key: expected bgr_<id>_<secret> as `bgremove keys add` prints it"
                )
            record = await p.keys.verify(parsed, peer)
            return record.id, record.limits
        if p.client_certs:
            return cert_name or "cn=?", None
        if p.require_auth:
            raise unauthenticated(
                "this listener is not on loopback and requires authentication, but the gateway has "
                "no API keys configured (--api-keys-file) and no client CA (--tls-client-ca)"
            )
        return "-", None

    async def admit(
        self,
        stack: contextlib.AsyncExitStack,
        read_key: Callable[[], str | None],
        peer: str,
        cert_name: str | None,
    ) -> Admitted:
        """Identifies the caller and takes a slot of its key's limits, held until `stack` closes.
        `read_key` reads the presented key from the transport's headers (it may refuse them), and is
        called only when keys are configured. Refused, counted in the metrics, for any refusal."""
        key_id: str | None = None
        limits: KeyLimits | None = None
        try:
            key_text = read_key() if self.policy.keys is not None else None
            key_id, limits = await self.identify(key_text, peer, cert_name)
            allowance = None
            if limits is not None:
                allowance = await stack.enter_async_context(self.admission.admit(key_id, limits))
        except ServiceError as err:
            metrics.key_refused(key_id or metrics.NO_LABEL, self._refusal_reason(err, key_id, limits))
            raise Refused(err, key_id or "-", limits) from None
        return Admitted(key_id, allowance)

    @contextlib.asynccontextmanager
    async def _guard(
        self, method: str, context: grpc.aio.ServicerContext, requests: AsyncIterator[Any] | None
    ) -> AsyncIterator[None]:
        started = time.perf_counter()
        async with contextlib.AsyncExitStack() as stack:
            try:
                admitted = await self.admit(
                    stack,
                    lambda: presented_key(context.invocation_metadata()),
                    context.peer(),
                    _certificate_name(context) if self.policy.client_certs else None,
                )
            except Refused as refused:
                await self._refuse(method, context, requests, refused.error, started, refused.key_id)
            caller.set(admitted.key_id)  # each call runs in its own task and context: this never leaks
            yield

    def _refusal_reason(self, err: ServiceError, key_id: str | None, limits: KeyLimits | None) -> str:
        """The metric's reason; key_id is set only once a key from the keys file was verified."""
        if key_id is None or limits is None:
            return "unauthenticated" if err.code == grpc.StatusCode.UNAUTHENTICATED else "key_checks"
        # admit() refused: at the cap of calls in flight, or else out of tokens (nothing changed since).
        at_cap = bool(limits.max_streams) and self.admission.in_flight(key_id) >= limits.max_streams
        return "key_streams" if at_cap else "key_rate"

    async def _refuse(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        requests: AsyncIterator[Any] | None,
        err: ServiceError,
        started: float,
        key_id: str,
    ) -> NoReturn:
        """Answers a refused call after a pause: a client that ignores RetryInfo and calls again
        at once can then send only as many calls as it holds open per pause, instead of
        thousands a second that would keep the event loop from everyone else's calls. The pause
        costs the server one sleeping coroutine; the RetryInfo sent is what remains to wait."""
        if requests is not None:
            await read_out(requests, max_s=refusal_pause(err))
        err = await paced(err, started)
        # The servicer never sees this call, so its one access line is written here.
        Access(short_method(method), context, started, code=err.code, key=key_id).done()
        await abort(context, err)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        return _wrap(handler, lambda context, requests: self._guard(method, context, requests))


def refusal_pause(err: ServiceError) -> float:
    """How long a refusal waits before it is answered (see AccessControl._refuse)."""
    return min(err.retry_after_s, MAX_REFUSAL_PAUSE_S) if err.retry_after_s else REFUSAL_PAUSE_S


async def paced(err: ServiceError, started: float) -> ServiceError:
    """Sleeps out the refusal's pause counted from `started` (perf_counter); `err` with the wait it
    asks for shortened by the pause."""
    pause = refusal_pause(err)
    await asyncio.sleep(max(0.0, started + pause - time.perf_counter()))
    if err.retry_after_s:
        err = dataclasses.replace(err, retry_after_s=max(MIN_RETRY_AFTER_S, err.retry_after_s - pause))
    return err


# The guard gets the request iterator of client-streaming calls, to drain it before a refusal.
Guard = Callable[
    [grpc.aio.ServicerContext, AsyncIterator[Any] | None], contextlib.AbstractAsyncContextManager[None]
]


def _wrap(handler: grpc.RpcMethodHandler, guard: Guard) -> grpc.RpcMethodHandler:
    """The same handler with `guard` around each call, for all four RPC shapes."""
    kw = serializers(handler)
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        async def uu(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with guard(context, None):
                return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(uu, **kw)
    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        async def su(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async with guard(context, requests):
                return await stream_unary(requests, context)

        return grpc.stream_unary_rpc_method_handler(su, **kw)
    streaming = handler.unary_stream or handler.stream_stream
    client_streaming = handler.stream_stream is not None

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncGenerator[Any, None]:
        async with (
            guard(context, request if client_streaming else None),
            closing(streaming(request, context)) as responses,
        ):
            async for response in responses:
                yield response

    def streamed(request: Any, context: grpc.aio.ServicerContext) -> AsyncGenerator[Any, None]:
        # The tracing interceptor outside abandons this stream when the call ends: the call closes it.
        return closed_with_call(guarded(request, context))

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streamed, **kw)
    return grpc.stream_stream_rpc_method_handler(streamed, **kw)
