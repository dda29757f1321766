"""`bgremove remove INPUT... -o OUT`: remove backgrounds through a running service.

Inputs are files and folders; a folder contributes the .jpg/.jpeg/.png/.webp files directly inside
it (not its subfolders; hidden files are skipped). With one input file, -o is the output file
(unless it is an existing directory); otherwise -o is a directory, created when missing, and each
result is named <stem>.<ext>. When two inputs share a stem (a.jpg and a.png, or two folders holding
a.jpg), the first in input order gets <stem>.<ext> and later ones <stem>-2.<ext>, <stem>-3.<ext>, ...;
a name that is one of the inputs is never used, so writing into the input folder cannot overwrite a
photo. Existing outputs are replaced, so a re-run is idempotent.

The format is --format; else, for a single output file, the one its extension names (.png, .webp,
.jpg/.jpeg, .zip; a mask needs --format mask); else jpeg with --bg-color; else png. A single output
file whose extension is unknown or disagrees with the format is a usage error, found before any
image is sent.

Exit status: 0 when every image succeeded, 1 when any failed (one line per failure on stderr:
`<path>: <STATUS>: <message>`) or the server cannot be reached (one line), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO, TypeVar

import grpc
from tqdm import tqdm

from bgremove.channel import DEFAULT_TARGET, InsecureKeyWarning, plaintext_key_warning
from bgremove.client import DEFAULT_TIMEOUT, AsyncClient
from bgremove.errors import BgRemoveError
from bgremove.options import (
    FORMATS,
    OutputFormatName,
    RemoveOptions,
    Rgb,
    parse_color,
    parse_margins,
    parse_position,
    parse_roi,
    parse_scale,
)
from bgremove.result import RemovalResult
from bgremove.tracing import configure_tracing, shutdown_tracing

PROG = "bgremove remove"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
# Output file suffixes that choose the format when --format is not given.
_SUFFIX_FORMATS: dict[str, OutputFormatName] = {
    ".png": "png",
    ".webp": "webp",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".zip": "zip",
}
# A server asking to retry later (google.rpc.RetryInfo) is obeyed this many times per image.
MAX_ATTEMPTS = 3
MAX_RETRY_WAIT_S = 30.0


_N = TypeVar("_N", int, float)


class UsageError(Exception):
    """A problem with the command line; reported as one line and exit status 2."""


@dataclass(frozen=True)
class Job:
    source: Path
    destination: Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Remove image backgrounds through a running bgremove service."
    parser.add_argument(
        "inputs", nargs="+", type=Path, metavar="INPUT", help="image files, or folders of jpg/jpeg/png/webp"
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        metavar="OUT",
        help="output file for a single input file; otherwise a directory (created)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="png or webp cut-out, mask (alpha matte PNG), jpeg on --bg-color, zip (color.jpg + "
        "alpha.png); default: OUT's extension for a single file (.png, .webp, .jpg, .jpeg, .zip), "
        "else jpeg with --bg-color, else png",
    )
    parser.add_argument(
        "--bg-color",
        type=_color,
        default=None,
        metavar="COLOR",
        help="'#rrggbb' or a name: the background (opaque result; not for mask or zip)",
    )
    parser.add_argument(
        "--bg-image",
        type=_read_file,
        default=None,
        metavar="FILE",
        help="a JPEG, PNG or WebP under the subject, resized to cover the result (not for mask or zip)",
    )
    parser.add_argument("--crop", action="store_true", help="crop to the subject")
    parser.add_argument(
        "--crop-margin",
        type=_crop_margin,
        default=0,
        metavar="M",
        help="kept around the subject with --crop: N pixels, or '10%%', '20px 5%%' (top/bottom, "
        "left/right) or four values (top right bottom left); %% of the subject, capped at 50%%",
    )
    parser.add_argument(
        "--roi",
        type=_roi,
        default=None,
        metavar="'X1 Y1 X2 Y2'",
        help="keep only the subject inside this region: pixels (30 or 30px) or %% of the image",
    )
    parser.add_argument(
        "--scale",
        type=_scale,
        default=None,
        metavar="S",
        help="the subject's size relative to the result, 10%%..100%%, or original (default); "
        "centres it unless --position says otherwise",
    )
    parser.add_argument(
        "--position",
        type=_position,
        default=None,
        metavar="P",
        help="original, center, or '50%%' / '20%% 80%%' of the free space (horizontal, vertical)",
    )
    parser.add_argument(
        "--max-side", type=_non_negative, default=0, metavar="N", help="downscale so the longer side is ≤ N"
    )
    parser.add_argument(
        "--max-output-pixels",
        type=_non_negative,
        default=0,
        metavar="N",
        help="downscale to at most N pixels (remove.bg's preview: 250000, hd: 4000000)",
    )
    parser.add_argument("--model", default="", help="model name; default: the server's default")
    parser.add_argument(
        "--concurrency", type=_positive, default=4, metavar="N", help="images in flight at once (default 4)"
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("BGREMOVE_TARGET", DEFAULT_TARGET),
        metavar="HOST:PORT",
        help=f"gateway address [BGREMOVE_TARGET] (default {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help=f"deadline per image in seconds (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    parser.add_argument("--tls-ca", type=Path, metavar="FILE", help="PEM root certificates (implies TLS)")
    parser.add_argument("--tls-cert", type=Path, metavar="FILE", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM client key (mutual TLS)")
    # Never a default taken from the environment: --help would print the key.
    parser.add_argument("--api-key", default=None, metavar="KEY", help="bearer token [BGREMOVE_API_KEY]")


def run(ns: argparse.Namespace) -> int:
    try:
        options = _options(ns)
        jobs = plan_jobs(ns.inputs, ns.output, options.extension)
        make_client = _client_factory(ns)
    except UsageError as error:
        print(f"{PROG}: error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    _tracing_warnings_to_stderr()
    provider = configure_tracing("bgremove-cli", short_lived=True)
    try:
        return asyncio.run(
            _remove_all(
                jobs,
                options,
                make_client,
                target=ns.target,
                concurrency=ns.concurrency,
            )
        )
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown_tracing(provider)


class _StderrWarning(logging.Handler):
    """Tracing's warnings (no SDK, a collector that did not answer) as this command's own lines."""

    def emit(self, record: logging.LogRecord) -> None:
        # sys.stderr as it is now, not when the handler was made: tests and callers may swap it.
        print(f"{PROG}: warning: {_one_line(record.getMessage())}", file=sys.stderr)


def _tracing_warnings_to_stderr() -> None:
    logger = logging.getLogger("bgremove.tracing")
    if not any(isinstance(h, _StderrWarning) for h in logger.handlers):
        logger.addHandler(_StderrWarning(logging.WARNING))
    logger.propagate = False


def plan_jobs(inputs: Sequence[Path], output: Path, extension: str) -> list[Job]:
    """Where each input's result goes, following the naming rules in the module docstring."""
    sources = _expand(inputs)
    if _single_output(inputs, output):
        if output.resolve() == sources[0].resolve():
            raise UsageError(f"-o {output} is the input itself; choose another output file")
        return [Job(sources[0], output)]
    if output.exists() and not output.is_dir():
        raise UsageError(f"-o {output} must be a directory when there are several inputs or a folder")
    # Never overwrite an input that lives in the output folder.
    out_dir = output.resolve()
    used = {s.name.casefold() for s in sources if s.resolve().parent == out_dir}
    jobs = []
    for source in sources:
        name, n = f"{source.stem}.{extension}", 1
        while name.casefold() in used:
            n += 1
            name = f"{source.stem}-{n}.{extension}"
        used.add(name.casefold())
        jobs.append(Job(source, output / name))
    return jobs


def _single_output(inputs: Sequence[Path], output: Path) -> bool:
    """True when -o names the one output file rather than a directory."""
    return len(inputs) == 1 and inputs[0].is_file() and not output.is_dir()


def _expand(inputs: Sequence[Path]) -> list[Path]:
    sources: list[Path] = []
    seen: set[Path] = set()
    for path in inputs:
        if path.is_dir():
            found = sorted(
                p
                for p in path.iterdir()
                if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
            )
            if not found:
                raise UsageError(f"{path}: no .jpg, .jpeg, .png or .webp files in this folder")
        elif path.is_file():
            found = [path]
        else:
            raise UsageError(f"{path}: no such file or folder")
        for p in found:
            if (key := p.resolve()) not in seen:
                seen.add(key)
                sources.append(p)
    return sources


def _options(ns: argparse.Namespace) -> RemoveOptions:
    fmt = _output_format(ns)
    if ns.crop_margin and not ns.crop:
        raise UsageError("--crop-margin needs --crop")
    try:
        return RemoveOptions(
            format=fmt,
            bg_color=ns.bg_color,
            crop=ns.crop,
            crop_margin=ns.crop_margin,
            max_output_side=ns.max_side,
            model=ns.model,
            roi=ns.roi,
            scale=ns.scale,
            position=ns.position,
            bg_image=ns.bg_image,
            max_output_pixels=ns.max_output_pixels,
        )
    except ValueError as error:
        message = str(error).replace("bg_color", "--bg-color").replace("bg_image", "--bg-image")
        raise UsageError(message) from None


def _output_format(ns: argparse.Namespace) -> OutputFormatName:
    """--format; else, for a single output file, its extension's format; else jpeg for --bg-color.

    A single output file's extension must agree with the format, so the bytes written are what the
    name says: -o cut.jpg --format png, or -o out.bmp, is refused instead of silently written as PNG."""
    fmt: OutputFormatName | None = ns.format
    chosen_by = f"--format {fmt}"
    if not _single_output(ns.inputs, ns.output):
        # A colour background makes an opaque picture, which JPEG stores best.
        return fmt or ("jpeg" if ns.bg_color is not None else "png")
    out: Path = ns.output
    suffix = out.suffix.lower()
    if fmt is None:
        if suffix in _SUFFIX_FORMATS:
            return _SUFFIX_FORMATS[suffix]
        if not suffix and ns.bg_color is not None:
            return "jpeg"
        what = f"{suffix} is not a format bgremove writes" if suffix else "it has no extension"
        raise UsageError(
            f"cannot tell the output format from -o {out}: {what}; name it .png, .webp, .jpg, .jpeg "
            "or .zip, or give --format"
        )
    # A mask is a PNG file.
    wanted = [s for s, f in _SUFFIX_FORMATS.items() if f == ("png" if fmt == "mask" else fmt)]
    if suffix and suffix not in wanted:
        raise UsageError(f"-o {out} does not match {chosen_by}: name it {' or '.join(wanted)}")
    return fmt


def _client_factory(ns: argparse.Namespace) -> Callable[[], AsyncClient]:
    """Reads the TLS files now, so a bad path is a usage error before any image is sent."""
    if (ns.tls_cert is None) != (ns.tls_key is None):
        raise UsageError("mutual TLS needs both --tls-cert and --tls-key")

    def read(path: Path | None) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as error:
            raise UsageError(f"{path}: {error.strerror or error}") from None

    root, chain, key = read(ns.tls_ca), read(ns.tls_cert), read(ns.tls_key)
    api_key = ns.api_key or os.environ.get("BGREMOVE_API_KEY") or None
    insecure = plaintext_key_warning(
        ns.target,
        api_key=api_key,
        tls=ns.tls or root is not None or chain is not None,
        hint="give --tls (or --tls-ca FILE) to use TLS",
    )
    if insecure is not None:
        print(f"{PROG}: warning: {insecure}", file=sys.stderr)

    def make() -> AsyncClient:
        # The line above already said it, in the CLI's words, instead of Python's two-line form.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InsecureKeyWarning)
            return AsyncClient(
                ns.target,
                tls=ns.tls,
                root_certificates=root,
                certificate_chain=chain,
                private_key=key,
                api_key=api_key,
                timeout=ns.timeout,
            )

    return make


async def _remove_all(
    jobs: list[Job],
    options: RemoveOptions,
    make_client: Callable[[], AsyncClient],
    *,
    target: str,
    concurrency: int,
    stderr: TextIO | None = None,
) -> int:
    err = stderr or sys.stderr
    failed = 0
    unreachable: BgRemoveError | None = None
    pending = iter(jobs)
    # disable=None: a bar only on a terminal, so logs and pipes get the failure lines alone.
    bar = tqdm(total=len(jobs), unit="img", file=err, disable=None if len(jobs) > 1 else True)

    def report(line: str) -> None:
        nonlocal failed
        failed += 1
        bar.write(_one_line(line), file=err)

    async def worker(client: AsyncClient) -> None:
        nonlocal unreachable
        for job in pending:
            if unreachable is not None:
                return
            try:
                result = await _remove_one(client, job.source, options)
            except BgRemoveError as error:
                if _is_unreachable(client, error):
                    unreachable = unreachable or error
                    return
                report(f"{job.source}: {error.code.name}: {error.message_for_cli()}")
                continue
            except OSError as error:
                report(f"{job.source}: IO_ERROR: cannot read it: {error.strerror or error}")
                continue
            finally:
                bar.update(1)
            try:
                await asyncio.to_thread(_save, result, job.destination)
            except OSError as error:
                report(f"{job.source}: IO_ERROR: cannot write {job.destination}: {error.strerror or error}")

    # The channel belongs to this event loop, so the client is made inside it.
    async with make_client() as client:
        try:
            await asyncio.gather(*(worker(client) for _ in range(min(concurrency, len(jobs)))))
        finally:
            bar.close()
    if unreachable is not None:
        print(
            _one_line(f"{PROG}: cannot reach the server at {target}: {unreachable.message_for_cli()}"),
            file=err,
        )
        return 1
    return 1 if failed else 0


async def _remove_one(client: AsyncClient, source: Path, options: RemoveOptions) -> RemovalResult:
    attempt = 1
    while True:
        try:
            return await client.remove(source, options)
        except BgRemoveError as error:
            if error.retry_after_s is None or attempt == MAX_ATTEMPTS:
                raise
            attempt += 1
            await asyncio.sleep(min(error.retry_after_s, MAX_RETRY_WAIT_S))


def _save(result: RemovalResult, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    result.save(destination)


def _is_unreachable(client: AsyncClient, error: BgRemoveError) -> bool:
    """UNAVAILABLE on a channel that is not connected: no server answered at all. An overloaded or
    draining server also says UNAVAILABLE, but over a READY channel, and that is a per-image failure."""
    return (
        error.code is grpc.StatusCode.UNAVAILABLE
        and client.connectivity() is not grpc.ChannelConnectivity.READY
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _color(value: str) -> Rgb:
    try:
        return parse_color(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace("bg_color ", "")) from None


def _read_file(value: str) -> bytes:
    try:
        return Path(value).read_bytes()
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {value}: {error.strerror or error}") from None


def _checked(parse: Callable[[str], object], value: str) -> str:
    """`value` as given, once `parse` (a bgremove.options parser) accepts it."""
    try:
        parse(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _crop_margin(value: str) -> int | str:
    """A plain number is the pixel margin of every side (Options.crop_margin); any other form
    (px or % suffixes, two or four values) goes as Options.crop_margins."""
    if value.strip().isdigit():
        return int(value)
    return _checked(parse_margins, value)


def _roi(value: str) -> str:
    return _checked(parse_roi, value)


def _scale(value: str) -> str:
    return _checked(parse_scale, value)


def _position(value: str) -> str:
    return _checked(parse_position, value)


def _non_negative(value: str) -> int:
    return _bounded(int, value, 0, "a whole number, 0 or more")


def _positive(value: str) -> int:
    return _bounded(int, value, 1, "a whole number, 1 or more")


def _positive_float(value: str) -> float:
    return _bounded(float, value, 0.001, "a number of seconds, more than 0")


def _bounded(kind: Callable[[str], _N], value: str, low: _N, what: str) -> _N:
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or not number >= low:
        raise argparse.ArgumentTypeError(f"{value!r} is not {what}")
    return number


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
