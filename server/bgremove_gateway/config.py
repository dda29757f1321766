"""The one typed configuration object, built from CLI flags with BGREMOVE_* environment fallbacks.

Precedence: flag > environment variable > default. OpenTelemetry is configured separately by the
standard OTEL_* variables, which the SDK reads itself.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

MiB = 1024 * 1024

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
    security: Security = field(default_factory=Security)
    # Admission: uploads plus decoded pixels held at once, and open RemoveBackground calls. 1.5 GiB
    # fits the largest default image (64 MP as a PNG cut-out) inside the chart's 2 GiB pod limit.
    memory_budget_bytes: int = 1536 * MiB
    max_concurrent_streams: int = 64
    connections: Connections = field(default_factory=Connections)


def _env(env: Mapping[str, str], name: str, default: str) -> str:
    return env.get(f"BGREMOVE_{name}", default)


def add_triton_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    env = os.environ if env is None else env
    t = TritonSettings()
    parser.add_argument(
        "--triton-url",
        dest="triton_urls",
        action="append",
        # argparse's append extends a default list in place, so flags would add to the env's list;
        # the env value is applied only when no flag is given.
        default=None,
        metavar="HOST:PORT",
        help="external Triton gRPC endpoint (repeatable); none starts an embedded one [BGREMOVE_TRITON_URL]",
    )
    parser.set_defaults(triton_urls_env=tuple(u for u in _env(env, "TRITON_URL", "").split(",") if u))
    parser.add_argument(
        "--triton-grpc-port", type=int, default=int(_env(env, "TRITON_GRPC_PORT", str(t.grpc_port)))
    )
    parser.add_argument(
        "--triton-http-port", type=int, default=int(_env(env, "TRITON_HTTP_PORT", str(t.http_port)))
    )
    parser.add_argument(
        "--triton-metrics-port", type=int, default=int(_env(env, "TRITON_METRICS_PORT", str(t.metrics_port)))
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=Path(_env(env, "MODEL_REPOSITORY", str(t.model_repository))),
    )
    parser.add_argument(
        "--model-config-name",
        default=_env(env, "MODEL_CONFIG_NAME", t.model_config_name),
        help="config under <model>/configs/ that Triton loads: cpu or gpu [BGREMOVE_MODEL_CONFIG_NAME]",
    )
    parser.add_argument(
        "--triton-startup-timeout",
        type=float,
        default=float(_env(env, "TRITON_STARTUP_TIMEOUT", str(t.startup_timeout_s))),
    )
    parser.add_argument(
        "--infer-timeout",
        type=float,
        default=float(_env(env, "INFER_TIMEOUT", str(t.infer_timeout_s))),
    )
    parser.add_argument(
        "--triton-admin-key-file",
        type=Path,
        default=_env(env, "TRITON_ADMIN_KEY_FILE", "") or None,
        metavar="FILE",
        help="file with the key an external Triton's restricted APIs want (its "
        "--grpc-restricted-protocol value); sent on every call [BGREMOVE_TRITON_ADMIN_KEY_FILE]",
    )


def add_serve_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    env = os.environ if env is None else env
    s, lim = Settings(), Limits()
    parser.add_argument(
        "--listen", default=_env(env, "LISTEN", s.listen), help="gRPC address [BGREMOVE_LISTEN]"
    )
    parser.add_argument("--default-model", default=_env(env, "DEFAULT_MODEL", s.default_model))
    parser.add_argument(
        "--max-upload-bytes", type=int, default=int(_env(env, "MAX_UPLOAD_BYTES", str(lim.max_upload_bytes)))
    )
    parser.add_argument(
        "--max-chunk-bytes", type=int, default=int(_env(env, "MAX_CHUNK_BYTES", str(lim.max_chunk_bytes)))
    )
    parser.add_argument("--max-pixels", type=int, default=int(_env(env, "MAX_PIXELS", str(lim.max_pixels))))
    parser.add_argument(
        "--max-unary-bytes", type=int, default=int(_env(env, "MAX_UNARY_BYTES", str(lim.max_unary_bytes)))
    )
    parser.add_argument(
        "--idle-timeout", type=float, default=float(_env(env, "IDLE_TIMEOUT", str(lim.idle_timeout_s)))
    )
    parser.add_argument(
        "--upload-timeout",
        type=float,
        default=float(_env(env, "UPLOAD_TIMEOUT", str(lim.upload_timeout_s))),
        help="seconds a whole streamed upload may take, header to half-close [BGREMOVE_UPLOAD_TIMEOUT]",
    )
    for flag, name, value, what in (
        ("--max-jpeg-scans", "MAX_JPEG_SCANS", lim.max_jpeg_scans, "scans a progressive JPEG may carry"),
        (
            "--max-jpeg-scan-pixels",
            "MAX_JPEG_SCAN_PIXELS",
            lim.max_jpeg_scan_pixels,
            "JPEG scans x frame pixels (the decode work)",
        ),
        (
            "--max-image-segments",
            "MAX_IMAGE_SEGMENTS",
            lim.max_image_segments,
            "JPEG markers or PNG/WebP chunks",
        ),
        ("--max-metadata-bytes", "MAX_METADATA_BYTES", lim.max_metadata_bytes, "metadata an image may carry"),
    ):
        parser.add_argument(
            flag,
            type=int,
            metavar="N",
            default=int(_env(env, name, str(value))),
            help=f"most {what} [BGREMOVE_{name}]",
        )
    parser.add_argument(
        "--result-chunk-bytes",
        type=int,
        default=int(_env(env, "RESULT_CHUNK_BYTES", str(lim.result_chunk_bytes))),
        help="largest result chunk StreamRemoveBackground sends [BGREMOVE_RESULT_CHUNK_BYTES]",
    )
    parser.add_argument(
        "--max-output-side", type=int, default=int(_env(env, "MAX_OUTPUT_SIDE", str(lim.max_output_side)))
    )
    parser.add_argument("--cpu-workers", type=int, default=int(_env(env, "CPU_WORKERS", str(s.cpu_workers))))
    parser.add_argument(
        "--drain-seconds", type=float, default=float(_env(env, "DRAIN_SECONDS", str(s.drain_seconds)))
    )
    parser.add_argument("--log-level", default=_env(env, "LOG_LEVEL", s.log_level))
    add_security_arguments(parser, env)
    parser.add_argument(
        "--memory-budget-bytes",
        type=int,
        default=int(_env(env, "MEMORY_BUDGET_BYTES", str(s.memory_budget_bytes))),
        help="uploads plus decoded images held at once; above it new calls get RESOURCE_EXHAUSTED "
        "[BGREMOVE_MEMORY_BUDGET_BYTES]",
    )
    parser.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=int(_env(env, "MAX_CONCURRENT_STREAMS", str(s.max_concurrent_streams))),
        help="open RemoveBackground/StreamRemoveBackground calls at once [BGREMOVE_MAX_CONCURRENT_STREAMS]",
    )
    add_connection_arguments(parser, env)
    parser.add_argument(
        "--triton-resolve-interval",
        type=float,
        default=float(_env(env, "TRITON_RESOLVE_INTERVAL", str(TritonSettings().resolve_interval_s))),
        help="seconds between DNS lookups of a --triton-url name [BGREMOVE_TRITON_RESOLVE_INTERVAL]",
    )
    add_triton_arguments(parser, env)


# flag, env name, field of Connections, help
_CONNECTION_FLAGS = (
    (
        "--max-streams-per-connection",
        "MAX_STREAMS_PER_CONNECTION",
        "max_streams_per_connection",
        "concurrent calls on one client connection",
    ),
    (
        "--max-connection-idle",
        "MAX_CONNECTION_IDLE",
        "max_idle_s",
        "seconds before an idle connection is closed",
    ),
    ("--max-connection-age", "MAX_CONNECTION_AGE", "max_age_s", "seconds before a connection is recycled"),
    (
        "--max-connection-age-grace",
        "MAX_CONNECTION_AGE_GRACE",
        "max_age_grace_s",
        "seconds the calls of a recycled connection get to finish",
    ),
    ("--keepalive", "KEEPALIVE", "keepalive_s", "seconds between the server's pings on a quiet connection"),
    (
        "--keepalive-timeout",
        "KEEPALIVE_TIMEOUT",
        "keepalive_timeout_s",
        "seconds to wait for a ping's answer before dropping the connection",
    ),
)


def add_connection_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    group = parser.add_argument_group("connections")
    defaults = Connections()
    for flag, name, attr, what in _CONNECTION_FLAGS:
        default = getattr(defaults, attr)
        group.add_argument(
            flag,
            dest=f"conn_{attr}",
            type=type(default),
            metavar="N" if isinstance(default, int) else "SECONDS",
            default=type(default)(_env(env, name, str(default))),
            help=f"{what} [BGREMOVE_{name}]",
        )


def connections_from_args(ns: argparse.Namespace) -> Connections:
    return Connections(**{attr: getattr(ns, f"conn_{attr}") for _, _, attr, _ in _CONNECTION_FLAGS})


def _optional_path(value: str) -> Path | None:
    return Path(value) if value else None


def add_security_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    group = parser.add_argument_group("access control (see README: Auth and TLS)")
    for flag, name, what in (
        ("--tls-cert", "TLS_CERT", "PEM server certificate chain"),
        ("--tls-key", "TLS_KEY", "PEM private key of --tls-cert"),
        ("--tls-client-ca", "TLS_CLIENT_CA", "PEM CA: require client certificates it signed (mutual TLS)"),
        ("--api-keys-file", "API_KEYS_FILE", "JSON file of hashed API keys from `bgremove keys`"),
    ):
        group.add_argument(
            flag,
            type=_optional_path,
            default=_optional_path(_env(env, name, "")),
            metavar="FILE",
            help=f"{what} [BGREMOVE_{name}]",
        )
    group.add_argument(
        "--insecure",
        action="store_true",
        default=_env(env, "INSECURE", "").lower() in {"1", "true", "yes"},
        help="allow plaintext, and calls without a key, on a non-loopback address [BGREMOVE_INSECURE]",
    )
    group.add_argument(
        "--health-listen",
        default=_env(env, "HEALTH_LISTEN", "") or None,
        metavar="HOST:PORT",
        help="extra plaintext listener serving only grpc.health.v1 (for probes) [BGREMOVE_HEALTH_LISTEN]",
    )


def triton_settings_from_args(ns: argparse.Namespace) -> TritonSettings:
    return TritonSettings(
        urls=tuple(ns.triton_urls) if ns.triton_urls else ns.triton_urls_env,
        grpc_port=ns.triton_grpc_port,
        http_port=ns.triton_http_port,
        metrics_port=ns.triton_metrics_port,
        model_repository=ns.model_repository.resolve(),
        model_config_name=ns.model_config_name,
        startup_timeout_s=ns.triton_startup_timeout,
        infer_timeout_s=ns.infer_timeout,
        admin_key_file=ns.triton_admin_key_file,
    )


def settings_from_args(ns: argparse.Namespace) -> Settings:
    limits = Limits(
        max_upload_bytes=ns.max_upload_bytes,
        max_chunk_bytes=ns.max_chunk_bytes,
        max_pixels=ns.max_pixels,
        max_unary_bytes=ns.max_unary_bytes,
        idle_timeout_s=ns.idle_timeout,
        upload_timeout_s=ns.upload_timeout,
        max_jpeg_scans=ns.max_jpeg_scans,
        max_jpeg_scan_pixels=ns.max_jpeg_scan_pixels,
        max_image_segments=ns.max_image_segments,
        max_metadata_bytes=ns.max_metadata_bytes,
        result_chunk_bytes=ns.result_chunk_bytes,
        max_output_side=ns.max_output_side,
    )
    return Settings(
        listen=ns.listen,
        default_model=ns.default_model,
        limits=limits,
        triton=replace(triton_settings_from_args(ns), resolve_interval_s=ns.triton_resolve_interval),
        cpu_workers=ns.cpu_workers,
        drain_seconds=ns.drain_seconds,
        log_level=ns.log_level.upper(),
        security=Security(
            tls_cert=ns.tls_cert,
            tls_key=ns.tls_key,
            tls_client_ca=ns.tls_client_ca,
            insecure=ns.insecure,
            api_keys_file=ns.api_keys_file,
            health_listen=ns.health_listen,
        ),
        memory_budget_bytes=ns.memory_budget_bytes,
        max_concurrent_streams=ns.max_concurrent_streams,
        connections=connections_from_args(ns),
    )
