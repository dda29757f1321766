"""The Python client against an in-process BackgroundRemoval server defined here, which records what
arrives on the wire and answers with known bytes or statuses."""

from __future__ import annotations

import asyncio
import hashlib
import io
import shutil
import subprocess
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from PIL import Image
from skimage import data as skdata

from bgremove import (
    AsyncClient,
    BgRemoveError,
    Client,
    FieldViolation,
    InsecureKeyWarning,
    RemovalResult,
    RemoveOptions,
    remove,
)
from bgremove.channel import is_local_target
from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc
from bgremove_gateway.errors import ServiceError, invalid
from loop_server import LoopThreadServer


def encoded(fmt: str, size: tuple[int, int] = (300, 200)) -> bytes:
    image = Image.fromarray(skdata.astronaut()).resize(size)  # type: ignore[no-untyped-call]
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


JPEG = encoded("JPEG", (512, 512))


@dataclass
class Received:
    messages: list[pb.UploadRequest]
    metadata: dict[str, str]

    @property
    def header(self) -> pb.UploadHeader:
        return self.messages[0].header

    @property
    def chunks(self) -> list[bytes]:
        return [m.chunk for m in self.messages[1:]]


Handler = Callable[[Received, grpc.aio.ServicerContext[Any, Any]], Awaitable[list[pb.ResultChunk]]]


def answer(body: bytes, *, chunk: int = 1000, **header: Any) -> list[pb.ResultChunk]:
    head = pb.ResultHeader(**{"size": len(body), **header})
    return [pb.ResultChunk(header=head)] + [
        pb.ResultChunk(chunk=body[i : i + chunk]) for i in range(0, len(body), chunk)
    ]


def known_result(upload: bytes) -> bytes:
    """What the default handler answers: depends on the upload, so a mixed-up answer shows."""
    return b"cutout:" * 500 + hashlib.sha256(upload).digest()


async def default_handler(got: Received, context: grpc.aio.ServicerContext[Any, Any]) -> list[pb.ResultChunk]:
    return answer(
        known_result(b"".join(got.chunks)),
        width=640,
        height=480,
        content_type="image/png",
        foreground=pb.BoundingBox(x=10, y=20, width=30, height=40),
        model="u2netp",
        input_width=1280,
        input_height=960,
    )


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: ServiceError) -> None:
    """Fails the call the way the gateway does: status, message and google.rpc details trailer."""
    status = rpc_status.to_status(error.to_rpc_status())
    await context.abort(status.code, status.details, status.trailing_metadata)


class Recorder(bgremove_pb2_grpc.BackgroundRemovalServicer):
    def __init__(self) -> None:
        self.calls: list[Received] = []
        self.handler: Handler = default_handler

    async def StreamRemoveBackground(
        self, request_iterator: AsyncIterator[pb.UploadRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ResultChunk]:
        got = Received([m async for m in request_iterator], dict(context.invocation_metadata() or ()))
        self.calls.append(got)
        for message in await self.handler(got, context):
            yield message

    async def GetServiceInfo(
        self, request: pb.GetServiceInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetServiceInfoResponse:
        self.calls.append(Received([], dict(context.invocation_metadata() or ())))
        return pb.GetServiceInfoResponse(default_model="u2netp", version="test")


class FakeServer(LoopThreadServer):
    """Sync clients and asyncio tests can both call it: it runs on a loop of its own."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None) -> None:
        self.servicer = Recorder()
        super().__init__(self.servicer, credentials)

    def reset(self, handler: Handler = default_handler) -> None:
        self.servicer.calls.clear()
        self.servicer.handler = handler


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.close()


@pytest.fixture
def server(fake_server: FakeServer) -> FakeServer:
    fake_server.reset()
    return fake_server


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def sync_remove(target: str, image: Any, options: RemoveOptions | None = None, **kw: Any) -> RemovalResult:
    with Client(target, **kw) as client:
        return client.remove(image, options)


async def async_remove(
    target: str, image: Any, options: RemoveOptions | None = None, **kw: Any
) -> RemovalResult:
    async with AsyncClient(target, **kw) as client:
        return await client.remove(image, options)


async def either(
    kind: str, target: str, image: Any, options: RemoveOptions | None = None, **kw: Any
) -> RemovalResult:
    """The same call through the sync client (in a thread: it blocks) or the asyncio one."""
    if kind == "sync":
        return await asyncio.to_thread(sync_remove, target, image, options, **kw)
    return await async_remove(target, image, options, **kw)


KINDS = pytest.mark.parametrize("kind", ["sync", "async"])


@KINDS
async def test_upload_is_header_then_bounded_chunks_of_the_exact_image(kind: str, server: FakeServer) -> None:
    options = RemoveOptions(
        format="jpeg", bg_color="#00ff7f", crop=True, crop_margin=8, max_output_side=256, model="m"
    )
    await either(kind, server.target, JPEG, options, chunk_size=7001)

    (got,) = server.servicer.calls
    assert got.messages[0].WhichOneof("payload") == "header"
    assert all(m.WhichOneof("payload") == "chunk" for m in got.messages[1:])
    header = got.header
    assert header.content_type == "image/jpeg"
    assert header.total_size == len(JPEG)
    assert header.sha256 == hashlib.sha256(JPEG).digest()
    assert header.options == pb.Options(
        format=pb.OUTPUT_FORMAT_JPEG,
        bg_color=pb.Color(r=0, g=255, b=127),
        crop=True,
        crop_margin=8,
        max_output_side=256,
        model="m",
    )
    assert max(len(c) for c in got.chunks) == 7001
    assert b"".join(got.chunks) == JPEG
    assert len(got.chunks) == -(-len(JPEG) // 7001)


@KINDS
async def test_result_is_reassembled_with_its_header(kind: str, server: FakeServer) -> None:
    result = await either(kind, server.target, JPEG)
    assert result.data == known_result(JPEG)
    assert (result.width, result.height, result.content_type) == (640, 480, "image/png")
    assert result.foreground == (10, 20, 30, 40)
    assert (result.model, result.input_width, result.input_height) == ("u2netp", 1280, 960)


async def test_default_options_ask_for_a_png_cutout(server: FakeServer) -> None:
    await either("async", server.target, JPEG)
    assert server.servicer.calls[0].header.options == pb.Options(format=pb.OUTPUT_FORMAT_PNG)


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (encoded("PNG"), "image/png"),
        (encoded("WEBP"), "image/webp"),
        (JPEG, "image/jpeg"),
        # No supported type: declared as one the server takes at the header, so that its own
        # sniffing of the bytes answers ("image/gif images are not supported").
        (b"GIF89a" + b"\0" * 64, "image/png"),
        (b"plain text", "image/png"),
    ],
)
async def test_content_type_is_sniffed_from_magic_bytes(
    data: bytes, content_type: str, server: FakeServer
) -> None:
    await either("async", server.target, data)
    got = server.servicer.calls[0]
    assert got.header.content_type == content_type
    assert got.header.total_size == len(data) == len(b"".join(got.chunks))


@KINDS
async def test_an_empty_image_is_refused_before_any_call(kind: str, server: FakeServer) -> None:
    with pytest.raises(BgRemoveError) as caught:
        await either(kind, server.target, b"")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message == "the image is empty (0 bytes)"
    assert server.servicer.calls == []


async def test_explicit_content_type_wins(server: FakeServer) -> None:
    async with AsyncClient(server.target) as client:
        await client.remove(JPEG, content_type="image/png")
    assert server.servicer.calls[0].header.content_type == "image/png"


@KINDS
async def test_a_path_is_read_and_sent(kind: str, server: FakeServer, tmp_path: Path) -> None:
    photo = tmp_path / "photo.webp"
    photo.write_bytes(encoded("WEBP"))
    for image in (photo, str(photo)):
        result = await either(kind, server.target, image)
        assert result.data == known_result(photo.read_bytes())
    assert [c.header.content_type for c in server.servicer.calls] == ["image/webp", "image/webp"]


@KINDS
async def test_server_error_keeps_code_message_and_field_violations(kind: str, server: FakeServer) -> None:
    async def refuse(got: Received, context: grpc.aio.ServicerContext[Any, Any]) -> list[pb.ResultChunk]:
        await abort_with(
            context, invalid("options.crop_margin", "crop_margin 99999 exceeds the limit of 4096")
        )
        return []

    server.reset(refuse)
    with pytest.raises(BgRemoveError) as caught:
        await either(kind, server.target, JPEG)
    error = caught.value
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "crop_margin 99999 exceeds the limit of 4096"
    assert error.violations == (
        FieldViolation("options.crop_margin", "crop_margin 99999 exceeds the limit of 4096"),
    )
    assert error.retry_after_s is None
    assert str(error) == "INVALID_ARGUMENT: crop_margin 99999 exceeds the limit of 4096"


async def test_retry_info_is_parsed(server: FakeServer) -> None:
    async def busy(got: Received, context: grpc.aio.ServicerContext[Any, Any]) -> list[pb.ResultChunk]:
        await abort_with(
            context, ServiceError(grpc.StatusCode.UNAVAILABLE, "model not ready", retry_after_s=1.5)
        )
        return []

    server.reset(busy)
    with pytest.raises(BgRemoveError) as caught:
        await either("async", server.target, JPEG)
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert caught.value.retry_after_s == 1.5
    assert caught.value.violations == ()


async def test_plain_status_without_details(server: FakeServer) -> None:
    async def plain(got: Received, context: grpc.aio.ServicerContext[Any, Any]) -> list[pb.ResultChunk]:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        return []

    server.reset(plain)
    with pytest.raises(BgRemoveError) as caught:
        await either("sync", server.target, JPEG)
    assert (caught.value.code, caught.value.message, caught.value.details) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "no",
        (),
    )


def _malformed(messages: list[pb.ResultChunk]) -> Handler:
    async def handler(got: Received, context: grpc.aio.ServicerContext[Any, Any]) -> list[pb.ResultChunk]:
        return messages

    return handler


@KINDS
@pytest.mark.parametrize(
    ("messages", "code", "words"),
    [
        ([], grpc.StatusCode.INTERNAL, "without a result header"),
        ([pb.ResultChunk(chunk=b"x")], grpc.StatusCode.INTERNAL, "before the header"),
        ([*answer(b"abc"), pb.ResultChunk(header=pb.ResultHeader())], grpc.StatusCode.INTERNAL, "second"),
        (answer(b"abc", size=10), grpc.StatusCode.DATA_LOSS, "3 bytes but its header announced 10"),
        ([*answer(b"abc"), pb.ResultChunk(chunk=b"more")], grpc.StatusCode.DATA_LOSS, "more than the 3"),
        ([pb.ResultChunk()], grpc.StatusCode.INTERNAL, "empty result message"),
    ],
)
async def test_malformed_answer_is_an_error(
    kind: str, messages: list[pb.ResultChunk], code: grpc.StatusCode, words: str, server: FakeServer
) -> None:
    server.reset(_malformed(messages))
    with pytest.raises(BgRemoveError) as caught:
        await either(kind, server.target, JPEG)
    assert caught.value.code is code
    assert words in caught.value.message


@KINDS
async def test_deadline(kind: str, server: FakeServer) -> None:
    async def slow(got: Received, context: grpc.aio.ServicerContext[Any, Any]) -> list[pb.ResultChunk]:
        await asyncio.sleep(5)
        return []

    server.reset(slow)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(BgRemoveError) as caught:
        await either(kind, server.target, JPEG, timeout=0.3)
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert loop.time() - started < 3


@KINDS
async def test_unreachable_server_is_unavailable(kind: str, unused_tcp_port: int) -> None:
    with pytest.raises(BgRemoveError) as caught:
        await either(kind, f"127.0.0.1:{unused_tcp_port}", JPEG, timeout=5)
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE


@KINDS
async def test_api_key_is_a_bearer_token(kind: str, server: FakeServer) -> None:
    await either(kind, server.target, JPEG, api_key="s3cret")
    await either(kind, server.target, JPEG)
    with_key, without = server.servicer.calls
    assert with_key.metadata["authorization"] == "Bearer s3cret"
    assert "authorization" not in without.metadata


@KINDS
async def test_traceparent_carries_the_client_span(
    kind: str, server: FakeServer, spans: tuple[TracerProvider, InMemorySpanExporter], tmp_path: Path
) -> None:
    provider, exporter = spans
    photo = tmp_path / "holiday-secret-name.jpg"
    photo.write_bytes(JPEG)
    await either(kind, server.target, photo, tracer_provider=provider)

    (span,) = exporter.get_finished_spans()
    assert span.name == "bgremove.v1.BackgroundRemoval/StreamRemoveBackground"
    assert span.kind is SpanKind.CLIENT
    attrs = dict(span.attributes or {})
    assert attrs["rpc.system"] == "grpc"
    assert attrs["rpc.service"] == "bgremove.v1.BackgroundRemoval"
    assert attrs["rpc.method"] == "StreamRemoveBackground"
    assert attrs["rpc.grpc.status_code"] == 0
    assert attrs["bgremove.upload.size"] == len(JPEG)
    assert attrs["bgremove.result.size"] == len(known_result(JPEG))
    assert not any("holiday" in str(v) or "tmp" in str(v) for v in attrs.values())

    version, trace_id, parent_id, flags = server.servicer.calls[0].metadata["traceparent"].split("-")
    assert span.context is not None
    assert int(trace_id, 16) == span.context.trace_id
    assert int(parent_id, 16) == span.context.span_id
    assert version == "00"
    assert int(flags, 16) & 0x01, "sampled flag set"


async def test_failed_call_span_has_the_status_code_but_not_the_message(
    server: FakeServer, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    async def refuse(got: Received, context: grpc.aio.ServicerContext[Any, Any]) -> list[pb.ResultChunk]:
        await abort_with(context, invalid("image", "image is not a JPEG, PNG or WebP"))
        return []

    server.reset(refuse)
    provider, exporter = spans
    with pytest.raises(BgRemoveError):
        await either("async", server.target, JPEG, tracer_provider=provider)
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "INVALID_ARGUMENT"
    assert dict(span.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_concurrent_calls_share_one_async_client(server: FakeServer) -> None:
    images = [encoded("PNG", (50 + i, 40)) for i in range(8)]
    async with AsyncClient(server.target, chunk_size=4096) as client:
        results = await asyncio.gather(*(client.remove(img) for img in images))
    assert [r.data for r in results] == [known_result(img) for img in images]


async def test_service_info(server: FakeServer) -> None:
    async with AsyncClient(server.target, api_key="k") as client:
        info = await client.service_info()
    with Client(server.target) as sync_client:
        sync_info = await asyncio.to_thread(sync_client.service_info)
    assert info.default_model == sync_info.default_model == "u2netp"
    assert server.servicer.calls[0].metadata["authorization"] == "Bearer k"


async def test_module_level_remove(server: FakeServer) -> None:
    result = await asyncio.to_thread(remove, JPEG, RemoveOptions(format="mask"), target=server.target)
    assert result.data == known_result(JPEG)
    assert server.servicer.calls[0].header.options.format == pb.OUTPUT_FORMAT_MASK


@pytest.mark.parametrize(
    ("color", "rgb"),
    [
        ("#00ff00", (0, 255, 0)),
        ("white", (255, 255, 255)),
        ("#abc", (0xAA, 0xBB, 0xCC)),
        ((1, 2, 3), (1, 2, 3)),
    ],
)
def test_bg_color_forms(color: Any, rgb: tuple[int, int, int]) -> None:
    proto = RemoveOptions(format="jpeg", bg_color=color).to_proto()
    assert (proto.bg_color.r, proto.bg_color.g, proto.bg_color.b) == rgb
    assert proto.HasField("bg_color")


def test_no_bg_color_leaves_the_field_unset() -> None:
    assert not RemoveOptions(format="jpeg").to_proto().HasField("bg_color")


def test_remove_bg_forms_reach_the_wire(tmp_path: Path) -> None:
    background = tmp_path / "bg.jpg"
    background.write_bytes(b"\xff\xd8\xffbackground")
    proto = RemoveOptions(
        format="webp",
        bg_color="white",
        bg_image=background,
        crop=True,
        crop_margin="10% 30px",
        roi="10% 0 90% 100px",
        scale="50%",
        position="20% 80%",
        max_output_pixels=250_000,
    ).to_proto()
    assert proto.bg_image == b"\xff\xd8\xffbackground" and proto.HasField("bg_color")
    assert proto.crop_margin == 0
    assert proto.crop_margins == pb.Margins(
        top=pb.Length(percent=10), right=pb.Length(px=30), bottom=pb.Length(percent=10), left=pb.Length(px=30)
    )
    assert proto.roi == pb.Region(
        x1=pb.Length(percent=10), y1=pb.Length(px=0), x2=pb.Length(percent=90), y2=pb.Length(px=100)
    )
    assert proto.scale_percent == 50
    assert proto.position == pb.Position(placement=pb.PLACEMENT_PERCENT, x_percent=20, y_percent=80)
    assert proto.max_output_pixels == 250_000


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        ("original", pb.Position(placement=pb.PLACEMENT_ORIGINAL)),
        ("center", pb.Position(placement=pb.PLACEMENT_CENTER)),
        ("30%", pb.Position(placement=pb.PLACEMENT_PERCENT, x_percent=30, y_percent=30)),
        ((0, 100), pb.Position(placement=pb.PLACEMENT_PERCENT, x_percent=0, y_percent=100)),
    ],
)
def test_position_forms(position: Any, expected: pb.Position) -> None:
    assert RemoveOptions(position=position).to_proto().position == expected


def test_bg_image_bytes_stay_out_of_the_repr() -> None:
    assert "secret-pixels" not in repr(RemoveOptions(bg_image=b"secret-pixels"))


def test_defaults_send_none_of_the_remove_bg_options() -> None:
    # Unset options must stay unset on the wire: the server's defaults are byte-identical to before.
    assert RemoveOptions().to_proto() == pb.Options(format=pb.OUTPUT_FORMAT_PNG)
    assert RemoveOptions(crop=True, crop_margin=4).to_proto() == pb.Options(
        format=pb.OUTPUT_FORMAT_PNG, crop=True, crop_margin=4
    )
    assert RemoveOptions(scale="original").to_proto().scale_percent == 0


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"format": "gif"}, "format 'gif' is not one of png, webp, mask, jpeg, zip"),
        ({"format": "jpeg", "bg_color": "no-such-colour"}, "is not a colour"),
        ({"format": "jpeg", "bg_color": "#ff000080"}, "translucent"),
        ({"format": "jpeg", "bg_color": (0, 0, 256)}, "three integers 0..255"),
        ({"format": "mask", "bg_color": "white"}, "bg_color does not apply to format 'mask'"),
        ({"format": "zip", "bg_image": b"x"}, "bg_image does not apply to format 'zip'"),
        ({"crop": True, "crop_margin": -1}, "crop_margin must be 0 or more"),
        ({"crop_margin": 5}, "crop_margin needs crop=True"),
        ({"crop_margin": "10%"}, "crop_margin needs crop=True"),
        ({"crop": True, "crop_margin": "-1%"}, "percentage of 0% or more"),
        ({"crop": True, "crop_margin": "1px 2px 3px"}, "has 3 values; it takes 1 or 2 or 4"),
        ({"crop": True, "crop_margin": "ten"}, "is not a length"),
        ({"max_output_side": -2}, "max_output_side must be 0"),
        ({"max_output_pixels": -1}, "max_output_pixels must be 0"),
        ({"roi": "0 0 50%"}, "roi '0 0 50%' has 3 values"),
        ({"roi": "0 0 150% 10"}, "from 0% to 100%"),
        ({"scale": "5%"}, "scale 5 must be 'original' (0) or 10% to 100%"),
        ({"scale": "big"}, "is not 'original' or a percentage"),
        ({"position": "left"}, "position 'left' is not 'original', 'center'"),
        ({"position": "120%"}, "from 0% to 100%"),
    ],
)
def test_impossible_options_fail_locally(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        RemoveOptions(**kwargs)


def test_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        Client(chunk_size=0)


def test_save_writes_the_bytes_and_leaves_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "cut.png"
    out.write_bytes(b"old")
    RemovalResult(b"new-result", "image/png", 1, 1, None, "u2netp", 1, 1).save(out)
    assert out.read_bytes() == b"new-result"
    assert [p.name for p in tmp_path.iterdir()] == ["cut.png"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "1", "-extfile", "san.ext", "-out", f"{name}.pem", cwd=d)  # fmt: skip
    return {p.name: p.read_bytes() for p in d.iterdir() if p.suffix in {".pem", ".key"}}


@KINDS
async def test_mutual_tls(kind: str, pki: dict[str, bytes]) -> None:
    creds = grpc.ssl_server_credentials(
        [(pki["server.key"], pki["server.pem"])], root_certificates=pki["ca.pem"], require_client_auth=True
    )
    server = FakeServer(credentials=creds)
    try:
        result = await either(
            kind,
            server.target,
            JPEG,
            root_certificates=pki["ca.pem"],
            certificate_chain=pki["client.pem"],
            private_key=pki["client.key"],
        )
        assert result.data == known_result(JPEG)
        # Without a client certificate the handshake fails before any request is read.
        with pytest.raises(BgRemoveError) as caught:
            await either(kind, server.target, JPEG, root_certificates=pki["ca.pem"], timeout=5)
        assert caught.value.code is grpc.StatusCode.UNAVAILABLE
        assert len(server.servicer.calls) == 1
    finally:
        server.close()


def test_half_a_client_certificate_is_refused() -> None:
    with pytest.raises(ValueError, match="both certificate_chain and private_key"):
        Client(certificate_chain=b"x")


# --- an API key in plaintext ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "local"),
    [
        ("localhost:50051", True),
        ("LOCALHOST.:50051", True),
        ("localhost", True),
        ("127.0.0.1:50051", True),
        ("127.8.9.10:1", True),
        ("[::1]:50051", True),
        ("::1", True),
        ("[::ffff:127.0.0.1]:50051", True),
        ("dns:///localhost:50051", True),
        ("dns://8.8.8.8/127.0.0.1:50051", True),
        ("dns:localhost:50051", True),
        ("ipv4:127.0.0.1:50051", True),
        ("ipv4:127.0.0.1:50051,127.0.0.2:50051", True),
        ("ipv6:[::1]:50051", True),
        ("unix:/run/bgremove.sock", True),
        ("unix:///run/bgremove.sock", True),
        ("unix-abstract:bgremove", True),
        ("bgremove.example.com:443", False),
        ("10.0.0.5:50051", False),
        ("[2001:db8::1]:50051", False),
        ("dns:///bgremove.internal:50051", False),
        ("dns://127.0.0.1/bgremove.internal:50051", False),  # a local DNS server, a remote target
        ("ipv4:127.0.0.1:50051,10.0.0.5:50051", False),
        ("ipv6:[2001:db8::1]:50051", False),
        ("localhost.example.com:50051", False),
        ("xds:///bgremove", False),
        ("0.0.0.0:50051", False),
    ],
)
def test_which_targets_are_this_machine(target: str, local: bool) -> None:
    assert is_local_target(target) is local


REMOTE = "192.0.2.1:50051"  # TEST-NET-1: documentation only; a channel dials nothing until a call


@KINDS
async def test_a_key_in_plaintext_to_another_machine_warns_once_per_client(kind: str) -> None:
    make = Client if kind == "sync" else AsyncClient
    key = "bgr_0123456789ab_" + "s" * 43
    with pytest.warns(InsecureKeyWarning) as caught:
        client = make(REMOTE, api_key=key)
    (warning,) = caught
    assert warning.filename == __file__  # the caller's line, not the library's
    text = str(warning.message)
    assert f"sent without TLS to {REMOTE}" in text and "tls=True" in text and "s" * 43 not in text
    assert "\n" not in text
    if isinstance(client, AsyncClient):
        await client.close()
    else:
        client.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target": REMOTE},  # no key
        {"target": REMOTE, "api_key": "k", "tls": True},
        {"target": "127.0.0.1:50051", "api_key": "k"},
        {"target": "[::1]:50051", "api_key": "k"},
        {"target": "unix:/run/bgremove.sock", "api_key": "k"},
    ],
)
def test_no_warning_without_a_key_with_tls_or_on_this_machine(kwargs: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Client(**kwargs).close()


def test_the_one_shot_remove_warns_at_its_callers_line(tmp_path: Path) -> None:
    # A file that is not there: remove() makes its client, then fails before any call.
    with pytest.warns(InsecureKeyWarning) as caught, pytest.raises(FileNotFoundError):
        remove(tmp_path / "missing.jpg", target=REMOTE, api_key="k")
    assert [w.filename for w in caught] == [__file__]
