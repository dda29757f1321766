"""`bgremove keys add|list|revoke`: manage the API keys file the gateway reads (--api-keys-file).

`add` prints the new key once, alone on stdout (KEY=$(bgremove keys add ...)); the file keeps only
its salted hash, so a lost key cannot be recovered, only revoked and replaced. A running gateway
picks up changes to the file within a few seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bgremove_gateway.access.keys import (
    DEFAULT_BURST,
    DEFAULT_MAX_STREAMS,
    DEFAULT_RATE,
    KeyFileError,
    KeyLimits,
    new_key,
    read_keys,
    revoked,
    write_keys,
)


def _rate(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 (unlimited) or more requests/s, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (unlimited) or more, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env_file = os.environ.get("BGREMOVE_API_KEYS_FILE") or None
    # On every subcommand, so `bgremove keys add NAME --file F` reads as one expects.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--file",
        "--api-keys-file",
        dest="file",
        type=Path,
        default=Path(env_file) if env_file else None,
        required=env_file is None,
        metavar="FILE",
        help="the keys file, as given to `bgremove serve --api-keys-file` [BGREMOVE_API_KEYS_FILE]",
    )
    sub = parser.add_subparsers(dest="keys_command", required=True)
    p = sub.add_parser("add", parents=[common], help="make a key, print it once, store its hash")
    p.add_argument("name", help="who or what the key is for (shown by list; not secret)")
    p.add_argument("--rate", type=_rate, default=DEFAULT_RATE, help="requests per second (0: unlimited)")
    p.add_argument("--burst", type=_count, default=DEFAULT_BURST, help="requests at once after a pause")
    p.add_argument(
        "--max-streams", type=_count, default=DEFAULT_MAX_STREAMS, help="calls in flight (0: unlimited)"
    )
    sub.add_parser("list", parents=[common], help="ids, names, limits and status; never keys or hashes")
    p = sub.add_parser("revoke", parents=[common], help="refuse a key from now on (kept, marked revoked)")
    p.add_argument("id", help="the key id (12 hex digits, as list shows it)")


def run(ns: argparse.Namespace) -> int:
    try:
        records = read_keys(ns.file)
        if ns.keys_command == "add":
            limits = KeyLimits(rate=ns.rate, burst=ns.burst, max_streams=ns.max_streams)
            record, key = new_key(ns.name, limits, frozenset(r.id for r in records))
            write_keys(ns.file, [*records, record])
            print(key)
            print(
                f"added key {record.id} ({record.name}): rate {limits.rate:g}/s, burst {limits.burst}, "
                f"max streams {limits.max_streams}. The key is shown only now: store it.",
                file=sys.stderr,
            )
        elif ns.keys_command == "list":
            print(f"{'ID':<12}  {'RATE/S':>6}  {'BURST':>5}  {'STREAMS':>7}  {'CREATED':<20}  STATUS  NAME")
            for r in records:
                status = f"revoked {r.revoked}" if r.revoked else "active"
                lim = r.limits
                print(
                    f"{r.id:<12}  {lim.rate:>6g}  {lim.burst:>5}  {lim.max_streams:>7}  {r.created:<20}  "
                    f"{status}  {r.name}"
                )
        else:
            match = [r for r in records if r.id == ns.id]
            if not match:
                print(f"bgremove keys revoke: no key {ns.id} in {ns.file}", file=sys.stderr)
                return 1
            write_keys(ns.file, [revoked(r) if r.id == ns.id else r for r in records])
            print(f"revoked key {ns.id} ({match[0].name})", file=sys.stderr)
    except (KeyFileError, OSError) as exc:
        print(f"bgremove keys: {exc}", file=sys.stderr)
        return 1
    return 0
