"""Gateway lifecycle: bind, report NOT_SERVING, bring up Triton, serve, drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

from bgremove.tracing import otlp_traces_url
from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from bgremove_gateway.access.control import RELOAD_INTERVAL_S, AccessControl, KeyStore
from bgremove_gateway.access.shared_limits import SharedLimiter, SharedLimitsError
from bgremove_gateway.access.tls import Listener, ListenerError, is_loopback, listener
from bgremove_gateway.config import DEFAULT_HTTP_LISTEN, DEFAULT_METRICS_LISTEN, Settings
from bgremove_gateway.http import listener as http_listener
from bgremove_gateway.http.app import PATH, HttpApi, create_app, http_policy
from bgremove_gateway.http.fetch import UrlFetcher
from bgremove_gateway.http.listener import HttpServer
from bgremove_gateway.pipeline.encode_pool import EncodePool
from bgremove_gateway.pipeline.flow import Pipeline
from bgremove_gateway.runtime import metrics
from bgremove_gateway.runtime.budget import PER_REQUEST_OVERHEAD_BYTES, MemoryBudget, image_bytes_estimate
from bgremove_gateway.runtime.shared_budget import ADMISSION_ENV, AdmissionTable
from bgremove_gateway.service.calls import CallLifecycle
from bgremove_gateway.service.servicer import BackgroundRemovalServicer, ServingState
from bgremove_gateway.triton.embedded import EmbeddedTriton, TritonStartError
from bgremove_gateway.triton.pool import TritonPool
from bgremove_gateway.triton.supervisor import TritonSupervisor

log = logging.getLogger("bgremove.gateway")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BackgroundRemoval"].full_name


class StartupError(Exception):
    """A one-line reason the gateway cannot start; the CLI prints it and exits 1."""


def _reuseport(settings: Settings) -> int:
    """1 in a worker of a pod, whose siblings listen on the same ports; 0 otherwise."""
    return 0 if settings.worker is None else 1


def _grpc_options(settings: Settings) -> list[tuple[str, int]]:
    lim, conn = settings.limits, settings.connections
    return [
        ("grpc.max_receive_message_length", lim.largest_request_bytes),
        ("grpc.max_send_message_length", lim.largest_answer_bytes),
        # gRPC sets SO_REUSEPORT by default, which lets a second gateway silently share the port;
        # only the workers of one pod (--workers) share it, each its own listener.
        ("grpc.so_reuseport", _reuseport(settings)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Clients pinging more often than this get GOAWAY (too_many_pings) after two strikes.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_concurrent_streams", conn.max_streams_per_connection),
        ("grpc.max_connection_idle_ms", int(conn.max_idle_s * 1000)),
        ("grpc.max_connection_age_ms", int(conn.max_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(conn.max_age_grace_s * 1000)),
        ("grpc.keepalive_time_ms", int(conn.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(conn.keepalive_timeout_s * 1000)),
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


def _admission(settings: Settings) -> MemoryBudget:
    """This process's budget, or in a worker of a pod the pod's, in the table its parent made."""
    path = os.environ.get(ADMISSION_ENV) if settings.worker is not None else None
    if not path:
        return MemoryBudget(settings.memory_budget_bytes, settings.max_concurrent_streams)
    table = AdmissionTable(Path(path), settings.workers)
    return MemoryBudget(
        settings.memory_budget_bytes, settings.max_concurrent_streams, table, settings.worker or 0
    )


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
        self.pool: TritonPool | None = None
        self.supervisor: TritonSupervisor | None = None
        self.admission = _admission(settings)
        self.executor = ThreadPoolExecutor(
            max_workers=settings.cpu_workers, thread_name_prefix="bgremove-cpu"
        )
        self.encoder: EncodePool | None = None
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self.metrics_server: metrics.MetricsServer | None = None
        self.http_socket: socket.socket | None = None
        self.http_server: HttpServer | None = None
        self.servicer: BackgroundRemovalServicer | None = None
        self.port = 0
        self._monitor: asyncio.Task[None] | None = None
        self._key_reloader: asyncio.Task[None] | None = None
        self.shared_limits: SharedLimiter | None = None

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Binds the port first (so a taken port fails in a second), then brings the backend up."""
        security = self._security()
        self.shared_limits = self._shared_limits(security)
        access_control = AccessControl(security.policy, self.shared_limits)
        server = self._bind_api(security, access_control)
        self._bind_http()
        if self.shared_limits is not None:
            await self.shared_limits.start()
        self._bind_health_listener()
        self._serve_metrics()
        self._reload_keys_when_changed(access_control)
        pool = self._backend()
        pipeline = await self._pipeline(pool)
        metrics.watch(pool=pool, encoder=self.encoder)
        self._add_services(server, pipeline)
        await self._listen(server)
        await self._serve_http(pipeline, access_control)
        await self._start_embedded_triton(server, pool)
        await self._follow_backend(pool, pipeline)

    def _security(self) -> Listener:
        """What the listener demands (TLS, keys, client certificates), checked before anything binds."""
        try:
            return listener(self.settings.listen, self.settings.security)
        except ListenerError as exc:
            raise StartupError(str(exc)) from None

    def _shared_limits(self, security: Listener) -> SharedLimiter | None:
        """Per-key limits in Redis for every replica (--limits-redis-url); None: this process alone."""
        sec = self.settings.security
        if not sec.limits_redis_url:
            return None
        if security.policy.keys is None:
            log.warning("--limits-redis-url is ignored: per-key limits need API keys (--api-keys-file)")
            return None
        # Each worker of a pod is a limiter of its own: its share when Redis is down is 1/(pods x workers).
        processes = sec.limits_replicas * (self.settings.workers if self.settings.worker is not None else 1)
        try:
            return SharedLimiter(
                sec.limits_redis_url, timeout_s=sec.limits_redis_timeout_s, replicas=processes
            )
        except SharedLimitsError as exc:
            raise StartupError(str(exc)) from None

    def _bind_api(self, security: Listener, access_control: AccessControl) -> grpc.aio.Server:
        """The gRPC server with its interceptors, bound to --listen (not started yet)."""
        s = self.settings
        tracing_filter = filters.negate(
            filters.any_of(
                filters.service_name("grpc.health.v1.Health"),
                filters.service_prefix("grpc.reflection"),
            )
        )
        server = grpc.aio.server(
            interceptors=[CallLifecycle(), aio_server_interceptor(filter_=tracing_filter), access_control],
            options=_grpc_options(s),
        )
        self.port = _bind(server, s.listen, security.credentials)
        self.server = server
        return server

    def _bind_http(self) -> None:
        """The remove.bg-compatible HTTP API's socket (--http-listen), bound now so a bad address
        fails at once; served from _serve_http."""
        address = self.settings.http_listen
        if address is None:
            return
        try:
            self.http_socket = http_listener.bind(address, reuse_port=bool(_reuseport(self.settings)))
        except http_listener.HttpListenError as exc:
            if address != DEFAULT_HTTP_LISTEN:
                raise StartupError(str(exc)) from None
            # As with metrics: the default port taken (`make run` beside a second gateway) must not
            # keep gRPC from serving; an address asked for must be there.
            log.warning("%s: serving no HTTP API (choose another with --http-listen)", exc)

    async def _serve_http(self, pipeline: Pipeline, access_control: AccessControl) -> None:
        """Serves the HTTP API on this event loop, with the gRPC servicer's pipeline and limits."""
        s, sock = self.settings, self.http_socket
        if sock is None:
            return
        assert self.servicer is not None
        fetcher = None
        if s.http_allow_urls:
            fetcher = UrlFetcher(s.limits.max_upload_bytes, timeout_s=s.limits.idle_timeout_s)
        # Its own rules (no client certificates over HTTP), the same keys and per-key limits.
        address = s.http_listen or ""
        policy = http_policy(access_control.policy, address, s.security.insecure)
        if not is_loopback(address):
            log.warning("serving the HTTP API in plaintext on %s: put TLS in front of it", address)
        http_access = AccessControl(policy, access_control.admission)
        api = HttpApi(pipeline, self.state, self.admission, http_access, self.servicer.idle_trim, fetcher)
        self.http_server = HttpServer(create_app(api, ui=s.http_ui), sock, s.drain_seconds)
        await self.http_server.start()
        log.info("serving the HTTP API on http://%s%s", address, PATH)

    def _bind_health_listener(self) -> None:
        """The optional plaintext listener for probes: grpc.health.v1 and reflection only, since the
        kubelet's gRPC probe cannot do TLS (grpcurl needs reflection to name the service it calls)."""
        address = self.settings.security.health_listen
        if address is None:
            return
        self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", _reuseport(self.settings))])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        reflection.enable_server_reflection(
            (health.SERVICE_NAME, reflection.SERVICE_NAME), self.health_server
        )
        _bind(self.health_server, address, None)

    def _serve_metrics(self) -> None:
        """The Prometheus listener (--metrics-listen), apart from the API and open without a key."""
        metrics.watch(budget=self.admission)
        address = self.settings.metrics_listen
        if address is None:
            return
        try:
            self.metrics_server = metrics.serve_metrics(address)
        except metrics.MetricsListenError as exc:
            if address != DEFAULT_METRICS_LISTEN:
                raise StartupError(str(exc)) from None
            # The default port taken (a second gateway on this host, a test run beside `make run`)
            # must not keep the API from serving; an address asked for must be there.
            log.warning("%s: serving no metrics", exc)
            return
        log.info("serving metrics on http://%s/metrics", address)

    def _reload_keys_when_changed(self, access_control: AccessControl) -> None:
        keys = access_control.policy.keys
        if keys is not None:
            self._key_reloader = asyncio.create_task(_reload_keys(keys, access_control))

    def _backend(self) -> TritonPool:
        """The pool of Triton replicas: the --triton-url ones, or the embedded Triton (made here,
        started once the gateway listens)."""
        s = self.settings
        urls = list(s.triton.urls)
        if not urls:
            self.triton = EmbeddedTriton(s.triton, otlp_traces_url=otlp_traces_url())
            urls = [self.triton.grpc_url]
        try:
            self.pool = TritonPool(
                urls,
                default_model=s.default_model,
                infer_timeout_s=s.triton.infer_timeout_s,
                resolve_interval_s=s.triton.resolve_interval_s,
                admin_key=s.triton.read_admin_key() if s.triton.urls else None,
            )
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        return self.pool

    async def _pipeline(self, pool: TritonPool) -> Pipeline:
        """The data path, with its encode worker processes started."""
        s = self.settings
        self._warn_if_budget_too_small()
        self.encoder = EncodePool(s.cpu_workers)
        await asyncio.to_thread(self.encoder.start)
        return Pipeline(s, pool, self.executor, self.encoder)

    def _add_services(self, server: grpc.aio.Server, pipeline: Pipeline) -> None:
        self.servicer = BackgroundRemovalServicer(pipeline, self.state, self.admission)
        pb_grpc.add_BackgroundRemovalServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

    async def _listen(self, server: grpc.aio.Server) -> None:
        """Starts serving, NOT_SERVING until the backend is ready."""
        await self._set_health(False)
        await server.start()
        if self.health_server is not None:
            await self.health_server.start()
        log.info("listening on %s (NOT_SERVING until the model is ready)", self.settings.listen)

    async def _start_embedded_triton(self, server: grpc.aio.Server, pool: TritonPool) -> None:
        """Starts the embedded Triton, if there is one, and the supervisor that restarts it."""
        triton = self.triton
        if triton is None:
            return
        try:
            await triton.start()
        except TritonStartError as exc:
            await server.stop(0)
            raise StartupError(str(exc)) from None
        log.info("embedded Triton ready at %s with models %s", triton.grpc_url, ", ".join(triton.models))
        self.supervisor = TritonSupervisor(
            triton,
            on_exit=lambda reason: pool.mark_down(triton.grpc_url, reason),
            on_ready=pool.probe_all,
        )
        self.supervisor.start()

    async def _follow_backend(self, pool: TritonPool, pipeline: Pipeline) -> None:
        """Probes the pool once (so the first health status is real), then follows its changes."""
        await pool.start()
        await self._apply_pool_status(pipeline)
        self._monitor = asyncio.create_task(self._follow_pool(pipeline))

    def _warn_if_budget_too_small(self) -> None:
        s, lim = self.settings, self.settings.limits
        largest = (
            lim.max_upload_bytes
            + image_bytes_estimate(lim.max_pixels, 1, pb.OUTPUT_FORMAT_PNG)
            + PER_REQUEST_OVERHEAD_BYTES
        )
        if largest > s.memory_budget_bytes and s.worker in (None, 0):  # once for a pod of workers
            log.warning(
                "--memory-budget-bytes %d is below the %d bytes the largest allowed image needs as a "
                "PNG cut-out (--max-upload-bytes + --max-pixels x 16): such requests will be refused",
                s.memory_budget_bytes,
                largest,
            )

    async def _apply_pool_status(self, pipeline: Pipeline) -> None:
        assert self.pool is not None
        status = self.pool.status
        if status.ready != self.state.ready:
            log.info("backend %s: %s", "SERVING" if status.ready else "NOT_SERVING", status.summary)
        self.state.models, self.state.ready = list(status.models), status.ready
        self.state.reason = status.summary
        if status.models:
            pipeline.models = status.models
            # A size once learnt outlives a failed metadata call: better than falling back to 320.
            pipeline.input_sizes = {**pipeline.input_sizes, **dict(status.input_sizes)}
        await self._set_health(status.ready)

    async def _follow_pool(self, pipeline: Pipeline) -> None:
        """Health follows the pool: SERVING while any replica has the default model READY."""
        assert self.pool is not None
        while True:
            await self.pool.changed.wait()
            self.pool.changed.clear()
            await self._apply_pool_status(pipeline)

    async def stop(self) -> None:
        """Graceful drain: NOT_SERVING at once, new RPCs refused, in-flight ones get drain_seconds."""
        await self.health.enter_graceful_shutdown()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        if self._key_reloader is not None:
            self._key_reloader.cancel()
        # Both APIs drain at once, each giving its requests in flight drain_seconds.
        draining = []
        if self.server is not None:
            draining.append(self.server.stop(self.settings.drain_seconds))
        if self.http_server is not None:
            draining.append(self.http_server.stop())
        elif self.http_socket is not None:
            self.http_socket.close()
        await asyncio.gather(*draining)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self.pool is not None:
            await self.pool.close()
        if self.triton is not None:
            await self.triton.stop()
        if self.shared_limits is not None:  # after the drain: the last calls release their slots
            await self.shared_limits.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.encoder is not None:
            self.encoder.shutdown()
        if self.metrics_server is not None:  # last, so scrapes see the drain
            await asyncio.to_thread(self.metrics_server.stop)


class Servable(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def until_signalled(target: Servable, ready: Callable[[], None], draining: Callable[[], None]) -> int:
    """Starts `target` and runs it until SIGTERM/SIGINT, then stops it; a signal during the start
    cancels the start. `ready` once it has started, `draining` when the signal came after that."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        starting = asyncio.create_task(target.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartupError):
                await starting
        else:
            starting.result()
            ready()
            await stopping
        draining()
    finally:
        await target.stop()
    return 0


async def serve(settings: Settings, started: Callable[[], None] | None = None) -> int:
    """Runs the gateway until SIGTERM/SIGINT; `started` is called once it listens (and serves, when
    the backend is ready), for a pod's parent waiting on its worker."""

    def ready() -> None:
        log.info("serving bgremove on %s", settings.listen)
        if started is not None:
            started()

    def draining() -> None:
        log.info("shutting down: draining for up to %.0fs", settings.drain_seconds)

    code = await until_signalled(Gateway(settings), ready, draining)
    log.info("stopped")
    return code
