"""A request body as form fields and files, read in memory only, within size and time limits.

Three encodings, as remove.bg takes them: multipart/form-data, application/x-www-form-urlencoded and
JSON. Multipart is parsed here with python-multipart's streaming parser, chunk by chunk as the body
arrives, into bytearrays: Starlette's own form parser spools files over 1 MiB to a temporary file,
and no image may ever reach the disk.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Final

import grpc
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from bgremove_gateway.errors import FieldViolation
from bgremove_gateway.http.responses import BODY_TIMEOUT, TOO_LARGE, UNSUPPORTED_MEDIA, HttpError, HttpStatus

ACCEPTED_TYPES: Final = ("multipart/form-data", "application/x-www-form-urlencoded", "application/json")
# Parts of a multipart body: remove.bg has about twenty parameters, so far more is not a request.
MAX_PARTS: Final = 64
# One part's headers (Content-Disposition with a file name, Content-Type).
MAX_PART_HEADER_BYTES: Final = 8 * 1024
BAD_REQUEST: Final = HttpStatus(400, "Invalid request", "invalid_request")
# Parameters that are files, bytes kept as sent, whether or not the part names a filename.
FILE_PARAMETERS: Final = ("image_file", "bg_image_file")


def bad_body(message: str) -> HttpError:
    return HttpError(grpc.StatusCode.INVALID_ARGUMENT, message, [FieldViolation("body", message)])


def too_large(message: str) -> HttpError:
    return HttpError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, message, [FieldViolation("body", message)], http=TOO_LARGE
    )


@dataclass
class Form:
    """Text fields and file parts by name; a name sent twice is refused (remove.bg takes one each)."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)

    def add_field(self, name: str, value: str) -> None:
        self._new(name)
        self.fields[name] = value

    def add_file(self, name: str, data: bytes) -> None:
        self._new(name)
        self.files[name] = data

    def _new(self, name: str) -> None:
        if name in self.fields or name in self.files:
            raise bad_body(f"parameter {name!r} was sent more than once: send each parameter once")


def media_type(content_type: str) -> tuple[str, dict[bytes, bytes]]:
    kind, params = parse_options_header(content_type)
    return kind.decode("latin-1").lower(), params


def check_media_type(content_type: str | None) -> str:
    """The body's media type when it is one of ACCEPTED_TYPES; 415 naming them otherwise."""
    kind = media_type(content_type or "")[0]
    if kind not in ACCEPTED_TYPES:
        shown = repr(kind) if kind else "missing"
        message = f"Content-Type {shown} is not accepted; send one of {', '.join(ACCEPTED_TYPES)}"
        raise HttpError(
            grpc.StatusCode.INVALID_ARGUMENT,
            message,
            [FieldViolation("Content-Type", message)],
            http=UNSUPPORTED_MEDIA,
        )
    return kind


def check_declared_length(content_length: str | None, max_body_bytes: int) -> None:
    """413 before a byte of the body is read when Content-Length is over the limit."""
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError:
        raise bad_body(f"Content-Length {content_length!r} is not a number of bytes") from None
    if declared > max_body_bytes:
        raise too_large(f"request body of {declared} bytes is over the limit of {max_body_bytes} bytes")


async def read_chunks(
    chunks: AsyncIterator[bytes], max_body_bytes: int, timeout_s: float, charge: Callable[[int], None]
) -> AsyncIterator[bytes]:
    """The body's chunks, counted as they stream (chunked bodies declare no length), the whole body
    within `timeout_s`; `charge` sees each chunk's size before it is kept (the memory budget)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    received = 0
    iterator = aiter(chunks)
    while True:
        left = deadline - loop.time()
        try:
            chunk = await asyncio.wait_for(anext(iterator), timeout=max(0.0, left))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:  # not the builtin on Python 3.10
            message = f"request body not complete within the upload timeout of {timeout_s:g} s"
            raise HttpError(grpc.StatusCode.DEADLINE_EXCEEDED, message, http=BODY_TIMEOUT) from None
        received += len(chunk)
        if received > max_body_bytes:
            raise too_large(
                f"request body is over the limit of {max_body_bytes} bytes ({received} bytes so far)"
            )
        if chunk:
            charge(len(chunk))
            yield chunk


class _Multipart:
    """python-multipart's callbacks, collecting each part into a bytearray."""

    def __init__(self, form: Form) -> None:
        self.form = form
        self.parts = 0
        self.ended = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._data = bytearray()
        self._header_bytes = 0

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
            "on_end": self.end,
        }

    def part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise bad_body(f"multipart body has more than {MAX_PARTS} parts")
        self._headers, self._data, self._header_bytes = {}, bytearray(), 0

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise bad_body(f"a multipart part's headers are over {MAX_PART_HEADER_BYTES} bytes")

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_name += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_value += data[start:end]

    def header_end(self) -> None:
        self._headers[self._header_name.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_name, self._header_value = bytearray(), bytearray()

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]

    def part_end(self) -> None:
        disposition, params = parse_options_header(self._headers.get("content-disposition", b""))
        name = params.get(b"name")
        if disposition.lower() != b"form-data" or not name:
            raise bad_body("a multipart part has no Content-Disposition: form-data; name=...")
        key = name.decode("utf-8", errors="replace")
        data, self._data = self._data, bytearray()
        if b"filename" in params or key in FILE_PARAMETERS:
            self.form.add_file(key, bytes(data))
            return
        try:
            self.form.add_field(key, data.decode("utf-8"))
        except UnicodeDecodeError:
            raise bad_body(f"parameter {key!r} is not UTF-8 text; send files with a filename") from None

    def end(self) -> None:
        self.ended = True


async def parse_multipart(content_type: str, chunks: AsyncIterator[bytes]) -> Form:
    boundary = media_type(content_type)[1].get(b"boundary")
    if not boundary:
        raise bad_body("multipart/form-data Content-Type has no boundary parameter")
    form = Form()
    collector = _Multipart(form)
    parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise bad_body(f"malformed multipart body: {exc}") from None
    if not collector.ended:
        raise bad_body("malformed multipart body: it ends before the closing boundary")
    return form


async def collect(chunks: AsyncIterator[bytes]) -> bytearray:
    body = bytearray()
    async for chunk in chunks:
        body += chunk
    return body


def parse_urlencoded(body: bytes) -> Form:
    form = Form()
    try:
        pairs = urllib.parse.parse_qsl(
            body.decode("ascii"),
            keep_blank_values=True,
            strict_parsing=bool(body),
            errors="strict",
            max_num_fields=MAX_PARTS,
        )
    except (UnicodeDecodeError, ValueError):
        raise bad_body("malformed application/x-www-form-urlencoded body") from None
    for name, value in pairs:
        form.add_field(name, value)
    return form


def parse_json(body: bytes) -> Form:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad_body(f"malformed JSON body: {exc}") from None
    if not isinstance(doc, dict):
        raise bad_body("JSON body must be an object of parameters")
    form = Form()
    for name, value in doc.items():
        if isinstance(value, bool):
            form.add_field(name, "true" if value else "false")
        elif isinstance(value, (str, int, float)):
            form.add_field(name, str(value))
        elif value is not None:
            raise bad_body(f"JSON parameter {name!r} must be a string, number or boolean")
    return form


async def read_form(content_type: str, chunks: AsyncIterator[bytes]) -> Form:
    """The body as a Form; `chunks` already counted and timed (read_chunks)."""
    kind = check_media_type(content_type)
    if kind == "multipart/form-data":
        return await parse_multipart(content_type, chunks)
    body = await collect(chunks)
    if kind == "application/json":
        return parse_json(bytes(body))
    return parse_urlencoded(bytes(body))
