"""The infer step: one uint8 model input in, one uint8 mask out, through Triton over gRPC.

Each request is its own infer call; Triton's dynamic batcher merges concurrent calls, so the
gateway never batches by itself (that would make one caller wait on another's upload).

The gateway calls only Triton's health, metadata, statistics and inference APIs. Where Triton
restricts some of them (`--grpc-restricted-protocol`), the gateway is given the key and sends it on
every call.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from opentelemetry import propagate, trace
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from bgremove_gateway.errors import OVERLOAD_RETRY_AFTER_S, ServiceError
from bgremove_gateway.pipeline.contract import INPUT_CHANNELS, INPUT_DTYPE, INPUT_NAME, OUTPUT_NAME

log = logging.getLogger("bgremove.infer")

# The header Triton's restricted APIs check: gRPC metadata "triton-grpc-protocol-<this>" (Triton
# adds the prefix), HTTP header "<this>".
ADMIN_HEADER = "bgremove-admin-key"


def grpc_admin_headers(key: str | None) -> dict[str, str]:
    """gRPC metadata that opens Triton's APIs restricted with `key`; empty without one."""
    return {f"triton-grpc-protocol-{ADMIN_HEADER}": key} if key else {}


def http_admin_headers(key: str | None) -> dict[str, str]:
    """The HTTP header that opens Triton's APIs restricted with `key`; empty without one."""
    return {ADMIN_HEADER: key} if key else {}


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
    # gRPC's reconnect backoff grows to 120 s by default: a replica back after a long outage would
    # stay unreachable that long. Capped here so it is found again within ~2 s of coming back.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]

_STATUS_BY_NAME = {f"StatusCode.{code.name}": code for code in grpc.StatusCode}


def short_reason(message: str) -> str:
    """gRPC's connection errors end with the part that matters: "failed to connect to all
    addresses; last error: UNKNOWN: ipv4:10.0.0.5:8001: Failed to connect to remote host:
    Connection refused" -> "cannot connect: Connection refused"."""
    if message.startswith("failed to connect to all addresses"):
        return "cannot connect: " + message.rsplit(": ", 1)[-1]
    return message


class Failure(enum.Enum):
    """What a failed infer call says about the replica, which decides what the pool does next."""

    REPLICA = "replica"  # the replica is gone, exiting or lost the model: eject it, try another
    OVERLOADED = "overloaded"  # its queue is full: tell the caller to come back, do not pile on
    DEADLINE = "deadline"  # the request ran out of time (in our deadline or Triton's queue timeout)
    REJECTED = "rejected"  # Triton refused what we sent: a gateway bug or model misconfiguration


@dataclass
class InferError(ServiceError):
    """A ServiceError for the caller that also tells the pool how the replica failed."""

    failure: Failure = Failure.REPLICA


def _to_infer_error(exc: InferenceServerException, url: str) -> InferError:
    code = _STATUS_BY_NAME.get(str(exc.status()), grpc.StatusCode.UNAVAILABLE)
    reason = exc.message() or str(exc)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED or "Request timeout expired" in reason:
        # The second is Triton's queue timeout (UNAVAILABLE): the deadline it was given passed.
        return InferError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "inference did not finish before the deadline",
            failure=Failure.DEADLINE,
        )
    if "Exceeds maximum queue size" in reason:
        return InferError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the inference backend is at capacity (its queue is full); "
            f"retry in {OVERLOAD_RETRY_AFTER_S:g} s",
            retry_after_s=OVERLOAD_RETRY_AFTER_S,
            failure=Failure.OVERLOADED,
        )
    if code == grpc.StatusCode.NOT_FOUND and "unknown model" in reason:
        # A Triton that is shutting down unloads its models first and answers this while it
        # finishes in-flight work: the model is gone from this replica, not from the service.
        return InferError(
            grpc.StatusCode.UNAVAILABLE, f"inference backend unavailable: {reason}", failure=Failure.REPLICA
        )
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        # Triton found fault with what the gateway sent: a gateway bug or a model misconfiguration,
        # never the caller's input (that was validated before). Say so without Triton's internals.
        log.error("Triton at %s rejected an infer call: %s", url, reason)
        return InferError(
            grpc.StatusCode.INTERNAL,
            "the inference backend failed to run the model",
            failure=Failure.REJECTED,
        )
    if code == grpc.StatusCode.INTERNAL:
        # Triton failed on its side (e.g. a Python backend stub that died): another replica may not.
        log.error("Triton at %s failed an infer call: %s", url, reason)
        return InferError(
            grpc.StatusCode.INTERNAL, "the inference backend failed to run the model", failure=Failure.REPLICA
        )
    # UNAVAILABLE (refused, reset, "Socket closed", "Server exiting") and UNKNOWN ("Stream removed").
    return InferError(
        grpc.StatusCode.UNAVAILABLE,
        f"inference backend unavailable: {short_reason(reason)}",
        failure=Failure.REPLICA,
    )


def _input_side(metadata: Mapping[str, Any]) -> int | None:
    """S from model metadata whose `image` input is [-1, S, S, 3] (the JSON form gives int64 dims as
    strings); None for anything else."""
    for entry in metadata.get("inputs", []):
        if entry.get("name") != INPUT_NAME:
            continue
        try:
            dims = [int(d) for d in entry.get("shape", [])]
        except (TypeError, ValueError):
            return None
        # With max_batch_size > 0 Triton reports the batch as -1; without batching it is absent.
        side = dims[-3:]
        if len(side) == 3 and side[0] == side[1] > 0 and side[2] == INPUT_CHANNELS:
            return side[0]
        return None
    return None


class TritonInference:
    """An async Triton client for one endpoint. Create one per event loop and reuse it.

    `admin_key`: the key of Triton's restricted APIs, sent on every call (None: none sent)."""

    def __init__(self, url: str, *, timeout_s: float = 60.0, admin_key: str | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._headers = grpc_admin_headers(admin_key)
        self._client = grpcclient_aio.InferenceServerClient(url, channel_args=_CHANNEL_ARGS)

    async def infer(
        self, model: str, image: npt.NDArray[np.uint8], *, timeout_s: float | None = None
    ) -> npt.NDArray[np.uint8]:
        """Run `model` on one HxWx3 uint8 image; returns its HxW uint8 mask."""
        batch = image[np.newaxis]
        inp = grpcclient.InferInput(INPUT_NAME, list(batch.shape), np_to_triton_dtype(INPUT_DTYPE))
        inp.set_data_from_numpy(batch)
        # Triton joins the caller's trace from the W3C traceparent header on the infer call.
        headers = dict(self._headers)
        propagate.inject(headers)
        budget = self.timeout_s if timeout_s is None else min(self.timeout_s, timeout_s)
        span = trace.get_current_span()
        span.set_attribute("triton.model", model)
        budget = max(budget, 0.001)
        try:
            result = await self._client.infer(
                model,
                [inp],
                outputs=[grpcclient.InferRequestedOutput(OUTPUT_NAME)],
                headers=headers,
                client_timeout=budget,
                # Triton's queue timeout for this request (the configs allow the override), so
                # work whose caller has given up leaves its queue instead of running.
                timeout=int(budget * 1_000_000),
            )
        except InferenceServerException as exc:
            raise _to_infer_error(exc, self.url) from None
        mask = result.as_numpy(OUTPUT_NAME)
        if mask is None or mask.shape[0] != 1:
            raise ServiceError(grpc.StatusCode.INTERNAL, "the inference backend returned no mask")
        out: npt.NDArray[np.uint8] = mask[0]
        return out

    async def probe(self, *, timeout_s: float | None = None) -> tuple[list[str], str]:
        """(models READY, "") or ([], why not). A server that is not ready (a shutting-down
        Triton still lists the models it is about to unload) counts as having none.

        The models come from the statistics API (which lists the loaded ones) and each one's
        readiness, not from the repository index: that is a model-control API, which a locked-down
        Triton restricts, and the gateway must work without its key."""
        h, t = self._headers, timeout_s
        try:
            if not await self._client.is_server_ready(headers=h, client_timeout=t):
                return [], "server not ready"
            # The message, not as_json: the JSON form added 0.5 ms of CPU to every probe, once a
            # second per worker (docs/decisions/0012-gateway-cpu.md).
            stats = await self._client.get_inference_statistics(headers=h, client_timeout=t)
            loaded = sorted({m.name for m in stats.model_stats})
            # A model whose readiness cannot be had this time counts as not ready.
            ready = await asyncio.gather(
                *(self._client.is_model_ready(m, headers=h, client_timeout=t) for m in loaded),
                return_exceptions=True,
            )
        except InferenceServerException as exc:
            return [], short_reason(exc.message() or str(exc))
        return [m for m, ok in zip(loaded, ready, strict=True) if ok is True], ""

    async def input_sizes(
        self, models: Sequence[str], *, timeout_s: float | None = None
    ) -> tuple[dict[str, int], dict[str, str]]:
        """Each model's square input side from its metadata (`image`: [-1, S, S, 3]), as
        ({model: S}, {model: why not}) for those whose metadata cannot be had or read."""
        found = await asyncio.gather(
            *(
                self._client.get_model_metadata(
                    m, as_json=True, headers=self._headers, client_timeout=timeout_s
                )
                for m in models
            ),
            return_exceptions=True,
        )
        sizes: dict[str, int] = {}
        problems: dict[str, str] = {}
        for model, meta in zip(models, found, strict=True):
            if isinstance(meta, InferenceServerException):
                problems[model] = short_reason(meta.message() or str(meta))
            elif isinstance(meta, Exception):
                problems[model] = str(meta) or type(meta).__name__  # never fatal to the probe loop
            elif isinstance(meta, BaseException):
                raise meta
            elif (size := _input_side(meta)) is None:
                problems[model] = (
                    f"its metadata has no {INPUT_NAME!r} input of shape [N, S, S, {INPUT_CHANNELS}]"
                )
            else:
                sizes[model] = size
        return sizes, problems

    async def ready_models(self, *, timeout_s: float | None = None) -> list[str]:
        """Models Triton has loaded and reports READY; empty when Triton cannot be reached."""
        return (await self.probe(timeout_s=timeout_s))[0]

    async def is_ready(self, model: str) -> bool:
        try:
            return bool(await self._client.is_model_ready(model, headers=self._headers))
        except InferenceServerException:
            return False

    async def inference_statistics(self, model: str) -> dict[str, Any]:
        stats: dict[str, Any] = await self._client.get_inference_statistics(
            model, as_json=True, headers=self._headers
        )
        return stats

    async def close(self) -> None:
        await self._client.close()
