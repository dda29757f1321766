"""The one typed configuration object, built from CLI flags with BGREMOVE_* environment fallbacks.

Each flag is one row of FLAGS, which binds it to the settings field it fills: the field's type and
default are the flag's, and its environment variable is BGREMOVE_ and the flag's name in capitals
(--max-pixels: BGREMOVE_MAX_PIXELS). add_arguments() puts rows on a parser, and the *_from_args
functions read them back into Settings. Precedence: flag > environment variable > default.
OpenTelemetry is configured separately by the standard OTEL_* variables, which the SDK reads itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

MiB = 1024 * 1024
# A message's fields around its bytes (header, options), on top of the bytes themselves.
MESSAGE_OVERHEAD = 64 * 1024

# The repository checkout's model_repository/, found relative to this file so `bgremove serve`
# works from any working directory in a development install.
DEFAULT_MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


@dataclass(frozen=True)
class Limits:
    """Every limit the gateway enforces; all reported by GetServiceInfo."""

    max_upload_bytes: int = 50 * MiB
    max_chunk_bytes: int = 1 * MiB
    max_pixels: int = 64_000_000
    max_unary_bytes: int = 3 * MiB
    idle_timeout_s: float = 30.0
    # Header to half-close: a stream that trickles bytes cannot hold its slot longer than this.
    upload_timeout_s: float = 120.0
    result_chunk_bytes: int = 256 * 1024
    max_output_side: int = 16384
    # Image structure, checked before any parser runs (costs.py): real photos use a small fraction.
    # Progressive JPEGs have about 10 scans; each scan costs libjpeg a pass over every block.
    max_jpeg_scans: int = 100
    # Scans x frame pixels, ~0.8 ms of CPU per megapixel-scan: 20 scans at 64 MP (CMYK has 18).
    max_jpeg_scan_pixels: int = 1_280_000_000
    # Markers or chunks (and stray JPEG header bytes): photos ~20, a 10000-frame animated WebP 10002.
    max_image_segments: int = 10_000
    # Metadata as the parsers hold it, inflated and copied (EXIF, XMP, ICC, text): photos < 1 MiB.
    max_metadata_bytes: int = 16 * MiB
    # Options.bg_image: a background photo; counted in the call's upload (and unary) limit too.
    # It also sizes gRPC's largest message (a stream header carries it), read before any key check.
    max_bg_image_bytes: int = 4 * MiB

    @property
    def largest_request_bytes(self) -> int:
        """gRPC's receive limit: a stream's header carries bg_image, a unary request image + bg_image."""
        return max(self.max_unary_bytes, self.max_chunk_bytes, self.max_bg_image_bytes) + MESSAGE_OVERHEAD

    @property
    def largest_answer_bytes(self) -> int:
        """gRPC's send limit: a streamed result's chunk, or a whole RemoveBackground answer."""
        return max(self.largest_request_bytes, self.result_chunk_bytes + MESSAGE_OVERHEAD)


@dataclass(frozen=True)
class Connections:
    """Per-connection limits of the gRPC listener, so one client cannot hold the server's sockets."""

    # HTTP/2 streams at once on one connection: above the stream cap, so one channel can use it all;
    # grpc clients past it get UNAVAILABLE (REFUSED_STREAM), they do not queue.
    max_streams_per_connection: int = 100
    # A connection with no call this long is closed (GOAWAY); clients reconnect transparently.
    max_idle_s: float = 300.0
    # Every connection is recycled after this long, so load spreads again after a scale-up.
    max_age_s: float = 1800.0
    # Calls on a recycled connection get this long to finish.
    max_age_grace_s: float = 300.0
    # The server pings a quiet connection this often and drops it when no answer comes in time.
    keepalive_s: float = 60.0
    keepalive_timeout_s: float = 20.0


@dataclass(frozen=True)
class TritonSettings:
    """Where inference runs. No urls means: start an embedded Triton on loopback."""

    urls: tuple[str, ...] = ()
    grpc_port: int = 8201
    http_port: int = 8200
    metrics_port: int = 8202
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    model_config_name: str = "cpu"
    # Benchmark-only models (their card says so, e.g. instant) the embedded Triton loads as well.
    load_models: tuple[str, ...] = ()
    startup_timeout_s: float = 180.0
    infer_timeout_s: float = 60.0
    # How often a --triton-url that is a DNS name (a headless Service) is resolved again.
    resolve_interval_s: float = 10.0
    # A file holding the key of the external Tritons' restricted APIs (--grpc-restricted-protocol);
    # a file, so the key is on no command line and in no environment. The embedded Triton makes its own.
    admin_key_file: Path | None = None

    @property
    def embedded(self) -> bool:
        return not self.urls

    def read_admin_key(self) -> str | None:
        """The key in admin_key_file (surrounding whitespace dropped); None without a file.
        ValueError names the file when it cannot be read or is empty, never the key."""
        if self.admin_key_file is None:
            return None
        try:
            key = self.admin_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the Triton admin key file {self.admin_key_file}: {exc}") from None
        if not key:
            raise ValueError(f"the Triton admin key file {self.admin_key_file} is empty")
        return key


@dataclass(frozen=True)
class Security:
    """Who may connect and how; the rules are in tls.py."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    insecure: bool = False
    api_keys_file: Path | None = None
    health_listen: str | None = None
    # Per-key limits held in Redis for every replica (shared_limits.py); None: each replica alone.
    # Out of repr: the URL may carry Redis's password.
    limits_redis_url: str | None = field(default=None, repr=False)
    # How long one check may wait for Redis before this replica decides alone, on its share.
    limits_redis_timeout_s: float = 0.05
    # The gateway replicas sharing the keys: each one's share when Redis does not answer.
    limits_replicas: int = 1


def _usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container's cpuset narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


LogFormat = Literal["text", "json"]
DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"
DEFAULT_HTTP_LISTEN = "127.0.0.1:8080"


@dataclass(frozen=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    default_model: str = "u2netp"
    limits: Limits = field(default_factory=Limits)
    triton: TritonSettings = field(default_factory=TritonSettings)
    # Threads for decode/resize/encode; these release the GIL, so more than the core count wastes memory.
    cpu_workers: int = max(2, os.cpu_count() or 2)
    drain_seconds: float = 25.0
    log_level: str = "INFO"
    log_format: LogFormat = "text"
    # Prometheus /metrics, a plain HTTP listener apart from the API; None serves no metrics.
    metrics_listen: str | None = DEFAULT_METRICS_LISTEN
    security: Security = field(default_factory=Security)
    # Admission: uploads plus decoded pixels held at once, and open RemoveBackground calls. 1.5 GiB
    # fits the largest default image (64 MP as a PNG cut-out) inside the chart's 2 GiB pod limit.
    memory_budget_bytes: int = 1536 * MiB
    max_concurrent_streams: int = 64
    connections: Connections = field(default_factory=Connections)
    # Gateway processes sharing the listeners (SO_REUSEPORT) and one embedded Triton; 1: no supervisor.
    workers: int = _usable_cores()
    # Which of those this process is (service/workers.py sets it); None: the pod's only process.
    worker: int | None = None
    # The remove.bg-compatible HTTP API (http/); None serves none.
    http_listen: str | None = DEFAULT_HTTP_LISTEN
    # image_url / bg_image_url fetched by the gateway (public addresses only); refused when off.
    http_allow_urls: bool = False
    # GET / serves the browser page in http/ui/.
    http_ui: bool = False


T = TypeVar("T")

# --help sections; a flag without one is listed under "options".
LIMITS = "request limits (reported by GetServiceInfo)"
ACCESS = "access control (see docs/security.md)"
CONNECTIONS = "connections"
BACKEND = "Triton backend"
EMBEDDED = "embedded Triton (when no --triton-url is given)"
HTTP = "remove.bg-compatible HTTP API (see docs/http-api.md)"


def _optional_path(value: str) -> Path | None:
    return Path(value) if value else None


def _optional_str(value: str) -> str | None:
    return value or None


def _log_format(value: str) -> LogFormat:
    if value not in get_args(LogFormat):
        raise argparse.ArgumentTypeError(f"log format {value!r} is not text or json")
    return value  # type: ignore[return-value]


# How a value is read from a flag or an environment variable, by the field's type.
_PARSERS: dict[Any, Callable[[str], Any]] = {
    int: int,
    float: float,
    str: str,
    Path: Path,
    Path | None: _optional_path,
    str | None: _optional_str,
    LogFormat: _log_format,
}
_METAVARS: dict[Any, str] = {int: "N", float: "SECONDS", Path: "DIR", Path | None: "FILE"}
_TRUE = frozenset({"1", "true", "yes"})
_LIST = tuple[str, ...]  # a repeatable flag; its environment variable is comma-separated


@dataclass(frozen=True)
class Flag:
    """One flag: the settings field it fills, its help, and where --help lists it."""

    name: str  # "--max-pixels"
    owner: type[Any]  # the dataclass holding the value: Settings, Limits, TritonSettings, ...
    field: str  # the field there, whose type and default the flag takes
    help: str
    group: str | None = None
    metavar: str | None = None  # default: by type (N, SECONDS, DIR, FILE)
    dest: str = ""  # the namespace attribute; default: the name's, as argparse makes it

    def __post_init__(self) -> None:
        if not self.dest:
            object.__setattr__(self, "dest", self.name.removeprefix("--").replace("-", "_"))

    @property
    def env(self) -> str:
        return "BGREMOVE_" + self.name.removeprefix("--").replace("-", "_").upper()

    @property
    def kind(self) -> Any:
        return typing.get_type_hints(self.owner)[self.field]

    @property
    def default(self) -> Any:
        return next(f.default for f in dataclasses.fields(self.owner) if f.name == self.field)

    def add_to(self, parser: argparse._ActionsContainer, env: Mapping[str, str]) -> None:
        raw, kind, text = env.get(self.env), self.kind, f"{self.help} [{self.env}]"
        if kind is bool:
            default = (raw or "").lower() in _TRUE
            parser.add_argument(self.name, dest=self.dest, action="store_true", default=default, help=text)
        elif kind == _LIST:
            # argparse's append extends a default list in place, so flags would add to the env's
            # list: the env's value is kept apart and applied only when no flag is given.
            parser.add_argument(
                self.name, dest=self.dest, action="append", default=None, metavar=self.metavar, help=text
            )
            parser.set_defaults(**{f"{self.dest}_env": tuple(v for v in (raw or "").split(",") if v)})
        else:
            parse = _PARSERS[kind]
            parser.add_argument(
                self.name,
                dest=self.dest,
                type=parse,
                default=self.default if raw is None else parse(raw),
                metavar=self.metavar or _METAVARS.get(kind),
                help=text,
            )

    def value(self, ns: argparse.Namespace) -> Any:
        given = getattr(ns, self.dest)
        if self.kind == _LIST:
            return tuple(given) if given else getattr(ns, f"{self.dest}_env")
        return given


FLAGS: tuple[Flag, ...] = (
    Flag("--listen", Settings, "listen", "gRPC address", metavar="HOST:PORT"),
    Flag("--default-model", Settings, "default_model", "model for requests that name none", metavar="NAME"),
    Flag(
        "--cpu-workers",
        Settings,
        "cpu_workers",
        "threads for decode, resize and encode, and encode processes",
    ),
    Flag("--drain-seconds", Settings, "drain_seconds", "seconds calls in flight get to finish on SIGTERM"),
    Flag("--log-level", Settings, "log_level", "DEBUG, INFO, WARNING or ERROR", metavar="LEVEL"),
    Flag(
        "--log-format",
        Settings,
        "log_format",
        "text, or json: one JSON object a line, with trace_id and span_id",
        metavar="FORMAT",
    ),
    Flag(
        "--metrics-listen",
        Settings,
        "metrics_listen",
        "plain HTTP listener for Prometheus /metrics, no key needed; empty: none",
        metavar="HOST:PORT",
    ),
    Flag(
        "--memory-budget-bytes",
        Settings,
        "memory_budget_bytes",
        "uploads plus decoded images held at once; above it new calls get RESOURCE_EXHAUSTED",
    ),
    Flag(
        "--max-concurrent-streams",
        Settings,
        "max_concurrent_streams",
        "open RemoveBackground/StreamRemoveBackground calls at once",
    ),
    Flag(
        "--workers",
        Settings,
        "workers",
        "gateway processes sharing the port, one embedded Triton, the memory budget and the stream "
        "cap; CPU workers are split among them (default: the usable cores)",
    ),
    Flag(
        "--http-listen",
        Settings,
        "http_listen",
        "address of the remove.bg-compatible HTTP API (POST /v1.0/removebg); empty: none",
        HTTP,
        metavar="HOST:PORT",
    ),
    Flag(
        "--http-allow-urls",
        Settings,
        "http_allow_urls",
        "fetch image_url and bg_image_url (public addresses only); off: refused with 400",
        HTTP,
    ),
    Flag("--http-ui", Settings, "http_ui", "serve the browser page at GET / of the HTTP API", HTTP),
    Flag("--max-upload-bytes", Limits, "max_upload_bytes", "largest streamed upload", LIMITS),
    Flag("--max-chunk-bytes", Limits, "max_chunk_bytes", "largest chunk of a streamed upload", LIMITS),
    Flag("--max-pixels", Limits, "max_pixels", "most pixels (width x height) an image may have", LIMITS),
    Flag("--max-unary-bytes", Limits, "max_unary_bytes", "largest image RemoveBackground takes", LIMITS),
    Flag("--idle-timeout", Limits, "idle_timeout_s", "seconds a streamed upload may send nothing", LIMITS),
    Flag(
        "--upload-timeout",
        Limits,
        "upload_timeout_s",
        "seconds a whole streamed upload may take, header to half-close",
        LIMITS,
    ),
    Flag("--max-jpeg-scans", Limits, "max_jpeg_scans", "most scans a progressive JPEG may carry", LIMITS),
    Flag(
        "--max-jpeg-scan-pixels",
        Limits,
        "max_jpeg_scan_pixels",
        "most JPEG scans x frame pixels (the decode work)",
        LIMITS,
    ),
    Flag(
        "--max-image-segments", Limits, "max_image_segments", "most JPEG markers or PNG/WebP chunks", LIMITS
    ),
    Flag("--max-metadata-bytes", Limits, "max_metadata_bytes", "most metadata an image may carry", LIMITS),
    Flag(
        "--result-chunk-bytes",
        Limits,
        "result_chunk_bytes",
        "largest result chunk StreamRemoveBackground sends",
        LIMITS,
    ),
    Flag("--max-output-side", Limits, "max_output_side", "largest options.max_output_side accepted", LIMITS),
    Flag("--max-bg-image-bytes", Limits, "max_bg_image_bytes", "largest options.bg_image, in bytes", LIMITS),
    Flag("--tls-cert", Security, "tls_cert", "PEM server certificate chain", ACCESS),
    Flag("--tls-key", Security, "tls_key", "PEM private key of --tls-cert", ACCESS),
    Flag(
        "--tls-client-ca",
        Security,
        "tls_client_ca",
        "PEM CA: require client certificates it signed (mutual TLS)",
        ACCESS,
    ),
    Flag(
        "--api-keys-file",
        Security,
        "api_keys_file",
        "JSON file of hashed API keys from `bgremove keys`",
        ACCESS,
    ),
    Flag(
        "--insecure",
        Security,
        "insecure",
        "allow plaintext, and calls without a key, on a non-loopback address",
        ACCESS,
    ),
    Flag(
        "--health-listen",
        Security,
        "health_listen",
        "extra plaintext listener serving only grpc.health.v1 (for probes)",
        ACCESS,
        metavar="HOST:PORT",
    ),
    Flag(
        "--limits-redis-url",
        Security,
        "limits_redis_url",
        "redis:// or rediss:// URL of a Redis holding per-key limits for all replicas; empty: each alone",
        ACCESS,
        metavar="URL",
    ),
    Flag(
        "--limits-redis-timeout",
        Security,
        "limits_redis_timeout_s",
        "seconds one limits check waits for Redis before this replica decides alone",
        ACCESS,
    ),
    Flag(
        "--limits-replicas",
        Security,
        "limits_replicas",
        "gateway replicas sharing the keys: without Redis each admits 1/N of a key's limits",
        ACCESS,
    ),
    Flag(
        "--max-streams-per-connection",
        Connections,
        "max_streams_per_connection",
        "concurrent calls on one client connection",
        CONNECTIONS,
    ),
    Flag(
        "--max-connection-idle",
        Connections,
        "max_idle_s",
        "seconds before an idle connection is closed",
        CONNECTIONS,
    ),
    Flag(
        "--max-connection-age",
        Connections,
        "max_age_s",
        "seconds before a connection is recycled",
        CONNECTIONS,
    ),
    Flag(
        "--max-connection-age-grace",
        Connections,
        "max_age_grace_s",
        "seconds the calls of a recycled connection get to finish",
        CONNECTIONS,
    ),
    Flag(
        "--keepalive",
        Connections,
        "keepalive_s",
        "seconds between the server's pings on a quiet connection",
        CONNECTIONS,
    ),
    Flag(
        "--keepalive-timeout",
        Connections,
        "keepalive_timeout_s",
        "seconds to wait for a ping's answer before dropping the connection",
        CONNECTIONS,
    ),
    Flag(
        "--triton-url",
        TritonSettings,
        "urls",
        "external Triton gRPC endpoint (repeatable); none starts an embedded one",
        BACKEND,
        metavar="HOST:PORT",
        dest="triton_urls",
    ),
    Flag(
        "--infer-timeout", TritonSettings, "infer_timeout_s", "seconds one inference call may take", BACKEND
    ),
    Flag(
        "--triton-resolve-interval",
        TritonSettings,
        "resolve_interval_s",
        "seconds between DNS lookups of a --triton-url name",
        BACKEND,
    ),
    Flag(
        "--triton-admin-key-file",
        TritonSettings,
        "admin_key_file",
        "file with the key an external Triton's restricted APIs want (its "
        "--grpc-restricted-protocol value); sent on every call",
        BACKEND,
    ),
    Flag("--triton-grpc-port", TritonSettings, "grpc_port", "Triton's gRPC port on 127.0.0.1", EMBEDDED),
    Flag("--triton-http-port", TritonSettings, "http_port", "Triton's HTTP port on 127.0.0.1", EMBEDDED),
    Flag(
        "--triton-metrics-port",
        TritonSettings,
        "metrics_port",
        "Triton's metrics port on 127.0.0.1",
        EMBEDDED,
    ),
    Flag("--model-repository", TritonSettings, "model_repository", "the models Triton serves", EMBEDDED),
    Flag(
        "--model-config-name",
        TritonSettings,
        "model_config_name",
        "config under <model>/configs/ that Triton loads: cpu or gpu",
        EMBEDDED,
        metavar="NAME",
    ),
    Flag(
        "--load-model",
        TritonSettings,
        "load_models",
        "also serve this benchmark-only model (e.g. instant, the gateway-ceiling stand-in); repeatable",
        EMBEDDED,
        metavar="NAME",
    ),
    Flag(
        "--triton-startup-timeout",
        TritonSettings,
        "startup_timeout_s",
        "seconds Triton may take to start and load the models",
        EMBEDDED,
    ),
)


def add_arguments(
    parser: argparse.ArgumentParser, flags: Iterable[Flag], env: Mapping[str, str] | None = None
) -> None:
    """Adds `flags` to `parser`, each in its --help section, with defaults from `env` (os.environ)."""
    env = os.environ if env is None else env
    sections: dict[str, argparse._ArgumentGroup] = {}
    for flag in flags:
        where: argparse._ActionsContainer = parser
        if flag.group is not None:
            if flag.group not in sections:
                sections[flag.group] = parser.add_argument_group(flag.group)
            where = sections[flag.group]
        flag.add_to(where, env)


def add_serve_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    """Every flag: `bgremove serve`."""
    add_arguments(parser, FLAGS, env)


def add_triton_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    """The flags of the gateway's Triton backend, external or embedded."""
    add_arguments(parser, [f for f in FLAGS if f.group in (BACKEND, EMBEDDED)], env)


def add_embedded_triton_arguments(
    parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None
) -> None:
    """The flags a standalone embedded Triton uses: `bgremove triton`."""
    add_arguments(parser, [f for f in FLAGS if f.group == EMBEDDED], env)


def _from_args(owner: Callable[..., T], ns: argparse.Namespace, **nested: Any) -> T:
    """`owner` with the fields whose flags `ns` has; the others keep their defaults."""
    given = {f.field: f.value(ns) for f in FLAGS if f.owner is owner and hasattr(ns, f.dest)}
    return owner(**given, **nested)


def triton_settings_from_args(ns: argparse.Namespace) -> TritonSettings:
    triton = _from_args(TritonSettings, ns)
    return replace(triton, model_repository=triton.model_repository.resolve())


def settings_from_args(ns: argparse.Namespace) -> Settings:
    settings = _from_args(
        Settings,
        ns,
        limits=_from_args(Limits, ns),
        triton=triton_settings_from_args(ns),
        security=_from_args(Security, ns),
        connections=_from_args(Connections, ns),
    )
    return replace(settings, log_level=settings.log_level.upper())
