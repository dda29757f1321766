"""Width and height as a JPEG, PNG or WebP header declares them, read without any decoder.

Pillow's plugins refuse a zero width or height while parsing the header, with an error that reads
like any other damage; reading the few header bytes here lets decode() say exactly what is wrong.
"""

from __future__ import annotations

import struct

from bgremove_gateway.pipeline.buffers import BufferLike

# Start-of-frame markers (baseline, progressive, lossless, arithmetic...): not DHT (C4), JPG (C8)
# or DAC (CC), which share the range.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
_JPEG_SOS = 0xDA


def _jpeg(view: memoryview) -> tuple[int, int] | None:
    pos, end = 2, len(view)
    while pos + 4 <= end:
        if view[pos] != 0xFF:
            return None
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", view, pos + 2)
        if marker in _JPEG_SOF:
            if pos + 9 > end:
                return None
            height, width = struct.unpack_from(">HH", view, pos + 5)
            return width, height
        if marker == _JPEG_SOS or length < 2:
            return None
        pos += 2 + length
    return None


def _png(view: memoryview) -> tuple[int, int] | None:
    # Signature (8), IHDR length (4) and type (4), then width and height.
    if len(view) < 24 or bytes(view[12:16]) != b"IHDR":
        return None
    width, height = struct.unpack_from(">II", view, 16)
    return width, height


def _webp(view: memoryview) -> tuple[int, int] | None:
    # Lossless (VP8L) and extended (VP8X) headers store size - 1 and cannot declare zero; the lossy
    # key frame stores the size itself, 14 bits each, after its 3-byte tag and start code.
    if len(view) < 30 or bytes(view[12:16]) != b"VP8 " or bytes(view[23:26]) != b"\x9d\x01\x2a":
        return None
    width, height = struct.unpack_from("<HH", view, 26)
    return width & 0x3FFF, height & 0x3FFF


_READERS = {"image/jpeg": _jpeg, "image/png": _png, "image/webp": _webp}


def declared_size(data: BufferLike, content_type: str) -> tuple[int, int] | None:
    """(width, height) from the header, or None when it is not where the format puts it (the
    decoder then reports the damage)."""
    reader = _READERS.get(content_type)
    if reader is None:
        return None
    with memoryview(data) as raw, raw.cast("B") as view:
        return reader(view)
