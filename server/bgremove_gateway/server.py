"""Gateway lifecycle: bind, report NOT_SERVING, bring up Triton, serve, drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

from bgremove.tracing import otlp_traces_url
from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from bgremove_gateway.auth import RELOAD_INTERVAL_S, AccessControl, KeyStore
from bgremove_gateway.config import Settings
from bgremove_gateway.infer import TritonInference
from bgremove_gateway.pipeline import Pipeline
from bgremove_gateway.servicer import BackgroundRemovalServicer, ServingState
from bgremove_gateway.tls import ListenerError, listener
from bgremove_gateway.triton_process import EmbeddedTriton, TritonStartError

log = logging.getLogger("bgremove.gateway")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BackgroundRemoval"].full_name
_MONITOR_INTERVAL_S = 2.0


class StartupError(Exception):
    """A one-line reason the gateway cannot start; the CLI prints it and exits 1."""


def _grpc_options(settings: Settings) -> list[tuple[str, int]]:
    lim = settings.limits
    largest_message = max(lim.max_unary_bytes, lim.max_chunk_bytes) + 64 * 1024
    return [
        ("grpc.max_receive_message_length", largest_message),
        ("grpc.max_send_message_length", max(largest_message, lim.result_chunk_bytes + 64 * 1024)),
        # gRPC sets SO_REUSEPORT by default, which lets a second gateway silently share the port.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    port: int
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {address}: address in use or not available ({exc})") from None
    if port == 0:
        raise StartupError(f"cannot listen on {address}: address in use or not available")
    return port


async def _reload_keys(keys: KeyStore, access_control: AccessControl) -> None:
    while True:
        await asyncio.sleep(RELOAD_INTERVAL_S)
        if keys.reload_if_changed():
            access_control.admission.forget(keys.ids)


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = ServingState()
        self.health = health.aio.HealthServicer()
        self.triton: EmbeddedTriton | None = None
        self.inference: TritonInference | None = None
        self.executor = ThreadPoolExecutor(
            max_workers=settings.cpu_workers, thread_name_prefix="bgremove-cpu"
        )
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self.port = 0
        self._monitor: asyncio.Task[None] | None = None
        self._key_reloader: asyncio.Task[None] | None = None

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Binds the port first (so a taken port fails in a second), then brings the backend up."""
        s = self.settings
        tracing_filter = filters.negate(
            filters.any_of(
                filters.service_name("grpc.health.v1.Health"),
                filters.service_prefix("grpc.reflection"),
            )
        )
        try:
            security = listener(s.listen, s.security)
        except ListenerError as exc:
            raise StartupError(str(exc)) from None
        access_control = AccessControl(security.policy)
        server = grpc.aio.server(
            interceptors=[aio_server_interceptor(filter_=tracing_filter), access_control],
            options=_grpc_options(s),
        )
        self.port = _bind(server, s.listen, security.credentials)
        self.server = server
        if s.security.health_listen is not None:
            # Plaintext and nothing but grpc.health.v1: the kubelet's gRPC probe cannot do TLS.
            self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            _bind(self.health_server, s.security.health_listen, None)
        if security.policy.keys is not None:
            self._key_reloader = asyncio.create_task(_reload_keys(security.policy.keys, access_control))

        triton_url = s.triton.urls[0] if s.triton.urls else None
        if triton_url is None:
            self.triton = EmbeddedTriton(s.triton, otlp_traces_url=otlp_traces_url())
            triton_url = self.triton.grpc_url
        self.inference = TritonInference(triton_url, timeout_s=s.triton.infer_timeout_s)
        pipeline = Pipeline(s, self.inference, self.executor)
        pb_grpc.add_BackgroundRemovalServicer_to_server(
            BackgroundRemovalServicer(pipeline, self.state), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        await self._set_health(False)
        await server.start()
        if self.health_server is not None:
            await self.health_server.start()
        log.info("listening on %s (NOT_SERVING until the model is ready)", s.listen)

        if self.triton is not None:
            try:
                await self.triton.start()
            except TritonStartError as exc:
                await server.stop(0)
                raise StartupError(str(exc)) from None
            log.info("embedded Triton ready at %s with models %s", triton_url, ", ".join(self.triton.models))
        pipeline.models = await self._refresh()
        self._monitor = asyncio.create_task(self._watch_backend(pipeline))

    async def _refresh(self) -> list[str]:
        assert self.inference is not None
        models = await self.inference.ready_models()
        ready = self.settings.default_model in models
        if ready != self.state.ready:
            log.info("backend %s: models ready %s", "SERVING" if ready else "NOT_SERVING", models)
        self.state.models, self.state.ready = models, ready
        await self._set_health(ready)
        return models

    async def _watch_backend(self, pipeline: Pipeline) -> None:
        """Health follows the backend: NOT_SERVING whenever the default model is not READY."""
        while True:
            await asyncio.sleep(_MONITOR_INTERVAL_S)
            models = await self._refresh()
            if models:
                pipeline.models = models

    async def stop(self) -> None:
        """Graceful drain: NOT_SERVING at once, new RPCs refused, in-flight ones get drain_seconds."""
        await self.health.enter_graceful_shutdown()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        if self._key_reloader is not None:
            self._key_reloader.cancel()
        if self.server is not None:
            await self.server.stop(self.settings.drain_seconds)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.inference is not None:
            await self.inference.close()
        if self.triton is not None:
            await self.triton.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)


async def serve(settings: Settings) -> int:
    gateway = Gateway(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        starting = asyncio.create_task(gateway.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartupError):
                await starting
        else:
            starting.result()
            log.info("serving bgremove on %s", settings.listen)
            await stopping
        log.info("shutting down: draining for up to %.0fs", settings.drain_seconds)
    finally:
        await gateway.stop()
    log.info("stopped")
    return 0
