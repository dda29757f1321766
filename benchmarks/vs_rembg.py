"""bgremove against rembg's own HTTP server, U2-Net-P on CPU, side by side in one run.

Starts a bgremove gateway (embedded Triton, free ports, default model u2netp) and rembg's server
(`rembg s`, from PyPI, in its own virtualenv under .run/rembg-venv, never a dependency of this
project), sends both the sweep's 1 MP JPEG photos for PNG cut-outs at the same concurrency, in
alternating rounds (bgremove, rembg; rembg, bgremove; ...), and writes images/s, p50/p95, the
ratio, and the CPU each server's whole process tree used (from /proc).

rembg gets the same checksum-verified u2netp.onnx the gateway is built from, placed where it looks
for it, and runs with every proxy variable pointing at a closed loopback port: a download it tried
would fail the run rather than happen. Needs PyPI once, for the virtualenv; CI never runs this.

    .venv/bin/python benchmarks/vs_rembg.py [--requests 64] [--concurrency 4]
        [--out benchmarks/results/vs-rembg.md]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).parent))
import grpc
import httpx
from make_images import make
from PIL import Image

from bgremove_gateway.pipeline.encode import OUTPUT_FORMATS
from bgremove_gateway.tools import bench
from bgremove_gateway.tools.cpu_time import gateway_processes
from bgremove_gateway.tools.load import HTTP_CODES, OK, Outcome
from bgremove_gateway.tools.local_gateway import free_port, local_gateway
from bgremove_gateway.triton.graph import builtin_card, bundled_u2netp, file_digests, verify_source

REMBG_REQUIREMENT = "rembg[cpu,cli]==2.0.86"
REMBG_VERSION = REMBG_REQUIREMENT.rsplit("==", 1)[1]
RUN_DIR = Path(".run")
# Where rembg (U2NET_HOME) finds u2netp.onnx before it would download it: <home>/models/u2netp/.
WEIGHTS_RELATIVE = Path("models/u2netp/u2netp.onnx")
# Nothing listens on the discard port: any download rembg tried would fail, not leave the machine.
CLOSED_PROXY = "http://127.0.0.1:9"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
IDLE_WINDOW_S = 3.0
COLUMNS = (
    "| server | conc | requests | ok | img/s | p50 ms | p95 ms | server CPU ms/img "
    "| server cores used | idle cores |"
)


@dataclass(frozen=True)
class RembgServer:
    url: str  # POST /api/remove
    pid: int


def prepare_venv(venv: Path) -> Path:
    """rembg's virtualenv with the pinned release (made once, kept under .run/); its `rembg` command."""
    python, command = venv / "bin" / "python", venv / "bin" / "rembg"
    if command.exists():
        probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('rembg'))"]
        if subprocess.run(probe, capture_output=True, text=True).stdout.strip() == REMBG_VERSION:
            return command
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", REMBG_REQUIREMENT], check=True)
    return command


def place_weights(home: Path) -> Path:
    """The gateway's checksum-verified u2netp.onnx, copied to where rembg looks first."""
    card = builtin_card("u2netp")
    source = bundled_u2netp()
    verify_source(source, card)
    target = home / WEIGHTS_RELATIVE
    if not target.is_file() or file_digests(target).md5 != card.md5:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    verify_source(target, card)
    return target


def offline_env(home: Path) -> dict[str, str]:
    """rembg's environment: its model home, no way out but loopback, no browser to open."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in {p.upper() for p in PROXY_VARIABLES}}
    env |= dict.fromkeys(PROXY_VARIABLES, CLOSED_PROXY)
    env |= {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    # `rembg s` calls webbrowser.open on start-up; `true` is the browser that does nothing.
    env |= {"U2NET_HOME": str(home.resolve()), "BROWSER": "true", "GRADIO_ANALYTICS_ENABLED": "False"}
    return env


def _drain(stream: IO[bytes], lines: collections.deque[str]) -> None:
    for raw in stream:
        lines.append(raw.decode("utf-8", "replace").rstrip())


@contextlib.contextmanager
def rembg_server(command: Path, home: Path, startup_timeout_s: float = 300.0) -> Iterator[RembgServer]:
    """`rembg s` on a free loopback port, without its Gradio UI (which only adds idle CPU)."""
    port = free_port()
    argv = [
        str(command),
        "s",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-ui",
        "--log_level",
        "warning",
    ]
    proc = subprocess.Popen(
        argv,
        env=offline_env(home),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    log: collections.deque[str] = collections.deque(maxlen=20)
    assert proc.stdout is not None
    reader = threading.Thread(target=_drain, args=(proc.stdout, log), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/openapi.json", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("vs_rembg: rembg's server did not start: " + " | ".join(log))
            time.sleep(0.5)
        yield RembgServer(f"{base}/api/remove", proc.pid)
    except BaseException:
        print("rembg's last log lines: " + " | ".join(log), file=sys.stderr, flush=True)
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(5)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of `pid` and all its descendants (for the gateway: Triton and its stubs too)."""
    return sum(p.cpu_s for p in gateway_processes(pid, exclude=()))


def _check_cut_out(body: bytes, photo: bench.Photo) -> None:
    """The warm-up answer must be the same job as bgremove's: a PNG with alpha, the photo's size."""
    with Image.open(io.BytesIO(body)) as out, Image.open(io.BytesIO(photo.data)) as src:
        if out.format != "PNG" or out.mode != "RGBA" or out.size != src.size:
            raise SystemExit(f"vs_rembg: rembg answered {out.format} {out.mode} {out.size}, not a cut-out")


async def rembg_target(server: RembgServer, photos: list[bench.Photo], concurrency: int) -> bench.Target:
    """POST /api/remove (multipart `file`, form `model=u2netp`) on `concurrency` threads with
    keep-alive connections, as bench.http_target drives the gateway's HTTP API."""
    client = httpx.Client(limits=httpx.Limits(max_connections=concurrency))
    loop = asyncio.get_running_loop()
    threads = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench-rembg")

    def blocking_call(i: int) -> Outcome:
        photo = photos[i % len(photos)]
        try:
            r = client.post(
                server.url,
                files={"file": ("photo", photo.data, photo.content_type)},
                data={"model": "u2netp"},
                timeout=300,
            )
        except httpx.HTTPError as exc:
            return Outcome(grpc.StatusCode.UNAVAILABLE, type(exc).__name__)
        if r.status_code != 200:
            return Outcome(HTTP_CODES.get(r.status_code, grpc.StatusCode.UNKNOWN), r.text[:300])
        if i == 0:
            _check_cut_out(r.content, photo)
        return OK

    async def call(i: int) -> Outcome:
        return await loop.run_in_executor(threads, blocking_call, i)

    async def close() -> None:
        threads.shutdown()
        await asyncio.to_thread(client.close)

    first = await call(0)  # loads rembg's session (it does so on the first request) and checks the answer
    if first.code != grpc.StatusCode.OK:
        raise SystemExit(f"vs_rembg: rembg's first call failed: {first.status} {first.details}")
    return bench.Target("rembg", call, close, cpu_clock=lambda: tree_cpu_s(server.pid))


async def idle_cores(pid: int, seconds: float = IDLE_WINDOW_S) -> float:
    """Cores a server's process tree keeps busy with no call in flight."""
    before, started = tree_cpu_s(pid), time.perf_counter()
    await asyncio.sleep(seconds)
    return (tree_cpu_s(pid) - before) / (time.perf_counter() - started)


def _add(total: bench.RunStats, part: bench.RunStats) -> None:
    total.wall_s += part.wall_s
    total.latencies_ms += part.latencies_ms
    total.error_latencies_ms += part.error_latencies_ms
    total.statuses.update(part.statuses)
    total.retry_hinted += part.retry_hinted
    if part.cpu_s is not None:
        total.cpu_s = (total.cpu_s or 0.0) + part.cpu_s


async def alternate(
    targets: list[bench.Target], concurrency: int, requests: int, rounds: int
) -> tuple[list[bench.RunStats], list[float]]:
    """bench.interleaved one round at a time (A B, B A, ...): the totals, and each round's
    throughput ratio of the first target over the second, whose spread shows the machine's noise."""
    totals = {t.name: bench.RunStats(t.name, concurrency, requests, 0.0) for t in targets}
    bounds = [round(r * requests / rounds) for r in range(rounds + 1)]
    per_round = []
    for r in range(rounds):
        order = targets if r % 2 == 0 else targets[::-1]
        parts = {s.name: s for s in await bench.interleaved(order, concurrency, bounds[r + 1] - bounds[r], 1)}
        for name, part in parts.items():
            _add(totals[name], part)
        first, second = (parts[t.name].throughput for t in targets)
        per_round.append(round(first / second, 2) if second else float("nan"))
    return list(totals.values()), per_round


async def measure(
    gateway_target: str,
    gateway_pid: int,
    rembg: RembgServer,
    photos: list[bench.Photo],
    ns: argparse.Namespace,
) -> tuple[list[dict[str, Any]], int, list[float]]:
    service = await bench.service_target(
        gateway_target, photos, ns.concurrency, OUTPUT_FORMATS["png"], model="u2netp"
    )
    service.name, service.cpu_clock = "bgremove", lambda: tree_cpu_s(gateway_pid)
    targets = [service]
    try:
        targets.append(await rembg_target(rembg, photos, ns.concurrency))
        idle = {"bgremove": await idle_cores(gateway_pid), "rembg": await idle_cores(rembg.pid)}
        rounds = ns.rounds or bench.default_rounds(ns.concurrency, ns.requests)
        runs, per_round = await alternate(targets, ns.concurrency, ns.requests, rounds)
    finally:
        for t in targets:
            await t.close()
    return [{**r.summary(), "idle_cores": round(idle[r.name], 4)} for r in runs], rounds, per_round


def rows(runs: list[dict[str, Any]]) -> list[str]:
    return [
        f"| {r['name']} | {r['concurrency']} | {r['requests']} | {r['ok']} | {r['throughput_per_s']:.2f} "
        f"| {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['gateway_cpu_ms_per_request']:.0f} "
        f"| {r['gateway_cores_used']:.2f} | {r['idle_cores']:.3f} |"
        for r in runs
    ]


def ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    """bgremove over rembg: throughput (higher is better), p50 and CPU per image (lower is better)."""
    ours, theirs = (next(r for r in runs if r["name"] == n) for n in ("bgremove", "rembg"))
    return {
        "throughput": round(ours["throughput_per_s"] / theirs["throughput_per_s"], 2),
        "p50": round(ours["p50_ms"] / theirs["p50_ms"], 2),
        "cpu_ms_per_image": round(
            ours["gateway_cpu_ms_per_request"] / theirs["gateway_cpu_ms_per_request"], 2
        ),
    }


def _loads(load: tuple[float, float, float]) -> str:
    return ", ".join(f"{x:.1f}" for x in load)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=64, help="requests to each server")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=0, help="alternating rounds (default: bench's)")
    ap.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "bgremove-bench-images")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/vs-rembg.md"))
    ns = ap.parse_args()
    folder = make(ns.images)[1.0]
    photos = bench.load_photos([folder])
    home = RUN_DIR / "rembg-home"
    weights = place_weights(home)
    command = prepare_venv(RUN_DIR / "rembg-venv")
    load_before = os.getloadavg()
    started = time.monotonic()
    print("starting bgremove's gateway and rembg's server (minutes on a busy machine)", flush=True)
    with local_gateway() as gw, rembg_server(command, home) as rembg:
        runs, rounds, per_round = asyncio.run(measure(gw.target, gw.pid, rembg, photos, ns))
    load_after, minutes = os.getloadavg(), (time.monotonic() - started) / 60
    # rembg read the file we placed and wrote nothing beside it: no download took place.
    files = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())
    if files != [str(WEIGHTS_RELATIVE)] or file_digests(weights).md5 != builtin_card("u2netp").md5:
        raise SystemExit(f"vs_rembg: rembg's model home changed during the run: {files}")
    ratio = ratios(runs)
    table = rows(runs)
    spread = f"median {statistics.median(per_round)}, {min(per_round)}-{max(per_round)}"
    print("\n".join([COLUMNS, *table, f"bgremove / rembg: {ratio}; by round: {per_round}"]), flush=True)
    lines = [
        f"# bgremove against rembg's server, U2-Net-P, {dt.date.today().isoformat()}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other work, CPython "
        f"{platform.python_version()}, CPU only. Load average (1, 5, 15 min) "
        f"{_loads(load_before)} before and {_loads(load_after)} "
        f"after the {minutes:.1f}-minute run: compare the two servers within this run, not with other runs.",
        "",
        f"Both servers ran at once on this machine: bgremove's gateway with its embedded Triton (default "
        f"settings, model u2netp) and `rembg s --no-ui` ({REMBG_REQUIREMENT}, its defaults, its own "
        "virtualenv), both with the same u2netp.onnx (md5 8e83ca70e441ab06c318d82300c84806). The client "
        f"sent the sweep's 1 MP JPEG photos ({len(photos)}, benchmarks/make_images.py) for PNG cut-outs, "
        f"{ns.requests} requests to each at concurrency {ns.concurrency}, in {rounds} alternating rounds "
        "(gRPC streaming to bgremove, multipart POST /api/remove to rembg). Server CPU is each server's "
        "whole process tree from /proc over its rounds (for bgremove: gateway, Triton and its stubs); "
        "idle cores were read for 3 s before the rounds.",
        "",
        "    .venv/bin/python benchmarks/vs_rembg.py",
        "",
        COLUMNS,
        "|" + "---|" * (COLUMNS.count("|") - 1),
        *table,
        "",
        f"bgremove / rembg: throughput **{ratio['throughput']}x**, p50 {ratio['p50']}x, "
        f"server CPU per image {ratio['cpu_ms_per_image']}x. Throughput ratio round by round: "
        f"{', '.join(map(str, per_round))} ({spread}).",
        "",
        "Every run, as bench's RunStats.summary() gives it:",
        "",
        "```json",
        json.dumps(runs, indent=1),
        "```",
    ]
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {ns.out}")
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
