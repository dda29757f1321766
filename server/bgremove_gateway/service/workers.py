"""A pod of gateway processes (--workers N): one parent supervising N workers and one embedded Triton.

Python runs one thread of Python at a time, so one gateway process tops out at about one core of
decoding, validation and gRPC work. N workers each run the whole gateway (server.py) and listen on
the same ports with SO_REUSEPORT, so the kernel spreads connections among them; they reach the one
embedded Triton the parent starts as an external one (--triton-url). The parent:
- checks that the ports are free (a second pod must not silently share them) and holds them, bound
  but not listening, so a port 0 stays the same for every worker and every restart;
- starts the workers, each with its share of the pod's CPU workers (runtime/budget.py share), all
  admitting calls against the pod's one memory budget and stream cap, counted in a table they share
  (runtime/shared_budget.py); and starts Triton, restarting it when it dies (TritonSupervisor);
- restarts a worker that dies, logs why and counts it (bgremove_worker_restarts_total), after
  returning what it held of the budget to the pod;
- serves the pod's metrics: the workers write theirs to files in a private tmpfs directory
  (prometheus-client's multiprocess mode), which the parent sums (runtime/metrics.py);
- on SIGTERM/SIGINT forwards SIGTERM to every worker, waits while each drains its calls
  (--drain-seconds), and stops Triton last.
Workers and Triton get SIGTERM from the kernel when the parent dies (killed, OOM): no orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from prometheus_client.multiprocess import mark_process_dead

from bgremove.tracing import otlp_traces_url
from bgremove_gateway.access.tls import ListenerError, listener
from bgremove_gateway.config import DEFAULT_HTTP_LISTEN, DEFAULT_METRICS_LISTEN, Settings
from bgremove_gateway.runtime import metrics
from bgremove_gateway.runtime.budget import share
from bgremove_gateway.runtime.shared_budget import (
    ADMISSION_ENV,
    ADMISSION_PREFIX,
    AdmissionTable,
    create_pod_table,
    remove_pod_table,
)
from bgremove_gateway.service.server import StartupError, serve, until_signalled
from bgremove_gateway.triton.embedded import EmbeddedTriton, TritonStartError, parent_death_launch
from bgremove_gateway.triton.supervisor import (
    FIRST_BACKOFF_S,
    MAX_BACKOFF_S,
    STABLE_AFTER_S,
    TritonSupervisor,
)

log = logging.getLogger("bgremove.workers")

# What a worker writes on its stdout, once: it listens, or why it could not start.
LISTENING: Final = "listening"
FAILED: Final = "error: "
# A worker that does not listen within this long counts as failed to start.
WORKER_START_TIMEOUT_S: Final = 120.0
# After --drain-seconds, how long a worker gets to stop its pools before it is killed.
EXIT_GRACE_S: Final = 15.0
SHM: Final = Path("/dev/shm")
# The pod's metrics directory: this prefix, the parent's pid, a random part.
METRICS_PREFIX: Final = "bgremove-metrics-"


def worker_settings(settings: Settings, index: int, triton_url: str | None) -> Settings:
    """Worker `index`'s settings: the pod's, with its share of the CPU workers, the parent's Triton as
    an external one, and no metrics listener (the parent serves the pod's). The memory budget and the
    stream cap stay the pod's: the workers count them together (runtime/shared_budget.py)."""
    n = settings.workers
    triton = settings.triton if triton_url is None else replace(settings.triton, urls=(triton_url,))
    return replace(
        settings,
        worker=index,
        triton=triton,
        metrics_listen=None,
        # Threads and encode processes per worker, so N workers together use what one would.
        cpu_workers=max(1, share(settings.cpu_workers, n, index)),
    )


def check_pod(settings: Settings) -> None:
    """StartupError when the pod's settings cannot make a pod."""
    n = settings.workers
    if n < 1:
        raise StartupError(f"--workers must be at least 1, got {n}")


def _split_address(address: str) -> tuple[str, int]:
    """ "127.0.0.1:50051" -> ("127.0.0.1", 50051); "[::]:50051" -> ("::", 50051)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535 or address.startswith("unix:"):
        raise StartupError(f"--workers needs HOST:PORT listeners to share, not {address!r}")
    return (host[1:-1] if host.startswith("[") and host.endswith("]") else host), int(port)


def hold_port(address: str) -> tuple[socket.socket, str]:
    """Checks that nothing listens on `address`, then binds it with SO_REUSEPORT (not listening) for
    the pod's life: (that socket, the address with the port the kernel gave for port 0)."""
    host, port = _split_address(address)
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        # Without SO_REUSEPORT first: this bind fails while anything, another pod included, listens.
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(where)
            port = probe.getsockname()[1]
        held = socket.socket(family, kind, proto)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((where[0], port, *where[2:]))
    except OSError as exc:
        raise StartupError(
            f"cannot listen on {address}: address in use or not available ({exc.strerror or exc})"
        ) from None
    shown = f"[{host}]" if ":" in host else host
    return held, f"{shown}:{port}"


async def _read_line(fd: int, timeout_s: float) -> bytes:
    """The first line written to pipe `fd` (which is closed after), b"" if none comes in time."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    try:
        return await asyncio.wait_for(reader.readline(), timeout_s)
    except asyncio.TimeoutError:
        return b""
    finally:
        transport.close()


def remove_orphaned_metrics(base: Path, prefix: str = METRICS_PREFIX) -> list[Path]:
    """Removes the metrics (or, by `prefix`, admission) directories of pods whose parent is gone
    (killed: it could not remove its own), which a pod's /dev/shm keeps across container restarts;
    returns them."""
    removed = []
    for found in base.glob(f"{prefix}*-*"):
        owner = found.name.removeprefix(prefix).split("-", 1)[0]
        if not owner.isdigit() or found.stat().st_uid != os.getuid():
            continue
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            shutil.rmtree(found, ignore_errors=True)
            removed.append(found)
        except PermissionError:  # alive, another user's
            pass
    return removed


@dataclass
class Worker:
    index: int
    process: asyncio.subprocess.Process
    started: float


def _how(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


class Pod:
    """The parent: the held ports, the workers, the embedded Triton and the pod's metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers: dict[int, Worker] = {}
        self.restarts = 0
        self.triton: EmbeddedTriton | None = None
        self.supervisor: TritonSupervisor | None = None
        self.metrics_dir: Path | None = None
        self.metrics_server: metrics.MetricsServer | None = None
        self.admission: AdmissionTable | None = None
        self._triton_url: str | None = None
        # Every worker process ever started, so stop() reaches one still starting too.
        self._processes: list[asyncio.subprocess.Process] = []
        self._held: list[socket.socket] = []
        self._watchers: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self) -> None:
        s = self.settings
        check_pod(s)
        try:
            listener(s.listen, s.security)  # TLS files and keys, checked before anything starts
        except ListenerError as exc:
            raise StartupError(str(exc)) from None
        held, listen = hold_port(s.listen)
        self._held.append(held)
        security = s.security
        if security.health_listen is not None:
            held, health_listen = hold_port(security.health_listen)
            self._held.append(held)
            security = replace(security, health_listen=health_listen)
        http_listen = s.http_listen
        if http_listen is not None:
            try:
                held, http_listen = hold_port(http_listen)
                self._held.append(held)
            except StartupError as exc:
                if http_listen != DEFAULT_HTTP_LISTEN:
                    raise
                log.warning("%s: serving no HTTP API (choose another with --http-listen)", exc)
                http_listen = None
        self.settings = s = replace(s, listen=listen, security=security, http_listen=http_listen)
        self._serve_metrics()
        self._share_admission()
        if s.triton.embedded:
            self.triton = EmbeddedTriton(s.triton, otlp_traces_url=otlp_traces_url())
            self._triton_url = self.triton.grpc_url
        # Triton loads its models while the workers start; either failing stops the pod's start.
        tasks = {asyncio.create_task(self._start_workers()), asyncio.create_task(self._start_triton())}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _start_workers(self) -> None:
        # One at a time: N interpreters importing at once on few cores would only slow each other.
        for index in range(self.settings.workers):
            await self._start_worker(index)
        log.info("%d gateway workers listening on %s", self.settings.workers, self.settings.listen)

    def _serve_metrics(self) -> None:
        address = self.settings.metrics_listen
        if address is None:
            return
        # tmpfs, so the workers' metric files never reach a disk; 0700, the pod's user only.
        base = Path(tempfile.gettempdir()) if not SHM.is_dir() else SHM
        remove_orphaned_metrics(base)
        self.metrics_dir = Path(tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-", dir=base))
        own = metrics.PodCollector(
            self.settings.workers,
            lambda: self.restarts,
            lambda: self.supervisor.restarts if self.supervisor is not None else 0,
        )
        registry = metrics.pod_registry(str(self.metrics_dir), own)
        try:
            self.metrics_server = metrics.serve_metrics(address, registry)
        except metrics.MetricsListenError as exc:
            if address != DEFAULT_METRICS_LISTEN:
                raise StartupError(str(exc)) from None
            log.warning("%s: serving no metrics", exc)  # as a single gateway does (server.py)
            return
        host = address.rpartition(":")[0]
        log.info("serving the pod's metrics on http://%s:%d/metrics", host, self.metrics_server.port)

    def _share_admission(self) -> None:
        """The table in which every worker counts the pod's budget and streams; tmpfs and 0700 like
        the metrics directory, and only counters in it."""
        base = Path(tempfile.gettempdir()) if not SHM.is_dir() else SHM
        remove_orphaned_metrics(base, ADMISSION_PREFIX)
        self.admission = create_pod_table(base, self.settings.workers)

    async def _spawn(self, index: int) -> Worker:
        """Starts worker `index` and returns once it listens; StartupError when it cannot."""
        launcher, preexec = parent_death_launch()
        env = dict(os.environ)
        if self.metrics_dir is not None:
            env[metrics.MULTIPROC_ENV] = str(self.metrics_dir)
        if self.admission is not None:
            env[ADMISSION_ENV] = str(self.admission.path)
        # Its status comes on a pipe of its own, not stdout: the encode processes a worker starts
        # inherit stdout, and asyncio's wait() would wait for them to close it too.
        status_fd, report_fd = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                *launcher,
                sys.executable,
                "-m",
                __name__,
                str(report_fd),
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(report_fd,),
                env=env,
                # Own process group: a Ctrl-C reaches the parent, which has each worker drain.
                start_new_session=True,
                preexec_fn=preexec,
            )
        finally:
            os.close(report_fd)
        self._processes.append(process)
        assert process.stdin is not None
        process.stdin.write(pickle.dumps(worker_settings(self.settings, index, self._triton_url)))
        await process.stdin.drain()
        process.stdin.close()
        line = await _read_line(status_fd, WORKER_START_TIMEOUT_S)
        said = line.decode("utf-8", "replace").strip()
        if said == LISTENING:
            log.info("gateway worker %d started (pid %d)", index, process.pid)
            return Worker(index, process, time.monotonic())
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        code = await process.wait()
        if said.startswith(FAILED):
            raise StartupError(said.removeprefix(FAILED))
        raise StartupError(f"gateway worker {index} {_how(code)} before it listened; its log is above")

    async def _start_worker(self, index: int) -> None:
        worker = await self._spawn(index)
        self.workers[index] = worker
        task = asyncio.create_task(self._watch(worker), name=f"worker-{index}")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(self, worker: Worker) -> None:
        """Restarts the worker when it dies; backs off while it keeps dying soon after starting."""
        backoff = 0.0
        while True:
            code = await worker.process.wait()
            if self._stopping:
                return
            ran_s = time.monotonic() - worker.started
            # What it started (encode processes) dies with it: they are in its process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.process.pid, signal.SIGKILL)
            if self.metrics_dir is not None:  # its live gauges leave the pod's totals; counters stay
                mark_process_dead(worker.process.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
            if self.admission is not None:  # what its calls held returns to the pod before it restarts
                self.admission.clear(worker.index)
            log.error(
                "gateway worker %d (pid %d) %s after %.0f s; restarting it",
                worker.index,
                worker.process.pid,
                _how(code),
                ran_s,
            )
            backoff = 0.0 if ran_s >= STABLE_AFTER_S else max(FIRST_BACKOFF_S, backoff * 2)
            while True:
                backoff = min(backoff, MAX_BACKOFF_S)
                await asyncio.sleep(backoff)
                try:
                    worker = await self._spawn(worker.index)
                    break
                except StartupError as exc:
                    backoff = max(FIRST_BACKOFF_S, backoff * 2)
                    log.error(
                        "restarting gateway worker %d failed (%s); next try in %g s",
                        worker.index,
                        exc,
                        backoff,
                    )
            self.workers[worker.index] = worker
            self.restarts += 1

    async def _start_triton(self) -> None:
        triton = self.triton
        if triton is None:
            return
        try:
            await triton.start()
        except TritonStartError as exc:
            raise StartupError(str(exc)) from None
        log.info("embedded Triton ready at %s with models %s", triton.grpc_url, ", ".join(triton.models))

        async def nothing() -> None:  # the workers' pools probe Triton every second by themselves
            return None

        self.supervisor = TritonSupervisor(triton, on_exit=lambda reason: None, on_ready=nothing)
        self.supervisor.start()

    async def stop(self) -> None:
        """SIGTERM to every worker, which drains its calls; then Triton, metrics and the ports."""
        self._stopping = True
        for task in list(self._watchers):
            task.cancel()
        workers = [p for p in self._processes if p.returncode is None]
        for process in workers:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        if workers:
            _, late = await asyncio.wait(
                [asyncio.create_task(p.wait()) for p in workers],
                timeout=self.settings.drain_seconds + EXIT_GRACE_S,
            )
            for process in workers:
                if process.returncode is None:
                    log.warning("gateway worker pid %d did not exit in time; killing it", process.pid)
                # Its own process group: the worker with its encode processes.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
            for waiting in late:
                await waiting
        if self.supervisor is not None:
            await self.supervisor.stop()
        if self.triton is not None:
            await self.triton.stop()
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.stop)
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        if self.admission is not None:
            remove_pod_table(self.admission)
            self.admission = None
        for held in self._held:
            held.close()


async def serve_pod(settings: Settings) -> int:
    """`bgremove serve --workers N` (N > 1): the parent, until SIGTERM/SIGINT."""
    pod = Pod(settings)

    def draining() -> None:
        log.info(
            "shutting down: %d workers draining for up to %.0fs", len(pod.workers), settings.drain_seconds
        )

    code = await until_signalled(pod, lambda: None, draining)
    log.info("stopped")
    return code


def _worker_main() -> int:
    """A worker: its settings come pickled on stdin from the parent, its status goes to stdout."""
    from bgremove.tracing import configure_tracing, shutdown_tracing
    from bgremove_gateway.runtime.logs import configure_logging
    from bgremove_gateway.runtime.memory import configure_allocator

    settings: Settings = pickle.loads(sys.stdin.buffer.read())
    report = os.fdopen(int(sys.argv[1]), "w", encoding="utf-8")
    configure_logging(settings.log_level, settings.log_format)
    configure_allocator()
    assert settings.worker is not None
    metrics.set_worker(settings.worker)
    if metrics.multiprocess():
        metrics.start_publishing()
    provider = configure_tracing("bgremove-gateway")

    def listening() -> None:
        report.write(LISTENING + "\n")
        report.close()

    try:
        return asyncio.run(serve(settings, started=listening))
    except StartupError as exc:
        if not report.closed:
            report.write(FAILED + " ".join(str(exc).split()) + "\n")
            report.close()
        return 1
    finally:
        shutdown_tracing(provider)


if __name__ == "__main__":
    sys.exit(_worker_main())
