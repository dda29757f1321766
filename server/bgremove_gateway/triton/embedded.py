"""Runs the real `tritonserver` binary from the nvidia-pytriton wheel as a child process.

Only the Python backend ships in that wheel, so the embedded server runs the models' CPU configs
(Python backend + ONNX Runtime). Everything binds 127.0.0.1. Triton's output goes to an in-memory
ring buffer and the `bgremove.triton` logger, never to a file.

Locked down against other local users, who can reach loopback ports and /dev/shm:
- `--model-control-mode=none` over a private repository holding only the served models: Triton
  loads them once at start and refuses every load/unload call (a loaded model's model.py would run
  as this user), whoever asks;
- its admin APIs (ADMIN_PROTOCOLS) answer only calls carrying a key made afresh for each start. The
  gateway needs none of them. Triton takes the key only as a command-line argument, which
  /proc/PID/cmdline shows to every local user; what that key still opens here (the repository
  index, shared-memory registration inside Triton's private /dev/shm, trace level and rate, log
  verbosity: Triton refuses to change trace or log file paths over the network) is no way in;
- Triton gets a /dev/shm of its own (a 0700 directory bind-mounted in a mount namespace): the
  Python backend makes its shared-memory regions, which hold every request's tensors, 0644
  whatever the umask (boost.interprocess fchmods them), so in the shared /dev/shm any local user
  could read them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from bgremove_gateway.config import TritonSettings
from bgremove_gateway.triton.client import ADMIN_HEADER
from bgremove_gateway.triton.graph import ModelPreparationError, served_models

log = logging.getLogger("bgremove.triton")

HOST = "127.0.0.1"
TRACE_SERVICE_NAME = "bgremove-triton"
_LOG_LINES = 1000
_POLL_S = 0.25
_PR_SET_PDEATHSIG = 1
# Triton's log prefix for errors: E<MMDD> <time> <tid> <file:line>]
_ERROR_LINE = re.compile(r"^E\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\] ")
# With model-control-mode=none Triton's exit line says only "failed to load all models"; which
# model failed, and why, is on an earlier line of its own.
_MODEL_FAILED = re.compile(r"failed to load '([^']+)' version (\S+): (.*)")
# A proxy from the environment must never see loopback health probes.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Triton's APIs that change or reveal the server rather than serve: loading and unloading models,
# shared-memory registration, trace and log settings. Health, metadata, inference, model config
# and statistics stay open: the gateway's probe uses health and statistics, tests use statistics.
ADMIN_PROTOCOLS = ("model-repository", "shared-memory", "trace", "logging")
SHM = Path("/dev/shm")
# Run by `sh -c` inside the new mount namespace: $0 is the private directory, "$@" the command.
_BIND_SHM = 'mount --bind "$0" /dev/shm && exec "$@"'


class TritonStartError(RuntimeError):
    """Triton could not be started; the first line of the message says why."""


@dataclass(frozen=True)
class TritonInstallation:
    """The pieces of the nvidia-pytriton wheel needed to run tritonserver directly."""

    server: Path
    python_backend: Path
    stub: Path
    libs: Path

    @classmethod
    def locate(cls) -> TritonInstallation:
        # find_spec does not import pytriton (whose import pulls in much more than we need).
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise TritonStartError(
                "package nvidia-pytriton==0.7.0 (which ships tritonserver) is not installed"
            )
        package = Path(next(iter(spec.submodule_search_locations)))
        root = package / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        found = cls(
            server=root / "bin" / "tritonserver",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
            libs=package.parent / "nvidia_pytriton.libs",
        )
        for path in (found.server, found.python_backend, found.libs):
            if not path.exists():
                raise TritonStartError(f"nvidia-pytriton install is incomplete: {path} is missing")
        if not found.stub.exists():
            raise TritonStartError(
                f"nvidia-pytriton has no Python backend stub for Python {version} ({found.stub})"
            )
        return found

    def make_backend_dir(self) -> Path:
        """A private backend directory: Triton wants the stub matching this Python beside
        libtriton_python.so, and the wheel keeps the stubs for every Python elsewhere."""
        root = Path(tempfile.mkdtemp(prefix="bgremove-triton-"))
        target = root / "backends" / "python"
        target.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(self.python_backend / name, target / name)
        shutil.copy2(self.stub, target / "triton_python_backend_stub")
        return root


def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Like the servers Triton runs, ignore TIME_WAIT leftovers from a previous run.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _http_ok(url: str) -> bool:
    try:
        with _HTTP.open(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


async def not_ready(http_url: str, models: list[str]) -> list[str]:
    """One readiness probe over HTTP (Triton has no gRPC health service); returns what is not
    READY yet: "server" and/or model names. Blocking urllib runs off the event loop."""
    base = f"http://{http_url}/v2"
    urls = {"server": f"{base}/health/ready"} | {m: f"{base}/models/{m}/ready" for m in models}
    results = await asyncio.gather(*(asyncio.to_thread(_http_ok, u) for u in urls.values()))
    return [name for name, ok in zip(urls, results, strict=True) if not ok]


def parent_death_launch() -> tuple[list[str], Callable[[], None] | None]:
    """(argv prefix, preexec_fn) that make the kernel SIGTERM Triton when the gateway dies without
    stopping it (killed, OOM), so no orphaned Triton keeps holding the ports.

    util-linux's setpriv sets the signal in the child just before it executes Triton, so the
    gateway needs no preexec_fn. With one, Python forks instead of vforking and the child runs
    gRPC's fork handlers while gRPC's threads are busy; that aborted Triton's start now and then
    (signal 6, "epoll_wait error: Bad file descriptor"). Without setpriv, a prctl preexec_fn does
    it; libc is looked up here, in the parent, so the forked child makes one system call."""
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [setpriv, "--pdeathsig", "TERM", "--"], None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return [], None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return [], preexec


def restricted_api_flags(key: str, protocols: Iterable[str] = ADMIN_PROTOCOLS) -> list[str]:
    """Triton's flags that make `protocols` answer only calls with the ADMIN_HEADER `key` (gRPC
    metadata triton-grpc-protocol-<ADMIN_HEADER>, HTTP header <ADMIN_HEADER>)."""
    group = f"{','.join(protocols)}:{ADMIN_HEADER}={key}"
    return [f"--grpc-restricted-protocol={group}", f"--http-restricted-api={group}"]


_isolation: list[str] | None = None
_isolation_probed = False


def private_shm_launch(shm_dir: Path) -> list[str] | None:
    """argv prefix that runs a command with `shm_dir` bind-mounted on /dev/shm in a mount namespace
    of its own, so what it creates in /dev/shm lands in `shm_dir` (0700: no other user gets in).
    As root a mount namespace alone; otherwise, or where root lacks CAP_SYS_ADMIN, inside a user
    namespace where the user is root. None where the system allows neither (e.g. a container whose
    seccomp profile forbids unshare). Which one works is found once, by running it."""
    global _isolation, _isolation_probed
    if not _isolation_probed:
        _isolation = _probe_isolation()
        _isolation_probed = True
    if _isolation is None:
        return None
    return [*_isolation, str(shm_dir)]


def _probe_isolation() -> list[str] | None:
    unshare, sh = shutil.which("unshare"), shutil.which("sh")
    if unshare is None or sh is None or shutil.which("mount") is None:
        return None
    unprivileged = [unshare, "--user", "--map-root-user", "--mount", "--propagation", "private"]
    variants = [[unshare, "--mount", "--propagation", "private"], unprivileged]
    if os.geteuid() != 0:
        variants = [unprivileged]
    for variant in variants:
        prefix = [*variant, "--", sh, "-c", _BIND_SHM]
        try:
            probe = Path(tempfile.mkdtemp(prefix="bgremove-shm-probe-", dir=SHM))
        except OSError:  # no /dev/shm
            return None
        try:
            subprocess.run(
                [*prefix, str(probe), sh, "-c", ": > /dev/shm/probe"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=10,
                check=False,
            )
            if (probe / "probe").is_file():
                return prefix
        except (OSError, subprocess.SubprocessError):
            pass
        finally:
            shutil.rmtree(probe, ignore_errors=True)
    return None


def _child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (the Python backend stubs), from /proc."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = Path(entry.path, "stat").read_text()
                # Field 4 (ppid) follows the parenthesised command name, which may contain spaces.
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
    return children


class EmbeddedTriton:
    """tritonserver on loopback, serving every prepared model in the repository."""

    def __init__(
        self, settings: TritonSettings, otlp_traces_url: str | None = None, *, exit_timeout_s: int = 25
    ) -> None:
        self.settings = settings
        self.otlp_traces_url = otlp_traces_url
        self.exit_timeout_s = exit_timeout_s
        self.models: list[str] = []
        # The key Triton's ADMIN_PROTOCOLS want from this start on: in this process only, never logged.
        self.admin_key = ""
        # Where Triton's /dev/shm is (a private directory, or /dev/shm itself where the system
        # allows no mount namespace), and the name prefix of its Python backend's regions there.
        self.shm_dir: Path | None = None
        self.shm_private = False
        self.shm_prefix = ""
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._backend_root: Path | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=_LOG_LINES)

    @property
    def grpc_url(self) -> str:
        """host:port, as tritonclient.grpc takes it."""
        return f"{HOST}:{self.settings.grpc_port}"

    @property
    def http_url(self) -> str:
        """host:port, as tritonclient.http takes it."""
        return f"{HOST}:{self.settings.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.settings.metrics_port}/metrics"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(list(self._log)[-lines:])

    def last_error(self) -> str:
        """Triton's last error line, shortened; "" when it logged none."""
        return _last_error(self._log)

    async def wait(self) -> int:
        """Returns Triton's exit code (negative: the signal that killed it) once it exits."""
        if self._process is None:
            raise RuntimeError("Triton was never started")
        return await self._process.wait()

    def shm_regions(self) -> list[Path]:
        """The shared-memory regions this Triton's Python backend has in its /dev/shm now."""
        if self.shm_dir is None or not self.shm_prefix:
            return []
        return sorted(self.shm_dir.glob(f"{self.shm_prefix}*"))

    def command(self, backend_dir: Path, server: Path, repository: Path) -> list[str]:
        s = self.settings
        argv = [
            str(server),
            f"--model-repository={repository}",
            # Loads the repository once, at start, and refuses load/unload calls even with the key.
            "--model-control-mode=none",
            f"--model-config-name={s.model_config_name}",
            f"--backend-directory={backend_dir}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--http-address={HOST}",
            f"--http-port={s.http_port}",
            f"--grpc-address={HOST}",
            f"--grpc-port={s.grpc_port}",
            f"--metrics-address={HOST}",
            f"--metrics-port={s.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--log-verbose=0",
            *restricted_api_flags(self.admin_key),
        ]
        if self.otlp_traces_url:
            argv += [
                "--trace-config=mode=opentelemetry",
                # rate=0: trace exactly the requests that carry a W3C traceparent (the gateway's),
                # joined to the caller's trace; count=-1: never stop; TIMESTAMPS turns tracing on.
                "--trace-config=rate=0",
                "--trace-config=count=-1",
                "--trace-config=level=TIMESTAMPS",
                f"--trace-config=opentelemetry,url={self.otlp_traces_url}",
                f"--trace-config=opentelemetry,resource=service.name={TRACE_SERVICE_NAME}",
            ]
        return argv

    def _environment(self, install: TritonInstallation) -> dict[str, str]:
        env = dict(os.environ)
        # The stub embeds libpython and finds its prefix through `python3` on PATH: the venv's,
        # so the models import this environment's numpy and onnxruntime. PYTHONPATH makes that
        # hold even where the prefix lookup lands elsewhere.
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join(p for p in (venv_bin, env.get("PATH", "")) if p)
        site = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
        env["PYTHONPATH"] = os.pathsep.join(p for p in dict.fromkeys([*site, env.get("PYTHONPATH", "")]) if p)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(install.libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        # The gateway's own service name must not relabel Triton's spans.
        env.pop("OTEL_SERVICE_NAME", None)
        return env

    def _preflight(self) -> None:
        s = self.settings
        repo = s.model_repository
        hint = "run `make models` (or `bgremove prepare-models`)"
        if not repo.is_dir():
            raise TritonStartError(f"model repository {repo} does not exist; {hint}")
        try:
            models = served_models(repo, s.load_models)
        except ModelPreparationError as exc:
            raise TritonStartError(str(exc)) from None
        if not models:
            raise TritonStartError(
                f"model repository {repo} has no prepared model (no <model>/1/model.onnx); {hint}"
            )
        for m in models:
            config = repo / m / "configs" / f"{s.model_config_name}.pbtxt"
            if not config.is_file() and not (repo / m / "config.pbtxt").is_file():
                raise TritonStartError(f"model {m} has no config {config}")
        ports = {"gRPC": s.grpc_port, "HTTP": s.http_port, "metrics": s.metrics_port}
        if len(set(ports.values())) != len(ports):
            raise TritonStartError(f"Triton ports must differ, got {ports}")
        for label, port in ports.items():
            if port_in_use(port):
                raise TritonStartError(
                    f"Triton {label} port {HOST}:{port} is already in use; "
                    f"stop what listens there or choose another port"
                )
        self.models = models

    async def start(self) -> None:
        """Launches Triton and returns once the server and every loaded model are READY."""
        if self.running:
            raise TritonStartError(f"Triton is already running (pid {self.pid})")
        await self.stop()  # after an earlier run that exited by itself: reap it, drop its directory
        self._preflight()
        install = TritonInstallation.locate()
        self._backend_root = install.make_backend_dir()
        self._log.clear()
        self.admin_key = secrets.token_urlsafe(32)
        self.shm_prefix = f"bgremove-triton-{secrets.token_hex(6)}-"
        isolation = await asyncio.to_thread(self._make_shm_dir)
        argv = self.command(
            self._backend_root / "backends", install.server, self._served_repository(self._backend_root)
        )
        log.info("starting Triton: %s", " ".join(argv).replace(self.admin_key, "<admin key>"))
        launcher, preexec = parent_death_launch()
        try:
            self._process = await asyncio.create_subprocess_exec(
                # setpriv comes after unshare: entering a user namespace clears the death signal.
                *(isolation or []),
                *launcher,
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=self._environment(install),
                # Own process group: a Ctrl-C on the terminal reaches the gateway, which drains
                # first and then stops Triton, instead of both stopping at once.
                start_new_session=True,
                preexec_fn=preexec,
                # Whatever Triton creates is its user's alone (the Python backend's regions excepted:
                # it fchmods them to 0644, which the private /dev/shm makes harmless).
                umask=0o077,
                limit=1 << 20,
            )
        except OSError as exc:
            self._remove_private_dirs()
            raise TritonStartError(f"cannot execute {install.server}: {exc}") from None
        self._reader = asyncio.create_task(self._read_output(self._process))
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop(timeout_s=5)
            raise
        # Defence in depth inside the private directory; the only protection without one.
        for region in self.shm_regions():
            with contextlib.suppress(OSError):
                region.chmod(stat.S_IRUSR | stat.S_IWUSR)

    def _make_shm_dir(self) -> list[str] | None:
        """Triton's /dev/shm: a private directory, and the launcher prefix that mounts it there."""
        with contextlib.suppress(OSError):
            # Named with the regions' prefix: all a killed gateway leaves in /dev/shm shares it.
            private = Path(tempfile.mkdtemp(prefix=self.shm_prefix, dir=SHM))
            isolation = private_shm_launch(private)
            if isolation is not None:
                self.shm_dir, self.shm_private = private, True
                return isolation
            private.rmdir()
        self.shm_dir, self.shm_private = SHM, False
        log.warning(
            "this system gives Triton no private /dev/shm (no mount namespace allowed): other local "
            "users can open its Python backend's shared memory, which carries request tensors, "
            "until the gateway makes it 0600 once Triton is ready, and keep what they opened"
        )
        return None

    def _served_repository(self, root: Path) -> Path:
        """A private repository of links to the served models only: model-control-mode=none
        loads every model it finds, and the real one may hold models not prepared yet."""
        served = root / "models"
        served.mkdir()
        for model in self.models:
            (served / model).symlink_to(self.settings.model_repository.resolve() / model)
        return served

    async def _read_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            try:
                raw = await process.stdout.readline()
            except ValueError:  # a line over the limit: asyncio dropped it; keep reading
                self._log.append("[line too long, dropped]")
                continue
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            self._log.append(line)
            log.debug("%s", line)

    async def _wait_ready(self) -> None:
        assert self._process is not None
        process = self._process
        exited = asyncio.ensure_future(process.wait())
        deadline = time.monotonic() + self.settings.startup_timeout_s
        pending = ["server", *self.models]
        try:
            while time.monotonic() < deadline:
                if not exited.done():
                    pending = await not_ready(self.http_url, self.models)
                    if not pending:
                        return
                    # Sleeps between probes, but wakes at once if Triton exits.
                    await asyncio.wait({exited}, timeout=_POLL_S)
                if exited.done():
                    await self._drain_reader()
                    code = exited.result()
                    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                    reason = _last_error(self._log)
                    raise TritonStartError(
                        f"Triton {how} during startup{': ' + reason if reason else ''}\n"
                        f"its last log lines:\n{self.log_tail()}"
                    )
        finally:
            exited.cancel()
        raise TritonStartError(
            f"Triton was not ready within {self.settings.startup_timeout_s:g}s "
            f"(not ready: {', '.join(pending)}); its last log lines:\n{self.log_tail()}"
        )

    async def _drain_reader(self, timeout_s: float = 2.0) -> None:
        if self._reader is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout_s)
        except asyncio.TimeoutError:
            # The stubs inherit the pipe; if one lingers, stop reading rather than wait on it.
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._reader = None

    async def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM (Triton finishes in-flight requests for up to exit_timeout_s), then SIGKILL of
        Triton and its stubs after `timeout_s`. Safe to call more than once."""
        process = self._process
        # Nothing to do once a previous stop() has reaped Triton and drained its output.
        if process is not None and (process.returncode is None or self._reader is not None):
            stubs = _child_pids(process.pid)
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), timeout_s)
                except asyncio.TimeoutError:
                    log.warning("Triton did not exit %gs after SIGTERM; killing it", timeout_s)
            # The process group is Triton's own session (start_new_session), so this reaches
            # only Triton and the stubs it started.
            if process.returncode is None or any(process_alive(p) for p in stubs):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
            await self._drain_reader()
            log.info("Triton stopped (exit code %s)", process.returncode)
        self._remove_private_dirs()

    def _remove_private_dirs(self) -> None:
        """The backend directory and Triton's /dev/shm, with any region a killed Triton left."""
        if self._backend_root is not None:
            shutil.rmtree(self._backend_root, ignore_errors=True)
            self._backend_root = None
        if self.shm_private and self.shm_dir is not None:
            shutil.rmtree(self.shm_dir, ignore_errors=True)
        else:
            for region in self.shm_regions():
                with contextlib.suppress(OSError):
                    region.unlink()
        self.shm_dir = None


def _last_error(lines: Iterable[str], limit: int = 400) -> str:
    """Triton's last error line ("error: ..." on exit, "E<date> ..." in its log), shortened to one
    line so it can lead the exception message."""
    found = model_failure = ""
    for line in lines:
        if line.startswith("error:") or _ERROR_LINE.match(line):
            found = line
            if failed := _MODEL_FAILED.search(line):
                # Triton escapes the newlines of a Python traceback: its first line is the reason.
                reason = failed[3].split("\\n", 1)[0].rstrip('"')
                model_failure = f"load failed for model '{failed[1]}' (version {failed[2]}): {reason}"
    if model_failure and "failed to load all models" in found:
        found = model_failure
    found = _ERROR_LINE.sub("", found).strip().strip('"')
    return found if len(found) <= limit else found[: limit - 1] + "…"


def process_alive(pid: int) -> bool:
    """True while `pid` runs; an exited child waiting to be reaped (zombie) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
