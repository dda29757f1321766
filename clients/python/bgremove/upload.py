"""Turning an image into the StreamRemoveBackground request stream: header, then bounded chunks."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from bgremove.options import RemoveOptions
from bgremove.v1 import bgremove_pb2 as pb

ImageSource = bytes | bytearray | memoryview | str | os.PathLike[str]

OCTET_STREAM = "application/octet-stream"


def load_image(image: ImageSource) -> bytes | bytearray | memoryview:
    """The image's bytes: bytes-like input as is, a str or path read whole into memory."""
    if isinstance(image, bytes | bytearray | memoryview):
        return image
    return Path(image).read_bytes()


def sniff_content_type(data: bytes | bytearray | memoryview) -> str:
    """The media type the magic bytes announce; unknown data is sent as application/octet-stream
    so the server, which owns the list of accepted types, refuses it with a precise message."""
    head = bytes(data[:12])
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return OCTET_STREAM


class Upload:
    """One image ready to stream; the whole image is held once and sliced without copying."""

    def __init__(
        self,
        data: bytes | bytearray | memoryview,
        options: RemoveOptions,
        *,
        content_type: str | None,
        chunk_size: int,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be at least 1 byte, got {chunk_size}")
        self._view = memoryview(data).cast("B")
        self.chunk_size = chunk_size
        self.content_type = content_type or sniff_content_type(self._view)
        self.options = options
        self._digest: bytes | None = None

    @property
    def size(self) -> int:
        return self._view.nbytes

    def digest(self) -> bytes:
        """SHA-256 of the whole image, computed once (hashlib releases the GIL, so a thread helps)."""
        if self._digest is None:
            self._digest = hashlib.sha256(self._view).digest()
        return self._digest

    def header(self) -> pb.UploadRequest:
        return pb.UploadRequest(
            header=pb.UploadHeader(
                content_type=self.content_type,
                total_size=self.size,
                sha256=self.digest(),
                options=self.options.to_proto(),
            )
        )

    def messages(self) -> Iterator[pb.UploadRequest]:
        yield self.header()
        view, step = self._view, self.chunk_size
        for start in range(0, view.nbytes, step):
            # protobuf wants bytes, so each chunk is copied once here and never the whole image.
            yield pb.UploadRequest(chunk=view[start : start + step].tobytes())
