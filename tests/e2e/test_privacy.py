"""Zero retention, proved against the real gateway and its real embedded Triton.

- Nothing is written to disk while serving: the gateway and Triton run under strace.
- No image bytes, file name, EXIF or GPS reach a log line or an exported span.
- The output carries no EXIF, GPS or XMP from the input.
- Memory returns to its baseline after a burst of large uploads and after cancelled ones.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from PIL import ExifTags, Image, PngImagePlugin
from skimage import data as skdata

from bgremove import Client, RemoveOptions
from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from e2e_helpers import stream_remove, upload_messages
from service_harness import BGREMOVE, GatewayProcess, OtlpReceiver

# --- photos that carry everything a leak could show -----------------------------------------------

PATTERN = bytes.fromhex("b9e7c0de5eedf00d4242cafe0b5e55ed5ca1ab1ed00dfeed")
TEXT_CANARIES = (
    "CANARY-DESCRIPTION-4e1d",
    "CANARY-ARTIST-77b2",
    "CANARY-COPYRIGHT-d0c3",
    "CANARY-CAMERA-MAKE-19aa",
    "CANARY-GPS-METHOD-5f60",
    "CANARY-GPS-AREA-a8c1",
    "CANARY-XMP-CREATOR-3b9e",
    "CANARY-PNG-TEXT-c4f2",
)
FILE_NAMES = ("canary-holiday-in-zurich-62f1.jpg", "canary-passport-scan-0bd7.png", "canary-child-0e95.webp")


def exif() -> Image.Exif:
    tags = Image.Exif()
    tags[ExifTags.Base.ImageDescription] = TEXT_CANARIES[0]
    tags[ExifTags.Base.Artist] = TEXT_CANARIES[1]
    tags[ExifTags.Base.Copyright] = TEXT_CANARIES[2]
    tags[ExifTags.Base.Make] = TEXT_CANARIES[3]
    tags[ExifTags.Base.Orientation] = 1
    gps = tags.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (47.0, 22.0, 11.2345)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (8.0, 32.0, 44.6789)
    gps[ExifTags.GPS.GPSProcessingMethod] = b"ASCII\0\0\0" + TEXT_CANARIES[4].encode()
    gps[ExifTags.GPS.GPSAreaInformation] = b"ASCII\0\0\0" + TEXT_CANARIES[5].encode()
    return tags


XMP = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    f'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" dc:creator="{TEXT_CANARIES[6]}"/>'
    "</rdf:RDF></x:xmpmeta>"
).encode()


def with_pattern_comment(jpeg: bytes) -> bytes:
    """Inserts a JPEG COM segment holding PATTERN right after SOI: raw bytes any leak would copy."""
    body = b"CANARY-COMMENT " + PATTERN
    return jpeg[:2] + b"\xff\xfe" + (len(body) + 2).to_bytes(2, "big") + body + jpeg[2:]


def canary_photos() -> dict[str, tuple[bytes, str]]:
    photo = Image.fromarray(skdata.astronaut()).resize((256, 256))
    out = io.BytesIO()
    photo.save(out, "JPEG", exif=exif().tobytes(), xmp=XMP, quality=90)
    jpeg = with_pattern_comment(out.getvalue())
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", TEXT_CANARIES[7])
    info.add_itxt("XML:com.adobe.xmp", XMP.decode())
    info.add(b"prVt", PATTERN)  # a private ancillary chunk: decoders skip it, leaks would not
    out = io.BytesIO()
    Image.fromarray(skdata.chelsea()).save(out, "PNG", pnginfo=info, exif=exif().tobytes())
    png = out.getvalue()
    out = io.BytesIO()
    Image.fromarray(skdata.coffee()).resize((200, 150)).save(out, "WEBP", exif=exif().tobytes(), xmp=XMP)
    webp = out.getvalue()
    return {
        FILE_NAMES[0]: (jpeg, "image/jpeg"),
        FILE_NAMES[1]: (png, "image/png"),
        FILE_NAMES[2]: (webp, "image/webp"),
    }


def needles(photos: dict[str, tuple[bytes, str]]) -> dict[str, bytes]:
    """Every form in which image content or its metadata could show up in text."""
    found: dict[str, bytes] = {name: name.encode() for name in photos}
    found |= {text: text.encode() for text in TEXT_CANARIES}
    found["pattern raw"] = PATTERN
    found["pattern hex"] = PATTERN.hex().encode()
    found["pattern HEX"] = PATTERN.hex().upper().encode()
    found["pattern repr"] = repr(PATTERN[:8])[2:-1].encode()
    for shift in range(3):  # base64 of PATTERN inside a longer buffer, at each alignment
        found[f"pattern base64/{shift}"] = base64.b64encode(PATTERN[shift:])[4:-4]
    for name, (data, _) in photos.items():
        middle = data[len(data) // 2 : len(data) // 2 + 24]  # entropy-coded pixels
        found[f"{name} pixel bytes"] = middle
        found[f"{name} pixel bytes hex"] = middle.hex().encode()
        found[f"{name} pixel bytes base64"] = base64.b64encode(middle)[4:-4]
    return found


def leaks(haystack: bytes, found: dict[str, bytes]) -> list[str]:
    lowered = haystack.lower()
    return [label for label, needle in found.items() if needle in haystack or needle.lower() in lowered]


def test_no_image_bytes_file_names_exif_or_gps_in_logs_or_spans(
    gateway: GatewayProcess, otlp: OtlpReceiver, tmp_path: Path
) -> None:
    """The session gateway logs at DEBUG (Triton's log forwarded into it) and exports every span,
    gateway's and Triton's, to the receiver; the CLI exports its own spans there too."""
    photos = canary_photos()
    for name, (data, _) in photos.items():
        (tmp_path / name).write_bytes(data)
    spans_before, traces_before = len(otlp.raw), access_trace_ids(gateway)
    out = subprocess.run(
        [
            BGREMOVE,
            "remove",
            *(str(tmp_path / n) for n in photos),
            "-o",
            str(tmp_path / "out"),
            "--target",
            gateway.target,
            "--format",
            "webp",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    assert out.returncode == 0, out.stderr
    # The unary call, and refusals, whose messages must not quote what they refuse.
    jpeg = photos[FILE_NAMES[0]][0]
    with grpc.insecure_channel(gateway.target) as channel:
        stub = pb_grpc.BackgroundRemovalStub(channel)
        stub.RemoveBackground(pb.RemoveBackgroundRequest(image=jpeg, content_type="image/jpeg"), timeout=60)
        for bad, content_type in (
            (jpeg[: len(jpeg) // 2], "image/jpeg"),
            (jpeg, "image/png"),
            (PATTERN, "image/jpeg"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                stub.RemoveBackground(
                    pb.RemoveBackgroundRequest(image=bad, content_type=content_type), timeout=60
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert not leaks((caught.value.details() or "").encode(), needles(photos))
    # Every access line of these calls, and their traces from all three services, have arrived.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = access_trace_ids(gateway) - traces_before
        services = {s.service for t in new for s in otlp.trace(t)}
        if len(new) >= 7 and {"bgremove-cli", "bgremove-gateway", "bgremove-triton"} <= services:
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"not every span was exported: {len(new)} traces from {services}")
    time.sleep(1.0)  # stragglers of the last batch
    found = needles(photos)
    log = gateway.log_text().encode()
    assert "bgremove.triton" in gateway.log_text(), "Triton's forwarded log is part of what is searched"
    assert not leaks(log, found), leaks(log, found)
    bodies = otlp.raw[spans_before:]
    assert bodies
    for body in bodies:
        assert not leaks(body, found), leaks(body, found)
    # The search is not vacuous: what it looks for was really uploaded.
    uploaded = b"".join(data for data, _ in photos.values())
    assert PATTERN in uploaded and all(text.encode() in uploaded for text in TEXT_CANARIES)
    gps = Image.open(io.BytesIO(jpeg)).getexif().get_ifd(ExifTags.IFD.GPSInfo)
    assert gps[ExifTags.GPS.GPSLatitude] == (47.0, 22.0, 11.2345)


def access_trace_ids(gateway: GatewayProcess) -> set[str]:
    return set(re.findall(r"bgremove\.access .*trace_id=([0-9a-f]{32})", gateway.log_text()))


# --- the output -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg", "mask"])
def test_output_carries_no_exif_gps_or_xmp(gateway: GatewayProcess, fmt: str) -> None:
    photos = canary_photos()
    # The output is the photo's pixels, so its entropy-coded bytes may legitimately recur: a JPEG
    # re-encoded at the quality it was saved with reproduces stretches of the original's scan
    # wherever the cut-out keeps the pixels unchanged. Metadata, names and the comment may not.
    found = {label: needle for label, needle in needles(photos).items() if "pixel bytes" not in label}
    with Client(gateway.target, timeout=60) as client:
        for name, (data, _) in photos.items():
            result = client.remove(data, RemoveOptions(format=fmt))  # type: ignore[arg-type]
            assert not leaks(result.data, found), (name, leaks(result.data, found))
            out = Image.open(io.BytesIO(result.data))
            assert not out.getexif(), name
            assert not {"exif", "xmp", "XML:com.adobe.xmp", "icc_profile", "comment", "Description"} & set(
                out.info
            ), (name, set(out.info))
            for marker in (b"Exif\0\0", b"<x:xmpmeta", b"http://ns.adobe.com/xap/1.0/", b"eXIf", b"iTXt"):
                assert marker not in result.data, (name, marker)


# --- nothing on disk ------------------------------------------------------------------------------

# What may be written while serving. /dev/shm: the shared-memory regions through which Triton and
# its Python-backend stub pass tensors (memory, not disk); /dev: /dev/null and terminals; /proc:
# kernel interfaces. Nothing else.
ALLOWED_PREFIXES = ("/dev/shm/", "/dev/", "/proc/")
# Syscalls that create, change or write files; deleting is not writing and is left out (shutdown
# removes the backend directory the launcher made at startup).
WRITE_SYSCALLS = (
    "open,openat,openat2,creat,rename,renameat,renameat2,link,linkat,symlink,symlinkat,mkdir,mkdirat,"
    "mknod,mknodat,truncate,write,pwrite64,writev,pwritev,pwritev2,sendmsg,sendto,sendmmsg"
)
SEND_CALLS = frozenset({"write", "writev", "sendmsg", "sendto", "sendmmsg"})
WRITE_FLAGS = re.compile(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC|O_APPEND")
_LINE = re.compile(r"^(?P<pid>\d+)\s+(?P<time>\d+\.\d+)\s+(?P<call>\w+)\((?P<args>.*)$")
_PATH = re.compile(r'"((?:[^"\\]|\\.)*)"')
_FD = re.compile(r"^-?\d+<(?P<target>[^>]*)>")


@dataclass(frozen=True)
class Write:
    time: float
    pid: int
    call: str
    target: str


def disk_writes(strace_log: str, open_fds: Mapping[tuple[int, int], str] | None = None) -> list[Write]:
    """Each syscall in the log that writes to, or creates, a path outside ALLOWED_PREFIXES.

    `open_fds` maps (thread id, fd) to what the fd referred to, read from /proc while the processes
    ran: the fallback for a strace that could not decode fds itself (`-y` prints nothing when it
    cannot read /proc/PID/fd, and a write then names only a number)."""
    open_fds = open_fds or {}
    found = []
    for line in strace_log.splitlines():
        m = _LINE.match(line)
        if m is None:  # "<... resumed>" halves: the call and its arguments were on the first half
            continue
        call, args = m["call"], m["args"]
        if call.startswith("send"):  # traced only as evidence of the request phase: sockets, not files
            continue
        if call.startswith(("write", "pwrite")):
            fd = _FD.match(args)  # -y prints what the fd refers to: a path, socket:[..], pipe:[..]
            if fd is not None:
                target = fd["target"]
            else:
                number = re.match(r"^(\d+)", args)
                target = open_fds.get((int(m["pid"]), int(number[1])), "") if number else ""
            targets = [target] if target.startswith("/") else []
        elif call.startswith("open"):
            targets = _PATH.findall(args)[:1] if WRITE_FLAGS.search(args) else []
        else:
            targets = _PATH.findall(args)
        for target in targets:
            if not target.startswith(ALLOWED_PREFIXES):
                found.append(Write(float(m["time"]), int(m["pid"]), call, target))
    return found


def test_disk_writes_parser_sees_what_it_must() -> None:
    log = "\n".join(
        [
            '10 1.0 openat(AT_FDCWD</w>, "/tmp/x.png", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 3</tmp/x.png>',
            '10 1.1 openat(AT_FDCWD</w>, "/w/model.onnx", O_RDONLY|O_CLOEXEC) = 3</w/model.onnx>',
            '11 1.2 write(4</var/log/app.log>, ""..., 120) = 120',
            '11 1.3 write(5<socket:[123]>, ""..., 120) = 120',
            '12 1.4 rename("/tmp/a.part", "/tmp/a") = 0',
            '12 1.5 openat(AT_FDCWD</w>, "/dev/shm/triton_region", O_RDWR|O_CREAT|O_EXCL, 0644) = 3',
            '13 1.6 pwrite64(7</srv/cache/img>, ""..., 10, 0 <unfinished ...>',
            '13 1.7 mkdir("/var/spool/bg", 0700) = 0',
        ]
    )
    assert [(w.call, w.target) for w in disk_writes(log)] == [
        ("openat", "/tmp/x.png"),
        ("write", "/var/log/app.log"),
        ("rename", "/tmp/a.part"),
        ("rename", "/tmp/a"),
        ("pwrite64", "/srv/cache/img"),
        ("mkdir", "/var/spool/bg"),
    ]


def test_disk_writes_parser_resolves_undecoded_fds_from_proc() -> None:
    log = "\n".join(['20 2.0 write(4, ""..., 1) = 1', '21 2.1 write(4, ""..., 9) = 9', "21 2.2 write(9, "])
    fds = {(20, 4): "/var/log/triton.log", (21, 4): "socket:[77]"}
    assert [(w.pid, w.target) for w in disk_writes(log, fds)] == [(20, "/var/log/triton.log")]


def _open_fds(pids: set[int]) -> dict[tuple[int, int], str]:
    """(thread id, fd) -> link target for every thread of `pids`: what each open fd refers to."""
    fds: dict[tuple[int, int], str] = {}
    for pid in pids:
        try:
            links = {int(fd.name): os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
            tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
        except OSError:  # exited, or a link vanished between listing and reading
            continue
        fds.update({(tid, fd): target for tid in tids for fd, target in links.items()})
    return fds


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [d for c in children for d in (c, *_descendants(c))]


def test_nothing_is_written_to_disk_while_serving(tmp_path: Path) -> None:
    """The gateway and its embedded Triton (and Triton's Python-backend stubs) run under
    `strace -f`; from the moment requests begin until every process has exited, no file outside
    /dev/shm, /dev and /proc is opened for writing, created, renamed or written. Startup is left out
    on purpose: no image exists yet, and the launcher copies Triton's backend into a temporary
    directory then (removed at exit)."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is not installed: `make test` installs it (apt-get install strace)")
    log = tmp_path / "strace.log"
    gw = GatewayProcess(
        args=["--log-level", "DEBUG"],
        prefix=[
            strace,
            "-f",
            "--seccomp-bpf",
            "-qq",
            "-ttt",
            "-y",
            "-s",
            "256",
            "-e",
            "signal=none",
            "-e",
            f"trace={WRITE_SYSCALLS}",
            "-o",
            str(log),
            "--",
        ],
    )
    gw.start()
    assert gw.proc is not None
    try:
        gw.wait_serving()
        (serving,) = [
            int(c) for c in Path(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children").read_text().split()
        ]
        traced = {serving, *_descendants(serving)}
        assert len(traced) >= 3, "gateway, Triton and at least one Python-backend stub"
        started = time.time()
        photos = canary_photos()
        for name, (data, content_type) in photos.items():
            for fmt in (
                pb.OUTPUT_FORMAT_PNG,
                pb.OUTPUT_FORMAT_WEBP,
                pb.OUTPUT_FORMAT_JPEG,
                pb.OUTPUT_FORMAT_MASK,
            ):
                _, body, _ = stream_remove(gw.target, data, content_type, pb.Options(format=fmt))
                assert body, name
        # Above encode_pool.MIN_PIXELS: the cut-out goes to an encode worker through /dev/shm.
        large = io.BytesIO()
        Image.fromarray(skdata.astronaut()).resize((2000, 1500)).save(large, "JPEG", quality=90)
        for fmt in (pb.OUTPUT_FORMAT_PNG, pb.OUTPUT_FORMAT_WEBP):
            _, body, _ = stream_remove(gw.target, large.getvalue(), "image/jpeg", pb.Options(format=fmt))
            assert body
        jpeg = photos[FILE_NAMES[0]][0]
        with grpc.insecure_channel(gw.target) as channel:
            stub = pb_grpc.BackgroundRemovalStub(channel)
            stub.RemoveBackground(
                pb.RemoveBackgroundRequest(image=jpeg, content_type="image/jpeg"), timeout=60
            )
            with pytest.raises(grpc.RpcError):
                stub.RemoveBackground(
                    pb.RemoveBackgroundRequest(image=jpeg[:5000], content_type="image/jpeg")
                )
        open_fds = _open_fds(traced)
        os.kill(serving, signal.SIGTERM)  # strace passes no signal on: the gateway gets it directly
        assert gw.proc.wait(90) == 0
    finally:
        if gw.proc.poll() is None:
            gw.stop()
    text = log.read_text()
    pids = {int(p) for p in re.findall(r"^(\d+) ", text, re.M)}
    assert traced <= pids, "every process was traced"
    during = [w for w in disk_writes(text, open_fds) if w.time >= started]
    assert during == [], during[:10]
    # The trace is not vacuous: the request phase is in it. The requests' own bytes leave through
    # sockets (sendmsg, sendto or write, depending on the path gRPC takes) and the access log.
    request_phase = [
        line
        for line in text.splitlines()
        if (m := _LINE.match(line)) and m["call"] in SEND_CALLS and float(m["time"]) >= started
    ]
    assert request_phase, _summary(text, started)


def _summary(strace_log: str, since: float) -> str:
    """What the trace holds after `since`, by call, for a failure message."""
    matches = [_LINE.match(line) for line in strace_log.splitlines()]
    calls = collections.Counter(m["call"] for m in matches if m and float(m["time"]) >= since)
    return f"no send or write after requests began; calls seen then: {dict(calls)}; last lines: " + repr(
        strace_log.splitlines()[-5:]
    )


# --- memory ---------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# Freed image buffers go back to the OS once the gateway is idle (see memory.py); what stays is
# allocator and gRPC bookkeeping, a few MiB, and the bound leaves room for it. Without memory.py
# the same burst leaves 400+ MiB behind (measured: 205 MiB warm, 660 MiB after).
RETURN_BOUND_MIB = 64


async def settled_rss(pid: int, bound_mib: float, within_s: float = 10.0) -> float:
    """RSS once it is under `bound_mib`, or the last reading after `within_s`: the gateway returns
    memory a moment after its last call ends, later still on a loaded machine."""
    deadline = time.monotonic() + within_s
    rss = rss_mib(pid)
    while rss >= bound_mib and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        rss = rss_mib(pid)
    return rss


async def test_memory_returns_to_baseline_after_large_and_cancelled_uploads(gateway: GatewayProcess) -> None:
    gw = GatewayProcess(args=["--triton-url", f"127.0.0.1:{gateway.triton_grpc_port}"])
    gw.start()
    assert gw.proc is not None
    try:
        gw.wait_serving()
        pid = gw.proc.pid
        big = io.BytesIO()
        Image.fromarray(skdata.astronaut()).resize((4000, 3000)).save(big, "JPEG", quality=92)
        photo = big.getvalue()
        peak = 0.0

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss_mib(pid))
                await asyncio.sleep(0.05)

        async def one(stub: pb_grpc.BackgroundRemovalStub, fmt: int) -> int:
            size = 0
            async for message in stub.StreamRemoveBackground(
                upload_messages(photo, "image/jpeg", pb.Options(format=fmt), chunk=1 << 20), timeout=300
            ):
                size += len(message.chunk)
            return size

        async def cancelled(stub: pb_grpc.BackgroundRemovalStub, sent: asyncio.Event) -> None:
            hold = asyncio.Event()

            async def messages() -> AsyncIterator[pb.UploadRequest]:
                yield pb.UploadRequest(header=pb.UploadHeader(content_type="image/jpeg", total_size=40 << 20))
                for _ in range(30):
                    yield pb.UploadRequest(chunk=os.urandom(1 << 20))
                sent.set()
                await hold.wait()

            call = stub.StreamRemoveBackground(messages(), timeout=300)
            await sent.wait()
            await asyncio.sleep(1.0)  # the server has read what was sent
            call.cancel()

        options = [("grpc.max_receive_message_length", 64 << 20)]
        async with grpc.aio.insecure_channel(gw.target, options=options) as channel:
            stub = pb_grpc.BackgroundRemovalStub(channel)
            for _ in range(2):  # warm-up: imports, thread pool, first large buffers
                await one(stub, pb.OUTPUT_FORMAT_PNG)
            await asyncio.sleep(1.0)
            warm = rss_mib(pid)
            sampler = asyncio.create_task(sample())
            formats = (
                pb.OUTPUT_FORMAT_PNG,
                pb.OUTPUT_FORMAT_WEBP,
                pb.OUTPUT_FORMAT_JPEG,
                pb.OUTPUT_FORMAT_MASK,
            )
            assert all(await asyncio.gather(*(one(stub, f) for f in formats)))
            burst_peak, peak = peak, 0.0
            after_burst = await settled_rss(pid, warm + RETURN_BOUND_MIB)
            events = [asyncio.Event() for _ in range(4)]
            await asyncio.gather(*(cancelled(stub, e) for e in events))
            cancel_peak = peak
            after_cancel = await settled_rss(pid, warm + RETURN_BOUND_MIB)
            sampler.cancel()
        figures = (
            f"warm {warm:.0f} MiB, burst peak {burst_peak:.0f}, after burst {after_burst:.0f}, "
            f"cancelled-uploads peak {cancel_peak:.0f}, after them {after_cancel:.0f}"
        )
        print(figures)
        # The burst and the uploads really held memory, so returning from them means something.
        assert burst_peak > warm + 200, figures
        assert cancel_peak > warm + 80, figures
        assert after_burst < warm + RETURN_BOUND_MIB, figures
        assert after_cancel < warm + RETURN_BOUND_MIB, figures
        assert gw.health() is not None
    finally:
        gw.stop()
