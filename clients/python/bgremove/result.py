"""The finished result, and the checks that turn a stream of ResultChunks into one."""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc

from bgremove.errors import BgRemoveError
from bgremove.v1 import bgremove_pb2 as pb

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class RemovalResult:
    data: bytes
    # image/png, image/webp or image/jpeg.
    content_type: str
    # Size of the result in pixels.
    width: int
    height: int
    # (x, y, width, height) of the subject in result coordinates; None when no subject was found.
    foreground: Box | None
    model: str
    # Size of the input after its EXIF orientation was applied.
    input_width: int
    input_height: int

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the result to path, replacing it only once every byte is on disk.

        A reader never sees half a file, and a failed write leaves an existing file untouched.
        """
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        # 0o666 under the process umask, like a plain open(): tempfile would make it owner-only.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(self.data)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise


class ResultAssembler:
    """Checks the answer is one header, then chunks adding up to exactly header.size bytes."""

    def __init__(self) -> None:
        self._header: pb.ResultHeader | None = None
        self._data = bytearray()

    def add(self, message: pb.ResultChunk) -> None:
        kind = message.WhichOneof("payload")
        if kind == "header":
            if self._header is not None:
                raise _malformed(grpc.StatusCode.INTERNAL, "the server sent a second result header")
            self._header = message.header
        elif kind == "chunk":
            if self._header is None:
                raise _malformed(grpc.StatusCode.INTERNAL, "the server sent result bytes before the header")
            self._data += message.chunk
            # Stop at once rather than buffer an unbounded answer.
            if len(self._data) > self._header.size:
                raise _malformed(
                    grpc.StatusCode.DATA_LOSS,
                    f"the server sent more than the {self._header.size} result bytes its header announced",
                )
        else:
            raise _malformed(grpc.StatusCode.INTERNAL, "the server sent an empty result message")

    def result(self) -> RemovalResult:
        header = self._header
        if header is None:
            raise _malformed(grpc.StatusCode.INTERNAL, "the server ended the stream without a result header")
        if len(self._data) != header.size:
            raise _malformed(
                grpc.StatusCode.DATA_LOSS,
                f"the result is {len(self._data)} bytes but its header announced {header.size}",
            )
        box = header.foreground
        foreground = (box.x, box.y, box.width, box.height) if header.HasField("foreground") else None
        if foreground is not None and (box.width == 0 or box.height == 0):
            foreground = None
        return RemovalResult(
            data=bytes(self._data),
            content_type=header.content_type,
            width=header.width,
            height=header.height,
            foreground=foreground,
            model=header.model,
            input_width=header.input_width,
            input_height=header.input_height,
        )

    @property
    def received(self) -> int:
        return len(self._data)


def _malformed(code: grpc.StatusCode, message: str) -> BgRemoveError:
    return BgRemoveError(code, message)
