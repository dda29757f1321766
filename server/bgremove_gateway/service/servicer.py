"""The bgremove.v1.BackgroundRemoval servicer: gRPC in, Pipeline, gRPC out. Nothing else."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from bgremove_gateway import __version__
from bgremove_gateway.access.log import Access as _Access
from bgremove_gateway.errors import NOT_READY_RETRY_AFTER_S, ServiceError, abort
from bgremove_gateway.pipeline.decode import SUPPORTED_CONTENT_TYPES
from bgremove_gateway.pipeline.encode import OUTPUT_FORMATS
from bgremove_gateway.pipeline.flow import Pipeline, Result
from bgremove_gateway.pipeline.upload import MAX_CROP_MARGIN
from bgremove_gateway.runtime import metrics
from bgremove_gateway.runtime.budget import MemoryBudget, Ticket
from bgremove_gateway.runtime.memory import IdleTrim
from bgremove_gateway.service.readout import read_out

log = logging.getLogger("bgremove.gateway")


@dataclass
class ServingState:
    """What the gateway knows about its backend; flipped by the server's startup and supervision."""

    ready: bool = False
    models: list[str] = field(default_factory=list)
    # Why it is not ready, for the UNAVAILABLE callers get meanwhile.
    reason: str = "the model is loading"


class BackgroundRemovalServicer(pb_grpc.BackgroundRemovalServicer):
    def __init__(
        self,
        pipeline: Pipeline,
        state: ServingState,
        admission: MemoryBudget | None = None,
        idle_trim: IdleTrim | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.state = state
        settings = pipeline.settings
        self.admission = admission or MemoryBudget(
            settings.memory_budget_bytes, settings.max_concurrent_streams
        )
        self.idle_trim = idle_trim or IdleTrim()

    def _release(self, ticket: Ticket, access: _Access) -> None:
        ticket.release()
        self.idle_trim.leave()
        access.done()
        a = self.admission
        log.debug("admission: streams=%d reserved_bytes=%d", a.streams, a.reserved_bytes)

    def _require_ready(self) -> None:
        if not self.state.ready:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                f"the service is not ready: {self.state.reason}",
                retry_after_s=NOT_READY_RETRY_AFTER_S,
            )

    async def StreamRemoveBackground(
        self, request_iterator: AsyncIterator[pb.UploadRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ResultChunk]:
        access = _Access("StreamRemoveBackground", context)
        ticket = self.admission.ticket()
        self.idle_trim.enter()
        try:
            result = await self._guarded(access, context, request_iterator, ticket)
            yield pb.ResultChunk(header=result.header)
            step = self.pipeline.settings.limits.result_chunk_bytes
            view = memoryview(result.data)
            for offset in range(0, len(view), step):
                piece = view[offset : offset + step]
                access.bytes_out += len(piece)
                yield pb.ResultChunk(chunk=piece.tobytes())
        except GeneratorExit:
            # Closed mid-result: the caller cancelled, disconnected or ran out of time.
            access.ended_by_caller()
            raise
        finally:
            self._release(ticket, access)

    async def RemoveBackground(
        self, request: pb.RemoveBackgroundRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveBackgroundResponse:
        access = _Access("RemoveBackground", context)
        ticket = self.admission.ticket()
        self.idle_trim.enter()
        try:
            result = await self._guarded(access, context, request, ticket)
            response = pb.RemoveBackgroundResponse(header=result.header, image=result.data)
            limit = self.pipeline.settings.limits.largest_answer_bytes
            if response.ByteSize() > limit:
                # gRPC would refuse to send it, with its own words and a stack trace in our log.
                err = ServiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the result ({result.header.content_type}) is {len(result.data)} bytes, over the "
                    f"{limit} bytes one RemoveBackground answer can carry: use StreamRemoveBackground, "
                    "which streams it in chunks, or ask for a smaller result (max_output_pixels, JPEG)",
                )
                access.code = err.code
                await abort(context, err)
            access.bytes_out = len(result.data)
            return response
        finally:
            self._release(ticket, access)

    async def _guarded(
        self,
        access: _Access,
        context: grpc.aio.ServicerContext,
        source: AsyncIterator[pb.UploadRequest] | pb.RemoveBackgroundRequest,
        ticket: Ticket,
    ) -> Result:
        """Runs the pipeline; every failure becomes a precise status, never a stack trace."""
        try:
            self._require_ready()
            ticket.enter()
            if isinstance(source, pb.RemoveBackgroundRequest):
                upload = self.pipeline.receive_unary(source, ticket)
            else:
                upload = await self.pipeline.receive(source, ticket)
            access.bytes_in = len(upload.data)
            options = upload.options  # validated: the labels are from a short, known list
            access.output_format = metrics.format_label(options.format)
            access.model = options.model or self.pipeline.settings.default_model
            try:
                return await self.pipeline.run(upload, timeout_s=context.time_remaining(), ticket=ticket)
            finally:
                upload.close()  # now, on success, failure or cancellation: not when collected
        except ServiceError as err:
            access.code = err.code
            # A client still sending must see this status, not INTERNAL (see readout.py); a stalled one
            # is not sending.
            if (
                not isinstance(source, pb.RemoveBackgroundRequest)
                and err.code != grpc.StatusCode.DEADLINE_EXCEEDED
            ):
                await read_out(source)
            await abort(context, err)
        except asyncio.CancelledError:
            # The caller cancelled or its deadline passed; gRPC already told it so.
            access.ended_by_caller()
            raise
        except Exception:
            access.code = grpc.StatusCode.INTERNAL
            log.exception("unexpected failure in %s", access.method)
            await abort(context, ServiceError(grpc.StatusCode.INTERNAL, "internal error"))

    async def GetServiceInfo(
        self, request: pb.GetServiceInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServiceInfoResponse:
        access = _Access("GetServiceInfo", context)
        settings = self.pipeline.settings
        lim = settings.limits
        ready = set(self.state.models) if self.state.ready else set()
        served = sorted(set(self.pipeline.models) | ready)
        info = pb.GetServiceInfoResponse(
            models=[
                pb.ModelInfo(name=m, input_size=self.pipeline.input_size(m), ready=m in ready) for m in served
            ],
            default_model=settings.default_model,
            limits=pb.Limits(
                max_upload_bytes=lim.max_upload_bytes,
                max_chunk_bytes=lim.max_chunk_bytes,
                max_pixels=lim.max_pixels,
                max_unary_bytes=lim.max_unary_bytes,
                idle_timeout_ms=int(lim.idle_timeout_s * 1000),
                upload_timeout_ms=int(lim.upload_timeout_s * 1000),
                max_jpeg_scans=lim.max_jpeg_scans,
                max_jpeg_scan_pixels=lim.max_jpeg_scan_pixels,
                max_image_segments=lim.max_image_segments,
                max_metadata_bytes=lim.max_metadata_bytes,
                result_chunk_bytes=lim.result_chunk_bytes,
                max_output_side=lim.max_output_side,
                max_crop_margin=MAX_CROP_MARGIN,
                max_bg_image_bytes=lim.max_bg_image_bytes,
            ),
            output_formats=tuple(OUTPUT_FORMATS.values()),
            input_content_types=SUPPORTED_CONTENT_TYPES,
            version=__version__,
        )
        access.bytes_out = info.ByteSize()
        access.done()
        return info
