"""`bgremove`: the one command of both distributions.

The client distribution (bgremove-client) owns the console script and runs `bgremove remove` itself.
Every other subcommand (serve, triton, prepare-models, keys, bench) belongs to the server
distribution (bgremove, package bgremove_gateway) and is handed to its CLI when that is installed;
without it, those subcommands say so in one line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

# The server's subcommands, named here so a client-only install can say what is missing.
SERVER_COMMANDS = ("serve", "triton", "prepare-models", "keys", "bench")
_SERVER_PACKAGE = "bgremove_gateway"

ServerMain = Callable[[Sequence[str]], int]


def server_main() -> ServerMain | None:
    """The server CLI's main(), or None when the server distribution is not installed.

    A server that is installed but fails to import (a missing dependency) raises: that is a broken
    install to show, not a client-only one."""
    try:
        module = importlib.import_module(f"{_SERVER_PACKAGE}.cli")
    except ModuleNotFoundError as error:
        if error.name in (_SERVER_PACKAGE, f"{_SERVER_PACKAGE}.cli"):
            return None
        raise
    main: ServerMain = module.main
    return main


def build_parser() -> argparse.ArgumentParser:
    """The client-only `bgremove`: just `remove` (the server's CLI has its own, with every command)."""
    from bgremove.channel import __version__
    from bgremove.cli_remove import add_arguments as add_remove_arguments

    parser = argparse.ArgumentParser(
        prog="bgremove",
        description="Background removal through a running bgremove service.",
        epilog=f"{', '.join(SERVER_COMMANDS)} come with the bgremove server package, not installed here.",
    )
    parser.add_argument("--version", action="version", version=f"bgremove-client {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("remove", help="remove the background from images through a running service")
    add_remove_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # `remove` never needs the server's modules, so it does not pay for importing them.
    if args[:1] != ["remove"]:
        server = server_main()
        if server is not None:
            return server(args)
        if args[:1] and args[0] in SERVER_COMMANDS:
            print(
                f"bgremove {args[0]}: needs the bgremove server package, which is not installed here "
                "(bgremove-client has only `bgremove remove`)",
                file=sys.stderr,
            )
            return 2
    # gRPC reads this once, when imported (just below): without it a failed TLS handshake adds
    # gRPC's own INFO line to the one line `remove` prints. An explicit setting is kept.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from bgremove.cli_remove import run

    ns = build_parser().parse_args(args)
    return run(ns)


if __name__ == "__main__":
    sys.exit(main())
