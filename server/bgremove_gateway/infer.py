"""The infer step: one uint8 model input in, one uint8 mask out, through Triton over gRPC.

Each request is its own infer call; Triton's dynamic batcher merges concurrent calls, so the
gateway never batches by itself (that would make one caller wait on another's upload).
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from opentelemetry import propagate, trace
from tritonclient.utils import InferenceServerException

from bgremove_gateway.errors import ServiceError

log = logging.getLogger("bgremove.infer")

INPUT_NAME = "image"
OUTPUT_NAME = "mask"

# tritonclient replaces ALL its channel defaults when channel_args is given (falling back to gRPC's
# 4 MB receive limit), so the full set is spelled out here.
_CHANNEL_ARGS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Fail fast while Triton is down instead of queueing calls until their deadline.
    ("grpc.enable_retries", 0),
]

_STATUS_BY_NAME = {f"StatusCode.{code.name}": code for code in grpc.StatusCode}


def _to_service_error(exc: InferenceServerException, url: str) -> ServiceError:
    code = _STATUS_BY_NAME.get(str(exc.status()), grpc.StatusCode.UNAVAILABLE)
    reason = exc.message() or str(exc)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServiceError(code, "inference did not finish before the deadline")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL):
        # Triton found fault with what the gateway sent: a gateway bug or a model misconfiguration,
        # never the caller's input (that was validated before). Say so without Triton's internals.
        log.error("Triton at %s rejected an infer call: %s", url, reason)
        return ServiceError(grpc.StatusCode.INTERNAL, "the inference backend failed to run the model")
    return ServiceError(grpc.StatusCode.UNAVAILABLE, f"inference backend unavailable: {reason}")


class TritonInference:
    """An async Triton client for one endpoint. Create one per event loop and reuse it."""

    def __init__(self, url: str, *, timeout_s: float = 60.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._client = grpcclient_aio.InferenceServerClient(url, channel_args=_CHANNEL_ARGS)

    async def infer(
        self, model: str, image: npt.NDArray[np.uint8], *, timeout_s: float | None = None
    ) -> npt.NDArray[np.uint8]:
        """Run `model` on one HxWx3 uint8 image; returns its HxW uint8 mask."""
        batch = image[np.newaxis]
        inp = grpcclient.InferInput(INPUT_NAME, list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch)
        # Triton joins the caller's trace from the W3C traceparent header on the infer call.
        headers: dict[str, str] = {}
        propagate.inject(headers)
        budget = self.timeout_s if timeout_s is None else min(self.timeout_s, timeout_s)
        span = trace.get_current_span()
        span.set_attribute("triton.model", model)
        try:
            result = await self._client.infer(
                model,
                [inp],
                outputs=[grpcclient.InferRequestedOutput(OUTPUT_NAME)],
                headers=headers,
                client_timeout=max(budget, 0.001),
            )
        except InferenceServerException as exc:
            raise _to_service_error(exc, self.url) from None
        mask = result.as_numpy(OUTPUT_NAME)
        if mask is None or mask.shape[0] != 1:
            raise ServiceError(grpc.StatusCode.INTERNAL, "the inference backend returned no mask")
        out: npt.NDArray[np.uint8] = mask[0]
        return out

    async def ready_models(self) -> list[str]:
        """Models Triton has loaded and reports READY; empty when Triton cannot be reached."""
        try:
            index = await self._client.get_model_repository_index(as_json=True)
        except InferenceServerException:
            return []
        return sorted(m["name"] for m in index.get("models", []) if m.get("state") == "READY")

    async def is_ready(self, model: str) -> bool:
        try:
            return bool(await self._client.is_model_ready(model))
        except InferenceServerException:
            return False

    async def inference_statistics(self, model: str) -> dict[str, Any]:
        stats: dict[str, Any] = await self._client.get_inference_statistics(model, as_json=True)
        return stats

    async def close(self) -> None:
        await self._client.close()
