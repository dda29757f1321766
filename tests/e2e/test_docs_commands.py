"""Every command block in README.md and docs/ runs as written, and every relative link resolves.

A reader runs the ```sh blocks from the repository root, with `make run` up (gRPC on 127.0.0.1:50051,
its embedded Triton on 127.0.0.1:8201) and a photo of their own as photo.jpg. Here each block runs in
bash with `set -euo pipefail`, in a fresh directory that looks like that root (symlinks to the
checkout's .venv, server/, helm/, ..., a copy of a test photo as photo.jpg and a photos/ folder),
with a reader's environment: no BGREMOVE_* or OTEL_* variables and the venv's bin/ off PATH, so a
bare `bgremove` fails as it would after `make run`. The service is a gateway on 127.0.0.1:50051
sharing the session's Triton; where a developer's `make run` holds that port, a free one is written
into the blocks instead (and into BGREMOVE_TARGET). The same goes for 8201 (the session's Triton),
4318 (an OTLP receiver here) and any other loopback port a block uses that is taken.

A block that cannot run here (a cluster, `make run` itself, long benchmarks) is preceded by an HTML
comment `<!-- not run: why -->`; it is reported as skipped with that reason. Every shell-like block
(sh, bash, shell, console) is either run or says why not.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service_harness import GatewayProcess, OtlpReceiver, free_port

REPO = Path(__file__).resolve().parents[2]
# The files whose command blocks run.
COMMAND_DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# The files whose relative links must resolve.
LINKED_DOCS = [
    *COMMAND_DOCS,
    REPO / "benchmarks" / "README.md",
    REPO / "model_repository" / "README.md",
    REPO / "helm" / "bgremove" / "README.md",
]
SHELL_TAGS = {"sh", "bash", "shell", "console", "zsh"}
RUN_TAG = "sh"
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(?P<why>.+?)\s*-->$")
# What a reader's checkout root holds that the blocks may use; symlinked into each block's directory.
ROOT_ENTRIES = (
    ".venv",
    "benchmarks",
    "clients",
    "docs",
    "helm",
    "model_repository",
    "protos",
    "server",
    "tests",
    "Dockerfile",
    "Makefile",
    "pyproject.toml",
    "README.md",
)
FIXTURES = REPO / "tests" / "fixtures" / "rembg"
# Over 100 KB, so its base64 would not fit in one command-line argument (the grpcurl example).
PHOTO = FIXTURES / "cloth-1.jpg"
PHOTOS = (FIXTURES / "car-1.jpg", FIXTURES / "anime-girl-1.jpg")
# The addresses the docs assume: make run's gateway and its embedded Triton, an OTLP collector.
DOC_GATEWAY_PORT = 50051
DOC_TRITON_PORT = 8201
DOC_OTLP_PORT = 4318
DOC_HTTP_PORT = 8080  # the HTTP API's (docs/http-api.md)
BLOCK_TIMEOUT_S = 120
LOOPBACK_PORT = re.compile(r"(?<=127\.0\.0\.1:)(\d{2,5})\b")
# `bgremove` as a command word (not `.venv/bin/bgremove`, not inside a comment).
BARE_BGREMOVE = re.compile(r"(?:^|[;&|(]|\$\()\s*bgremove\s")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    tag: str
    text: str
    not_run: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, each with the `not run` reason just above it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, tag = opening.group(1), opening.group(2), opening.group(3).lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # the closing fence
        above = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        reason = NOT_RUN.match(above)
        blocks.append(
            Block(
                path=path,
                line=start + 1,
                tag=tag,
                text="\n".join(body) + "\n",
                not_run=reason.group("why") if reason else None,
            )
        )
    return blocks


SHELL_BLOCKS = [b for doc in COMMAND_DOCS for b in fenced_blocks(doc) if b.tag in SHELL_TAGS]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class Reader:
    """What a reader's shell has: the service, the ports it listens on, the environment."""

    ports: dict[int, int]
    env: dict[str, str]

    def localise(self, text: str) -> str:
        """The block with the documented loopback ports replaced by the ones in use here."""

        def port(m: re.Match[str]) -> str:
            documented = int(m.group(1))
            if documented not in self.ports:
                self.ports[documented] = documented if port_is_free(documented) else free_port()
            return str(self.ports[documented])

        return LOOPBACK_PORT.sub(port, text)


@pytest.fixture(scope="module")
def reader(gateway: GatewayProcess) -> Iterator[Reader]:
    """A gateway where the docs expect `make run`'s, on the session's Triton, and a reader's env."""
    port = DOC_GATEWAY_PORT if port_is_free(DOC_GATEWAY_PORT) else free_port()
    http_port = DOC_HTTP_PORT if port_is_free(DOC_HTTP_PORT) else free_port()
    service = GatewayProcess(
        port=port,
        args=[
            "--triton-url",
            f"127.0.0.1:{gateway.triton_grpc_port}",
            "--http-listen",
            f"127.0.0.1:{http_port}",
        ],
    )
    collector = OtlpReceiver()
    venv_bins = {Path(sys.executable).parent, REPO / ".venv" / "bin"}
    path = os.pathsep.join(
        d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d) not in venv_bins
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BGREMOVE_", "OTEL_")) and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    }
    env["PATH"] = path
    env["BGREMOVE_TARGET"] = service.target  # the CLI's default when the port is the documented one
    try:
        with service.serving():
            yield Reader(
                ports={
                    DOC_GATEWAY_PORT: port,
                    DOC_TRITON_PORT: gateway.triton_grpc_port,
                    DOC_OTLP_PORT: collector.port,
                    DOC_HTTP_PORT: http_port,
                },
                env=env,
            )
    finally:
        collector.close()


def reader_directory(root: Path) -> Path:
    """A directory laid out like the checkout's root, with photo.jpg and photos/ beside it."""
    root.mkdir()
    for name in ROOT_ENTRIES:
        if (REPO / name).exists():
            (root / name).symlink_to(REPO / name)
    shutil.copyfile(PHOTO, root / "photo.jpg")
    (root / "photos").mkdir()
    for photo in PHOTOS:
        shutil.copyfile(photo, root / "photos" / photo.name)
    return root


def run_in_bash(script: str, cwd: Path, env: dict[str, str], log: Path) -> tuple[int, str]:
    """Runs the script in its own process group; whatever it leaves running is stopped after it."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc", "-c", script],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = -1
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    try:
                        os.killpg(proc.pid, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(0.1)
            proc.wait()
    return code, log.read_text(errors="replace")


def without_comments(text: str) -> str:
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in text.splitlines())


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[b.id for b in SHELL_BLOCKS])
def test_command_block_runs_as_written(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    assert not BARE_BGREMOVE.search(without_comments(block.text)), (
        f"{block.id} calls a bare `bgremove`, which is not on PATH after `make run`: write .venv/bin/bgremove"
    )
    if block.not_run:
        pytest.skip(f"not run: {block.not_run}")
    assert block.tag == RUN_TAG, (
        f"{block.id} is a ```{block.tag} block: tag it ```{RUN_TAG} so it runs, "
        "or put `<!-- not run: why -->` just above it"
    )
    reader: Reader = request.getfixturevalue("reader")
    script = "set -euo pipefail\n" + reader.localise(block.text)
    started = time.monotonic()
    code, output = run_in_bash(script, reader_directory(tmp_path / "root"), reader.env, tmp_path / "out.log")
    took = time.monotonic() - started
    assert code == 0, (
        f"{block.id} failed (exit {code} after {took:.1f} s):\n"
        f"--- as run\n{script}--- output\n{output[-6000:]}"
    )


# --- links and named paths ------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCED = re.compile(r"^([ \t]*)(`{3,}|~{3,}).*?^\1\2[ \t]*$", flags=re.S | re.M)


def prose(text: str) -> str:
    """The text without fenced blocks and inline code, where links and paths are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCED.sub("", text))


def github_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    body = FENCED.sub("", path.read_text(encoding="utf-8"))
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", body, flags=re.M):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
        slug = re.sub(r"[^\w\- ]", "", text.lower().replace("`", "")).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_every_relative_link_resolves() -> None:
    broken: list[str] = []
    for doc in LINKED_DOCS:
        for m in LINK.finditer(prose(doc.read_text(encoding="utf-8"))):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (doc.parent / file_part).resolve() if file_part else doc
            where = f"{doc.relative_to(REPO)}: ({target})"
            if not resolved.exists():
                broken.append(f"{where}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in github_anchors(resolved):
                broken.append(f"{where}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


CHECKOUT_PATH = re.compile(
    r"`((?:server|clients|tests|benchmarks|protos|model_repository|helm|docs)/[^`\s*<>]+?)(::\w+)?`"
    r"|`::(\w+)`"
)


def test_every_named_checkout_path_exists() -> None:
    """`server/...`, `tests/...::test_name` and the like, named in the docs, are really there.

    A later `::name` in the same paragraph or table row names a test in the file named before it.
    Records in docs/decisions/code-*.md belong to the code's own history and may name files gone since.
    """
    missing: list[str] = []
    for doc in COMMAND_DOCS:
        if doc.parent.name == "decisions" and doc.name.startswith("code-"):
            continue
        text = FENCED.sub("", doc.read_text(encoding="utf-8"))
        for paragraph in re.split(r"\n\s*\n|\n(?=\|)", text):
            last: Path | None = None
            for m in CHECKOUT_PATH.finditer(paragraph):
                where = f"{doc.relative_to(REPO)}: {m.group(0)}"
                if m.group(1):
                    last = REPO / m.group(1)
                    if not last.exists():
                        missing.append(f"{where}: no such path")
                        continue
                name = m.group(2) or (f"::{m.group(3)}" if m.group(3) else None)
                if name and last is not None and last.is_file():
                    source = last.read_text(encoding="utf-8")
                    if not re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name[2:]}\b", source, flags=re.M):
                        missing.append(f"{where}: no {name[2:]} in {last.relative_to(REPO)}")
    assert not missing, "named but missing:\n" + "\n".join(missing)
