"""`bgremove remove` against an in-process BackgroundRemoval server defined here: it decodes the upload
with Pillow, refuses what does not decode the way the gateway does, and answers with a transparent
image of the input's size in the requested format."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from PIL import Image

from bgremove import InsecureKeyWarning, cli_remove
from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc
from bgremove_gateway.errors import ServiceError, invalid
from bgremove_gateway.pipeline.encode import encode_zip
from loop_server import LoopThreadServer

_PIL_FORMATS = {
    pb.OUTPUT_FORMAT_UNSPECIFIED: ("PNG", "RGBA", "image/png"),
    pb.OUTPUT_FORMAT_PNG: ("PNG", "RGBA", "image/png"),
    pb.OUTPUT_FORMAT_WEBP: ("WEBP", "RGBA", "image/webp"),
    pb.OUTPUT_FORMAT_MASK: ("PNG", "L", "image/png"),
    pb.OUTPUT_FORMAT_JPEG: ("JPEG", "RGB", "image/jpeg"),
}


@dataclass
class Call:
    header: pb.UploadHeader
    metadata: dict[str, str]


class Servicer(bgremove_pb2_grpc.BackgroundRemovalServicer):
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls: list[Call] = []
        self.delay_s = 0.0
        # Answers UNAVAILABLE with RetryInfo this many times before serving.
        self.busy_first = 0
        self.in_flight = 0
        self.max_in_flight = 0

    async def StreamRemoveBackground(
        self, request_iterator: AsyncIterator[pb.UploadRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ResultChunk]:
        messages = [m async for m in request_iterator]
        header = messages[0].header
        self.calls.append(Call(header, dict(context.invocation_metadata() or ())))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            if self.busy_first > 0:
                self.busy_first -= 1
                await _abort(
                    context, ServiceError(grpc.StatusCode.UNAVAILABLE, "queue full", retry_after_s=0.05)
                )
            try:
                image = Image.open(io.BytesIO(b"".join(m.chunk for m in messages[1:])))
                image.load()
            except Exception:
                await _abort(context, invalid("image", f"cannot decode the {header.content_type} bytes"))
            if header.options.format == pb.OUTPUT_FORMAT_ZIP:
                content_type, body = "application/zip", encode_zip(Image.new("RGBA", image.size))
            else:
                fmt, mode, content_type = _PIL_FORMATS[header.options.format]
                out = io.BytesIO()
                Image.new(mode, image.size).save(out, fmt)
                body = out.getvalue()
        finally:
            self.in_flight -= 1
        yield pb.ResultChunk(
            header=pb.ResultHeader(
                width=image.width, height=image.height, content_type=content_type, size=len(body)
            )
        )
        for i in range(0, len(body), 1000):
            yield pb.ResultChunk(chunk=body[i : i + 1000])


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: ServiceError) -> None:
    status = rpc_status.to_status(error.to_rpc_status())
    await context.abort(status.code, status.details, status.trailing_metadata)


class FakeServer(LoopThreadServer):
    """The CLI runs asyncio.run() in the test's thread, so the server lives on a loop of its own."""

    def __init__(self) -> None:
        self.servicer = Servicer()
        super().__init__(self.servicer)


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.close()


@pytest.fixture
def server(fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    fake_server.servicer.reset()
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "BGREMOVE_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    return fake_server


def image_file(path: Path, size: tuple[int, int], fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path, fmt)
    return path


def cli(*argv: str | Path) -> int:
    parser = argparse.ArgumentParser(prog="bgremove remove")
    cli_remove.add_arguments(parser)
    return cli_remove.run(parser.parse_args([str(a) for a in argv]))


def stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_folder_with_a_corrupt_file_reports_only_it_and_writes_the_others(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in"
    image_file(src / "a.jpg", (64, 48))
    (src / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    image_file(src / "c.webp", (30, 20))
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"

    code = cli(src, "-o", out, "--format", "webp", "--concurrency", "3", "--target", server.target)

    assert code == 1
    assert stderr_lines(capsys) == [f"{src / 'b.png'}: INVALID_ARGUMENT: cannot decode the image/png bytes"]
    assert sorted(p.name for p in out.iterdir()) == ["a.webp", "c.webp"]
    assert Image.open(out / "a.webp").size == (64, 48)
    assert Image.open(out / "c.webp").format == "WEBP"
    assert len(server.servicer.calls) == 3, "the .txt file in the folder is not sent"


def test_single_file_writes_exactly_the_output_file(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = image_file(tmp_path / "photo.jpg", (40, 30))
    out = tmp_path / "new" / "cut.png"
    assert cli(photo, "-o", out, "--target", server.target) == 0
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cut.png", "new", "photo.jpg"]
    cut = Image.open(out)
    assert (cut.format, cut.mode, cut.size) == ("PNG", "RGBA", (40, 30))


@pytest.mark.parametrize(
    ("name", "args", "wire_format", "pil_format"),
    [
        ("cut.webp", [], pb.OUTPUT_FORMAT_WEBP, "WEBP"),
        ("cut.jpg", [], pb.OUTPUT_FORMAT_JPEG, "JPEG"),
        ("cut.JPEG", [], pb.OUTPUT_FORMAT_JPEG, "JPEG"),
        ("cut.jpeg", ["--bg-color", "green"], pb.OUTPUT_FORMAT_JPEG, "JPEG"),
        ("cut", ["--bg-color", "green"], pb.OUTPUT_FORMAT_JPEG, "JPEG"),
        # A cut-out on a colour: PNG or WebP when the output's name says so (opaque).
        ("cut.webp", ["--bg-color", "green"], pb.OUTPUT_FORMAT_WEBP, "WEBP"),
        ("mask.png", ["--format", "mask"], pb.OUTPUT_FORMAT_MASK, "PNG"),
        ("cut.png", [], pb.OUTPUT_FORMAT_PNG, "PNG"),
        # No extension at all: the flag alone says what to write.
        ("cut", ["--format", "webp"], pb.OUTPUT_FORMAT_WEBP, "WEBP"),
    ],
)
def test_format_follows_the_flag_the_colour_or_the_output_name(
    server: FakeServer, tmp_path: Path, name: str, args: list[str], wire_format: int, pil_format: str
) -> None:
    photo = image_file(tmp_path / "photo.png", (20, 10))
    assert cli(photo, "-o", tmp_path / name, "--target", server.target, *args) == 0
    assert server.servicer.calls[0].header.options.format == wire_format
    assert Image.open(tmp_path / name).format == pil_format


def test_single_file_into_an_existing_directory_uses_the_stem(server: FakeServer, tmp_path: Path) -> None:
    photo = image_file(tmp_path / "holiday.jpeg", (16, 16))
    out = tmp_path / "out"
    out.mkdir()
    assert cli(photo, "-o", out, "--format", "jpeg", "--target", server.target) == 0
    assert [p.name for p in out.iterdir()] == ["holiday.jpg"]


def test_several_inputs_need_a_directory(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = image_file(tmp_path / "a.jpg", (8, 8))
    b = image_file(tmp_path / "b.jpg", (8, 8))
    taken = tmp_path / "file.png"
    taken.write_bytes(b"keep")
    assert cli(a, b, "-o", taken, "--target", server.target) == 2
    (line,) = stderr_lines(capsys)
    assert "must be a directory" in line and str(taken) in line
    assert taken.read_bytes() == b"keep"
    assert server.servicer.calls == []

    assert cli(a, b, "-o", tmp_path / "made" / "here", "--target", server.target) == 0
    assert sorted(p.name for p in (tmp_path / "made" / "here").iterdir()) == ["a.png", "b.png"]


def test_inputs_sharing_a_stem_never_overwrite_each_other(server: FakeServer, tmp_path: Path) -> None:
    image_file(tmp_path / "one" / "a.jpg", (10, 10))
    image_file(tmp_path / "one" / "a.png", (20, 20))
    image_file(tmp_path / "two" / "a.jpg", (30, 30))
    out = tmp_path / "out"
    assert cli(tmp_path / "one", tmp_path / "two", "-o", out, "--target", server.target) == 0
    sizes = {p.name: Image.open(p).size for p in out.iterdir()}
    # Folder contents are taken in name order, folders in argument order.
    assert sizes == {"a.png": (10, 10), "a-2.png": (20, 20), "a-3.png": (30, 30)}


def test_writing_into_the_input_folder_keeps_the_inputs(server: FakeServer, tmp_path: Path) -> None:
    image_file(tmp_path / "a.png", (12, 12))
    image_file(tmp_path / "b.jpg", (14, 14))
    before = (tmp_path / "a.png").read_bytes()
    assert cli(tmp_path, "-o", tmp_path, "--target", server.target) == 0
    assert (tmp_path / "a.png").read_bytes() == before
    assert Image.open(tmp_path / "a-2.png").mode == "RGBA"
    assert Image.open(tmp_path / "b.png").size == (14, 14)


def test_single_output_cannot_be_the_input(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = image_file(tmp_path / "a.png", (5, 5))
    before = photo.read_bytes()
    assert cli(photo, "-o", photo, "--target", server.target) == 2
    assert "is the input itself" in capsys.readouterr().err
    assert photo.read_bytes() == before


def test_options_and_api_key_reach_the_server(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = image_file(tmp_path / "a.jpg", (50, 40))
    monkeypatch.setenv("BGREMOVE_API_KEY", "from-env")
    argv = ["--bg-color", "#102030", "--crop", "--crop-margin", "5", "--max-side", "100", "--model", "u2net"]
    assert cli(photo, "-o", tmp_path / "c.jpg", "--target", server.target, *argv) == 0
    assert cli(photo, "-o", tmp_path / "d.png", "--target", server.target, "--api-key", "from-flag") == 0
    first, second = server.servicer.calls
    assert first.header.options == pb.Options(
        format=pb.OUTPUT_FORMAT_JPEG,
        bg_color=pb.Color(r=0x10, g=0x20, b=0x30),
        crop=True,
        crop_margin=5,
        max_output_side=100,
        model="u2net",
    )
    assert first.metadata["authorization"] == "Bearer from-env"
    assert second.metadata["authorization"] == "Bearer from-flag"


def test_remove_bg_flags_reach_the_server(server: FakeServer, tmp_path: Path) -> None:
    photo = image_file(tmp_path / "a.jpg", (50, 40))
    background = image_file(tmp_path / "bg.png", (8, 8))
    argv = [
        "--crop",
        "--crop-margin",
        "10% 3px",
        "--roi",
        "0 10px 50% 100%",
        "--scale",
        "60%",
        "--position",
        "center",
        "--bg-image",
        str(background),
        "--max-output-pixels",
        "250000",
    ]
    assert cli(photo, "-o", tmp_path / "c.png", "--target", server.target, *argv) == 0
    (call,) = server.servicer.calls
    options = call.header.options
    assert options.format == pb.OUTPUT_FORMAT_PNG
    assert options.crop and options.crop_margin == 0
    assert options.crop_margins.top == pb.Length(percent=10) and options.crop_margins.left == pb.Length(px=3)
    assert options.roi.y1 == pb.Length(px=10) and options.roi.x2 == pb.Length(percent=50)
    assert options.scale_percent == 60
    assert options.position.placement == pb.PLACEMENT_CENTER
    assert options.bg_image == background.read_bytes()
    assert options.max_output_pixels == 250_000


def test_zip_output_is_chosen_by_its_extension(server: FakeServer, tmp_path: Path) -> None:
    photo = image_file(tmp_path / "a.jpg", (10, 10))
    assert cli(photo, "-o", tmp_path / "a.zip", "--target", server.target) == 0
    assert server.servicer.calls[0].header.options.format == pb.OUTPUT_FORMAT_ZIP
    with zipfile.ZipFile(tmp_path / "a.zip") as archive:
        assert archive.namelist() == ["color.jpg", "alpha.png"]
    (tmp_path / "out").mkdir()
    assert cli(tmp_path / "a.jpg", "-o", tmp_path / "out", "--format", "zip", "--target", server.target) == 0
    assert zipfile.is_zipfile(tmp_path / "out" / "a.zip")


@pytest.mark.parametrize("concurrency", [1, 3])
def test_concurrency_bounds_the_streams_in_flight(
    server: FakeServer, tmp_path: Path, concurrency: int
) -> None:
    for i in range(6):
        image_file(tmp_path / "in" / f"{i}.png", (8 + i, 8))
    server.servicer.delay_s = 0.15
    args = ("--concurrency", str(concurrency), "--target", server.target)
    assert cli(tmp_path / "in", "-o", tmp_path / "out", *args) == 0
    assert server.servicer.max_in_flight == concurrency
    assert len(list((tmp_path / "out").iterdir())) == 6


def test_server_asking_to_retry_later_is_obeyed(server: FakeServer, tmp_path: Path) -> None:
    photo = image_file(tmp_path / "a.jpg", (9, 9))
    server.servicer.busy_first = 2
    assert cli(photo, "-o", tmp_path / "a.png", "--target", server.target) == 0
    assert len(server.servicer.calls) == 3
    assert Image.open(tmp_path / "a.png").size == (9, 9)


def test_retries_are_bounded(server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photo = image_file(tmp_path / "a.jpg", (9, 9))
    server.servicer.busy_first = 10
    assert cli(photo, "-o", tmp_path / "a.png", "--target", server.target) == 1
    assert stderr_lines(capsys) == [f"{photo}: UNAVAILABLE: queue full"]
    assert len(server.servicer.calls) == cli_remove.MAX_ATTEMPTS


def test_unreachable_server_is_one_line(
    tmp_path: Path, unused_tcp_port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    for name in "abc":
        image_file(tmp_path / "in" / f"{name}.png", (4, 4))
    target = f"127.0.0.1:{unused_tcp_port}"
    assert cli(tmp_path / "in", "-o", tmp_path / "out", "--target", target, "--concurrency", "2") == 1
    (line,) = stderr_lines(capsys)
    assert line.startswith(f"bgremove remove: cannot reach the server at {target}: ")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# TEST-NET-1, for documentation only: nothing answers, and the short deadline ends the one try.
REMOTE = "192.0.2.1:9"


@pytest.mark.parametrize(
    ("argv", "warned"),
    [
        (["--target", REMOTE, "--api-key", "k"], True),
        (["--target", f"dns:///{REMOTE}", "--api-key", "k"], True),
        (["--target", REMOTE], False),  # no key
        (["--target", REMOTE, "--api-key", "k", "--tls"], False),
    ],
)
def test_a_key_in_plaintext_to_another_machine_is_one_warning_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    warned: bool,
    recwarn: pytest.WarningsRecorder,
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("BGREMOVE_API_KEY", raising=False)
    for name in "abc":
        image_file(tmp_path / "in" / f"{name}.png", (4, 4))
    cli(tmp_path / "in", "-o", tmp_path / "out", "--timeout", "0.3", "--concurrency", "3", *argv)
    lines = stderr_lines(capsys)
    said = [line for line in lines if "without TLS" in line]
    # The CLI says it in its own words, once: the library's warning is not shown as well.
    assert not [w for w in recwarn if issubclass(w.category, InsecureKeyWarning)]
    if not warned:
        assert said == [], lines
        return
    assert said == lines[:1], lines
    assert said[0] == (
        f"bgremove remove: warning: the API key is sent without TLS to {argv[1]}, which is not this "
        "machine: anyone on the network path can read it and use it; give --tls (or --tls-ca FILE) "
        "to use TLS"
    )


def test_a_key_to_this_machine_gives_no_warning(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = image_file(tmp_path / "a.jpg", (9, 9))
    for target in (server.target, f"localhost:{server.port}", f"dns:///localhost:{server.port}"):
        assert cli(photo, "-o", tmp_path / "a.png", "--target", target, "--api-key", "k") == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["missing.jpg", "-o", "x.png"], "missing.jpg: no such file or folder"),
        (["{photo}", "-o", "x.png", "--crop-margin", "3"], "--crop-margin needs --crop"),
        (["{photo}", "-o", "m.png", "--format", "mask", "--bg-color", "red"], "--bg-color does not apply"),
        (["{photo}", "-o", "x.zip", "--bg-image", "{photo}"], "--bg-image does not apply to format 'zip'"),
        (["{photo}", "-o", "x.png", "--crop-margin", "10%"], "--crop-margin needs --crop"),
        (["{empty}", "-o", "out"], "no .jpg, .jpeg, .png or .webp files"),
        (["{photo}", "-o", "x.png", "--tls-cert", "c.pem"], "needs both --tls-cert and --tls-key"),
        (["{photo}", "-o", "x.png", "--tls-ca", "nope.pem"], "nope.pem: No such file or directory"),
        # The output's name and the format must agree, or the file would hold what its name denies.
        (["{photo}", "-o", "x.bmp"], "cannot tell the output format from -o x.bmp: .bmp is not a format"),
        (["{photo}", "-o", "x"], "cannot tell the output format from -o x: it has no extension"),
        (["{photo}", "-o", "x.jpg", "--format", "png"], "-o x.jpg does not match --format png: name it .png"),
        (["{photo}", "-o", "x.bmp", "--format", "png"], "-o x.bmp does not match --format png"),
        (["{photo}", "-o", "m.jpg", "--format", "mask"], "does not match --format mask: name it .png"),
        (["{photo}", "-o", "x.png", "--format", "jpeg"], "name it .jpg or .jpeg"),
        (["{photo}", "-o", "x.zip", "--format", "png"], "-o x.zip does not match --format png"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    words: str,
) -> None:
    photo = image_file(tmp_path / "p.jpg", (4, 4))
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    args = [a.format(photo=photo, empty=tmp_path / "empty") for a in argv]
    assert cli(*args, "--target", server.target) == 2
    (line,) = stderr_lines(capsys)
    assert line.startswith("bgremove remove: error: ") and words in line
    assert server.servicer.calls == []


@pytest.mark.parametrize(
    "bad",
    [
        ["--bg-color", "nocolour"],
        ["--concurrency", "0"],
        ["--max-side", "-1"],
        ["--max-output-pixels", "-5"],
        ["--crop-margin", "ten%"],
        ["--crop-margin", "-3"],
        ["--roi", "0 0 10"],
        ["--scale", "200%"],
        ["--position", "top"],
        ["--bg-image", "no-such-file.jpg"],
    ],
)
def test_bad_flag_values_are_refused_by_the_parser(tmp_path: Path, bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli(tmp_path, "-o", tmp_path, *bad)
    assert exited.value.code == 2


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a.png", "b.png", "c.png"):
        image_file(tmp_path / "in" / name, (6, 6))
    (tmp_path / "in" / "z.jpg").write_bytes(b"\xff\xd8\xff broken")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli(tmp_path / "in", "-o", tmp_path / "out", "--target", server.target) == 1
    text = terminal.getvalue()
    assert "4/4" in text
    failures = [line for line in text.replace("\r", "\n").splitlines() if "z.jpg" in line]
    assert failures == [f"{tmp_path / 'in' / 'z.jpg'}: INVALID_ARGUMENT: cannot decode the image/jpeg bytes"]


class _Collector:
    """Just enough of an OTLP/HTTP receiver: keeps each export request's raw body."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                collector.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._http.server_address[1]}"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def spans(self) -> list[tuple[str, Any]]:
        found: list[tuple[str, Any]] = []
        for body in self.bodies:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            for rs in request.resource_spans:
                service = next(
                    a.value.string_value for a in rs.resource.attributes if a.key == "service.name"
                )
                found.extend((service, span) for ss in rs.scope_spans for span in ss.spans)
        return found

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


def test_module_entry_point_exports_its_span_before_exiting(server: FakeServer, tmp_path: Path) -> None:
    photo = image_file(tmp_path / "secret-holiday-name.jpg", (24, 24))
    collector = _Collector()
    try:
        env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint}
        env.pop("OTEL_SERVICE_NAME", None)
        env.pop("OTEL_SDK_DISABLED", None)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bgremove.cli_remove",
                photo,
                "-o",
                tmp_path / "cut.png",
                "--target",
                server.target,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        # The process has exited: its span was flushed on the way out.
        ((service, span),) = collector.spans()
    finally:
        collector.close()
    assert service == "bgremove-cli"
    assert span.name == "bgremove.v1.BackgroundRemoval/StreamRemoveBackground"
    traceparent = server.servicer.calls[0].metadata["traceparent"]
    assert traceparent.split("-")[1:3] == [span.trace_id.hex(), span.span_id.hex()]
    assert all(b"secret-holiday-name" not in body for body in collector.bodies)


def _timed_cli(photo: Path, out: Path, target: str, env: dict[str, str]) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bgremove.cli", "remove", photo, "-o", out, "--target", target],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return time.monotonic() - started, done.stderr


@pytest.mark.parametrize("collector", ["refusing", "silent"])
def test_a_collector_that_is_down_costs_at_most_a_second_and_one_line(
    server: FakeServer, tmp_path: Path, collector: str
) -> None:
    """Refusing: nothing listens on the port. Silent: a listener that never accepts nor answers."""
    photo = image_file(tmp_path / "a.jpg", (16, 16))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        if collector == "silent":
            sock.listen(8)
        else:
            sock.close()
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        untraced, quiet = _timed_cli(photo, tmp_path / "plain.png", server.target, env)
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
        traced, stderr = _timed_cli(photo, tmp_path / "traced.png", server.target, env)
    assert quiet == ""
    (line,) = stderr.splitlines()
    reason = "Connection refused" if collector == "refusing" else "no answer within 1 s"
    assert line == (
        f"bgremove remove: warning: tracing: 1 span was not exported to http://127.0.0.1:{port}/v1/traces: "
        f"{reason}"
    )
    # The exporter's own timeout and retries would add about 8 s.
    assert traced - untraced < 2.0, (traced, untraced)
    assert Image.open(tmp_path / "traced.png").size == (16, 16)
