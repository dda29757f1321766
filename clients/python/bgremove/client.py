"""Sync and asyncio clients for bgremove.v1.BackgroundRemoval; streaming is hidden behind remove()."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from os import PathLike
from types import EllipsisType, TracebackType
from typing import Any

import grpc
from opentelemetry import trace

from bgremove.channel import (
    DEFAULT_TARGET,
    InsecureKeyWarning,
    call_metadata,
    channel_credentials,
    channel_options,
    plaintext_key_warning,
    warn_outside,
)
from bgremove.errors import BgRemoveError, Transport
from bgremove.options import RemoveOptions
from bgremove.result import RemovalResult, ResultAssembler
from bgremove.spans import CallTrace, client_span, get_tracer
from bgremove.upload import ImageSource, Upload, load_image
from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc

DEFAULT_CHUNK_SIZE = 256 * 1024
DEFAULT_TIMEOUT = 120.0

Timeout = float | None | EllipsisType


class _Base:
    """What both clients share: settings, request preparation and span attributes."""

    def __init__(
        self,
        target: str,
        *,
        root_certificates: bytes | None,
        certificate_chain: bytes | None,
        private_key: bytes | None,
        tls: bool,
        api_key: str | None,
        chunk_size: int,
        timeout: float | None,
        options: Sequence[tuple[str, Any]] | None,
        tracer_provider: trace.TracerProvider | None,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be at least 1 byte, got {chunk_size}")
        # None means plaintext; the subclass opens its own kind of channel with these.
        self._credentials = channel_credentials(
            tls=tls,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
        )
        self._channel_options = channel_options(options)
        # What a failed connection's message is explained against (BgRemoveError.hint).
        self._transport = Transport(
            tls=self._credentials is not None, client_certificate=certificate_chain is not None
        )
        # Once per client, when it is made: a warning per call would drown the caller's output.
        text = plaintext_key_warning(
            target,
            api_key=api_key,
            tls=self._credentials is not None,
            hint="pass tls=True (or root_certificates) to use TLS",
        )
        if text is not None:
            warn_outside(InsecureKeyWarning(text))
        self.target = target
        self._api_key = api_key
        self._chunk_size = chunk_size
        self._timeout = timeout
        self._tracer = get_tracer(tracer_provider)

    def _deadline(self, timeout: Timeout) -> float | None:
        return self._timeout if isinstance(timeout, EllipsisType) else timeout

    def _upload(
        self,
        data: bytes | bytearray | memoryview,
        options: RemoveOptions | None,
        content_type: str | None,
    ) -> Upload:
        if not len(data):
            # Said here: the server would name header.total_size, a field the caller never set.
            raise BgRemoveError(grpc.StatusCode.INVALID_ARGUMENT, "the image is empty (0 bytes)")
        return Upload(
            data, options or RemoveOptions(), content_type=content_type, chunk_size=self._chunk_size
        )

    @staticmethod
    def _request_attributes(upload: Upload) -> dict[str, str | int]:
        return {
            "bgremove.upload.size": upload.size,
            # Not the type declared only so that the server names data of an unknown kind.
            "bgremove.upload.content_type": upload.known_type,
            "bgremove.output.format": upload.options.format,
        }

    @staticmethod
    def _record_result(call: CallTrace, result: RemovalResult) -> None:
        call.span.set_attribute("bgremove.result.size", len(result.data))
        call.span.set_attribute("bgremove.result.content_type", result.content_type)


class Client(_Base):
    """Blocking client on a plain grpc channel; thread-safe, reuse one for many calls.

    TLS is used when tls=True or any certificate is given (mutual TLS with certificate_chain and
    private_key); api_key is sent as `authorization: Bearer <key>`. An api_key without TLS to a
    target other than this machine gives an InsecureKeyWarning when the client is made.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        tls: bool = False,
        api_key: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        timeout: float | None = DEFAULT_TIMEOUT,
        options: Sequence[tuple[str, Any]] | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        super().__init__(
            target,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            tls=tls,
            api_key=api_key,
            chunk_size=chunk_size,
            timeout=timeout,
            options=options,
            tracer_provider=tracer_provider,
        )
        creds, opts = self._credentials, self._channel_options
        self._channel = (
            grpc.insecure_channel(target, options=opts)
            if creds is None
            else grpc.secure_channel(target, creds, options=opts)
        )
        self._stub = bgremove_pb2_grpc.BackgroundRemovalStub(self._channel)  # type: ignore[no-untyped-call]

    def remove(
        self,
        image: ImageSource,
        options: RemoveOptions | None = None,
        *,
        content_type: str | None = None,
        timeout: Timeout = ...,
    ) -> RemovalResult:
        """Removes the background of image (bytes, or a path read into memory).

        content_type overrides the type sniffed from the magic bytes (data of no supported type is
        sent for the server to sniff, so its error says what the data is). Raises BgRemoveError with
        the server's status code, message and details; ValueError for options that cannot be valid.
        """
        upload = self._upload(load_image(image), options, content_type)
        with client_span(self._tracer, "StreamRemoveBackground", self._request_attributes(upload)) as call:
            try:
                responses = self._stub.StreamRemoveBackground(
                    upload.messages(),
                    timeout=self._deadline(timeout),
                    metadata=call_metadata(self._api_key, call.carrier),
                )
                assembler = ResultAssembler()
                try:
                    for message in responses:
                        assembler.add(message)
                except BgRemoveError:
                    responses.cancel()
                    raise
                result = assembler.result()
            except grpc.RpcError as error:
                raise BgRemoveError.from_rpc_error(error, self._transport) from error
            self._record_result(call, result)
            return result

    def service_info(self, *, timeout: Timeout = ...) -> pb.GetServiceInfoResponse:
        with client_span(self._tracer, "GetServiceInfo") as call:
            try:
                info: pb.GetServiceInfoResponse = self._stub.GetServiceInfo(
                    pb.GetServiceInfoRequest(),
                    timeout=self._deadline(timeout),
                    metadata=call_metadata(self._api_key, call.carrier),
                )
            except grpc.RpcError as error:
                raise BgRemoveError.from_rpc_error(error, self._transport) from error
            return info

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client on one grpc.aio channel. Create it inside the event loop that uses it (one
    per loop) and share it between tasks: concurrent remove() calls are multiplexed on the channel.

    Same settings as Client.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        tls: bool = False,
        api_key: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        timeout: float | None = DEFAULT_TIMEOUT,
        options: Sequence[tuple[str, Any]] | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        super().__init__(
            target,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            tls=tls,
            api_key=api_key,
            chunk_size=chunk_size,
            timeout=timeout,
            options=options,
            tracer_provider=tracer_provider,
        )
        creds, opts = self._credentials, self._channel_options
        self._channel = (
            grpc.aio.insecure_channel(target, options=opts)
            if creds is None
            else grpc.aio.secure_channel(target, creds, options=opts)
        )
        self._stub = bgremove_pb2_grpc.BackgroundRemovalStub(self._channel)  # type: ignore[no-untyped-call]

    async def remove(
        self,
        image: ImageSource,
        options: RemoveOptions | None = None,
        *,
        content_type: str | None = None,
        timeout: Timeout = ...,
    ) -> RemovalResult:
        """Removes the background of image; see Client.remove."""
        # Reading a file and hashing a large image release the GIL: keep them off the event loop.
        data = await asyncio.to_thread(load_image, image) if isinstance(image, str | PathLike) else image
        upload = self._upload(data, options, content_type)
        await asyncio.to_thread(upload.digest)
        with client_span(self._tracer, "StreamRemoveBackground", self._request_attributes(upload)) as call:
            try:
                responses = self._stub.StreamRemoveBackground(
                    upload.messages(),
                    timeout=self._deadline(timeout),
                    metadata=call_metadata(self._api_key, call.carrier),
                )
                assembler = ResultAssembler()
                try:
                    async for message in responses:
                        assembler.add(message)
                except BgRemoveError:
                    responses.cancel()
                    raise
                result = assembler.result()
            except grpc.RpcError as error:
                raise BgRemoveError.from_rpc_error(error, self._transport) from error
            self._record_result(call, result)
            return result

    async def service_info(self, *, timeout: Timeout = ...) -> pb.GetServiceInfoResponse:
        with client_span(self._tracer, "GetServiceInfo") as call:
            try:
                info: pb.GetServiceInfoResponse = await self._stub.GetServiceInfo(
                    pb.GetServiceInfoRequest(),
                    timeout=self._deadline(timeout),
                    metadata=call_metadata(self._api_key, call.carrier),
                )
            except grpc.RpcError as error:
                raise BgRemoveError.from_rpc_error(error, self._transport) from error
            return info

    def connectivity(self) -> grpc.ChannelConnectivity:
        """The channel's state now, without triggering a connection attempt."""
        state: grpc.ChannelConnectivity = self._channel.get_state(try_to_connect=False)
        return state

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def remove(
    image: ImageSource,
    options: RemoveOptions | None = None,
    *,
    target: str = DEFAULT_TARGET,
    api_key: str | None = None,
    content_type: str | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> RemovalResult:
    """One-shot convenience: opens a channel, removes the background, closes the channel.

    For many images create a Client (or AsyncClient) once and reuse it.
    """
    with Client(target, api_key=api_key, timeout=timeout) as client:
        return client.remove(image, options, content_type=content_type)
