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
# Declared for data sniff_content_type does not recognise. The server refuses an unsupported
# declared type at the header, naming header.content_type, a field the caller never set; declared
# as a supported type, the upload reaches the server's own sniffing of the bytes, which says what
# they are ("image/gif images are not supported", "data is not an image"). It can never be taken
# for the data's real type: the server's sniffer already found that it is not one of its types.
LET_THE_SERVER_SNIFF = "image/png"


def load_image(image: ImageSource) -> bytes | bytearray | memoryview:
    """The image's bytes: bytes-like input as is, a str or path read whole into memory."""
    if isinstance(image, bytes | bytearray | memoryview):
        return image
    return Path(image).read_bytes()


def sniff_content_type(data: bytes | bytearray | memoryview) -> str:
    """The supported media type the magic bytes announce, else application/octet-stream."""
    head = bytes(data[:12])
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return OCTET_STREAM


def declared_content_type(data: bytes | bytearray | memoryview) -> str:
    """The content type to declare for data: its own when supported, else LET_THE_SERVER_SNIFF."""
    sniffed = sniff_content_type(data)
    return LET_THE_SERVER_SNIFF if sniffed == OCTET_STREAM else sniffed


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
        # The caller's type, else what the bytes are as far as this client can tell (octet-stream:
        # none of the supported types); the header declares it, or LET_THE_SERVER_SNIFF for the latter.
        self.known_type = content_type or sniff_content_type(self._view)
        self.content_type = content_type or declared_content_type(self._view)
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
