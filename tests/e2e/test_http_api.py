"""The remove.bg-compatible HTTP API against the real gateway and Triton, driven by curl in remove.bg's
documented forms, plus hostile HTTP: slow, oversized, chunked and malformed bodies, URLs to loopback.

One gateway with --http-listen shares the session's embedded Triton; its upload limits are small so
the hostile cases are quick, and it must still serve a normal request after each of them.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from service_harness import GatewayProcess, OtlpReceiver, free_port

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rembg"
PHOTO = FIXTURES / "car-1.jpg"
MAX_UPLOAD = 1024 * 1024
UPLOAD_TIMEOUT_S = 3


@dataclass
class Http:
    gateway: GatewayProcess
    port: int
    otlp: OtlpReceiver
    metrics_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1.0/removebg"

    def curl(self, *args: str) -> tuple[int, dict[str, str], bytes]:
        """curl's status, response headers (lower-case names) and body."""
        out = subprocess.run(
            ["curl", "-sS", "-D", "-", "-o", "/dev/stdout", *args, self.url],
            capture_output=True,
            timeout=60,
            check=True,
        ).stdout
        head, _, body = out.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split()[1]), headers, body

    def assert_still_serves(self) -> None:
        status, headers, _ = self.curl("-F", f"image_file=@{PHOTO}", "-F", "size=preview")
        assert status == 200 and headers["content-type"] == "image/png"


@pytest.fixture(scope="module")
def http(gateway: GatewayProcess) -> Iterator[Http]:
    port, metrics_port = free_port(), free_port()
    otlp = OtlpReceiver()
    service = GatewayProcess(
        args=[
            "--triton-url",
            f"127.0.0.1:{gateway.triton_grpc_port}",
            "--http-listen",
            f"127.0.0.1:{port}",
            "--http-allow-urls",
            "--max-upload-bytes",
            str(MAX_UPLOAD),
            "--upload-timeout",
            str(UPLOAD_TIMEOUT_S),
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
        ],
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"},
    )
    try:
        with service.serving():
            yield Http(service, port, otlp, metrics_port)
    finally:
        otlp.close()


# --- remove.bg's documented request forms --------------------------------------------------------


def test_multipart_image_file_as_remove_bg_documents_it(http: Http) -> None:
    status, headers, body = http.curl(
        "-H", "X-Api-Key: unused-without-keys", "-F", f"image_file=@{PHOTO}", "-F", "size=auto"
    )
    assert status == 200, body[:300]
    assert headers["content-type"] == "image/png" and body.startswith(b"\x89PNG")
    assert int(headers["x-width"]) > 0 and int(headers["x-height"]) > 0
    assert int(headers["x-foreground-width"]) > 0 and "x-foreground-top" in headers


def test_image_file_b64_form_and_json_bodies_agree(http: Http, tmp_path: Path) -> None:
    b64 = base64.b64encode(PHOTO.read_bytes()).decode()
    field = tmp_path / "field.txt"
    field.write_text(b64)
    status_form, _, form_body = http.curl("-F", f"image_file_b64=<{field}", "-F", "format=png")
    doc = tmp_path / "body.json"
    doc.write_text(json.dumps({"image_file_b64": b64, "format": "png"}))
    status_json, _, json_body = http.curl("-H", "Content-Type: application/json", "-d", f"@{doc}")
    assert status_form == status_json == 200
    assert form_body == json_body


def test_accept_json_answers_the_data_object_with_the_result(http: Http) -> None:
    status, headers, body = http.curl(
        "-H", "Accept: application/json", "-F", f"image_file=@{PHOTO}", "-F", "bg_color=81d4fa"
    )
    assert status == 200 and headers["content-type"] == "application/json"
    data = json.loads(body)["data"]
    assert base64.b64decode(data["result_b64"])[:3] == b"\xff\xd8\xff"  # auto + background: JPEG
    assert data["width"] == int(headers["x-width"])


def test_traceparent_continues_the_callers_trace(http: Http) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    status, _, _ = http.curl(
        "-H", f"traceparent: 00-{trace_id}-00f067aa0ba902b7-01", "-F", f"image_file=@{PHOTO}"
    )
    assert status == 200
    deadline = time.monotonic() + 20
    names: set[str] = set()
    while time.monotonic() < deadline and not {"POST /v1.0/removebg", "infer"} <= names:
        names = {s.name for s in http.otlp.trace(trace_id)}
        time.sleep(0.2)
    assert {"POST /v1.0/removebg", "decode", "infer", "encode"} <= names, names
    server = next(s for s in http.otlp.trace(trace_id) if s.name == "POST /v1.0/removebg")
    assert server.parent_id == "00f067aa0ba902b7"


def test_calls_are_counted_under_the_http_method(http: Http) -> None:
    http.assert_still_serves()
    text = urllib.request.urlopen(f"http://127.0.0.1:{http.metrics_port}/metrics", timeout=10).read().decode()
    assert any(
        line.startswith("bgremove_calls_total{") and 'method="http:removebg"' in line and 'code="OK"' in line
        for line in text.splitlines()
    ), text[:2000]


def test_access_log_lines_carry_no_file_name(http: Http, tmp_path: Path) -> None:
    secret = tmp_path / "my-secret-holiday.jpg"
    secret.write_bytes(PHOTO.read_bytes())
    status, _, _ = http.curl("-F", f"image_file=@{secret}", "-F", "roi=0% 0% 100% 100%")
    assert status == 200
    time.sleep(0.5)
    log = http.gateway.log_text()
    assert "method=http:removebg" in log
    assert "my-secret-holiday" not in log and "roi" not in log
    assert "POST /v1.0/removebg HTTP/1.1" not in log  # uvicorn's own request lines are off


# --- hostile HTTP ---------------------------------------------------------------------------------


def raw_request(port: int, head: bytes, body_parts: list[bytes], pause_s: float = 0.0) -> tuple[bytes, float]:
    """Sends a request by hand (chunked or trickled) from a thread; the answer and the seconds it took."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(head)

        def send() -> None:
            try:
                for part in body_parts:
                    sock.sendall(part)
                    time.sleep(pause_s)
            except OSError:
                pass  # the server answered and closed before the body was all sent

        threading.Thread(target=send, daemon=True).start()
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                break
        return answer, time.monotonic() - started


def status_of(answer: bytes) -> int:
    return int(answer.split(b"\r\n", 1)[0].split()[1])


def test_declared_length_over_the_limit_is_413_before_reading(http: Http) -> None:
    head = (
        b"POST /v1.0/removebg HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 999999999\r\n\r\n"
    )
    answer, _ = raw_request(http.port, head, [])
    assert status_of(answer) == 413 and b"over the limit of" in answer
    http.assert_still_serves()


def test_chunked_body_is_counted_as_it_streams(http: Http) -> None:
    head = (
        b"POST /v1.0/removebg HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"a" * 65536
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    answer, _ = raw_request(http.port, head, [chunk] * (3 * MAX_UPLOAD // len(piece)))
    assert status_of(answer) == 413 and b"so far" in answer
    http.assert_still_serves()


def test_a_slow_body_gets_408_at_the_upload_timeout(http: Http) -> None:
    body = b'{"image_file_b64": "' + b"A" * 40 + b'"}'
    head = (
        b"POST /v1.0/removebg HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    answer, took = raw_request(
        http.port, head, [body[i : i + 4] for i in range(0, len(body), 4)], pause_s=0.5
    )
    assert status_of(answer) == 408 and b"upload timeout" in answer
    assert UPLOAD_TIMEOUT_S <= took < UPLOAD_TIMEOUT_S + 3
    http.assert_still_serves()


@pytest.mark.parametrize(
    ("args", "status", "text"),
    [
        (
            ["-H", "Content-Type: multipart/form-data; boundary=xyz", "--data-binary", "--xyz\r\nbroken"],
            400,
            "multipart",
        ),
        (["-H", "Content-Type: text/plain", "-d", "hello"], 415, "multipart/form-data"),
        (["-H", "Content-Type: application/json", "-d", "[1, 2"], 400, "JSON"),
        (["-F", "size=preview"], 400, "image_file"),
        (["-F", "image_file_b64=!!notbase64!!"], 400, "base64"),
    ],
)
def test_malformed_requests_get_a_precise_4xx(http: Http, args: list[str], status: int, text: str) -> None:
    got, _, body = http.curl(*args)
    assert got == status, body[:300]
    (error,) = json.loads(body)["errors"]
    assert text in error["detail"]
    http.assert_still_serves()


class Loopback:
    """An HTTP server on loopback holding a photo: what image_url must never reach."""

    def __init__(self) -> None:
        data = PHOTO.read_bytes()
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_image_url_to_loopback_is_refused_without_a_connection(http: Http) -> None:
    target = Loopback()
    try:
        for url in (f"http://127.0.0.1:{target.port}/photo.jpg", f"http://localhost:{target.port}/photo.jpg"):
            status, _, body = http.curl("-F", f"image_url={url}")
            assert status == 400, body[:300]
            assert "not a public address" in json.loads(body)["errors"][0]["detail"]
        assert target.hits == 0
    finally:
        target.close()


def test_sigterm_lets_a_request_in_flight_finish_then_closes_the_port(gateway: GatewayProcess) -> None:
    port = free_port()
    service = GatewayProcess(
        args=["--triton-url", f"127.0.0.1:{gateway.triton_grpc_port}", "--http-listen", f"127.0.0.1:{port}"]
    )
    with service.serving():
        body = (
            b'--b\r\nContent-Disposition: form-data; name="image_file"; filename="x.jpg"\r\n\r\n'
            + PHOTO.read_bytes()
            + b"\r\n--b--\r\n"
        )
        head = (
            b"POST /v1.0/removebg HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(head + body[: len(body) // 2])
            time.sleep(0.5)  # the request is in flight, its body half read
            assert service.proc is not None
            service.proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            sock.sendall(body[len(body) // 2 :])
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert b"\r\n\r\n\x89PNG" in answer
        assert service.proc.wait(60) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
