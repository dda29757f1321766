"""What an image will cost the parsers beyond its pixels, read from its structure before they run.

max_pixels bounds the pixels; this bounds the rest, which a small file can make large: a
progressive JPEG repeating its last scan (each one a pass of libjpeg over every block), floods of
empty JPEG segments or of stray bytes (Pillow's header loop steps over each in Python and keeps
every APPn in `applist`), header tables Pillow parses in Python, PNG text and ICC chunks that
Pillow inflates to 1 MiB each, WebP files of countless chunks (libwebp's demuxer records each).
The scan walks each format the way the code that will parse it does: Pillow's Python loop for
JPEG headers and PNG chunks, libjpeg for the JPEG scans, libwebp's demuxer for the RIFF chunks.
A 1 MP photo takes it about 0.2 ms; its cost to the worst input the limits allow is in docs/api.md.

It only reads: damage simply ends the scan, and decode() then reports the image as corrupt. Over a
limit it raises INVALID_ARGUMENT naming the count and the limit; it never raises anything else.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from typing import Final

from bgremove_gateway.config import Limits
from bgremove_gateway.errors import ServiceError, invalid
from bgremove_gateway.pipeline.buffers import BufferLike


@dataclass(frozen=True)
class ImageCost:
    scans: int  # JPEG start-of-scan markers up to the end of the image; 0 for PNG and WebP
    segments: int  # markers or chunks the parsers step through (and stray JPEG header bytes)
    metadata_bytes: int  # memory Pillow takes for metadata (APPn, text, ICC, EXIF, XMP, header tables)
    copied_bytes: int  # copies of file bytes the plugin makes: WebP the whole file twice, PNG a chunk

    @property
    def held_bytes(self) -> int:
        """Memory beyond the pixels that decoding may hold at once, for the memory budget."""
        return self.metadata_bytes + self.copied_bytes


# --- JPEG ------------------------------------------------------------------------------------------

# A marker inside or after entropy-coded data: 0xFF then neither a stuffed zero, a restart marker
# nor another 0xFF (fill). Found by the regex engine in C, not by a Python loop over every byte.
_NEXT_MARKER: Final = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SOI, _EOI, _SOS, _COM = 0xD8, 0xD9, 0xDA, 0xFE
_SOF: Final = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Markers Pillow's header loop knows but reads no length for (JpegImagePlugin.MARKER, handler None).
_PILLOW_BARE: Final = frozenset({0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)})
# APPn payloads Pillow copies into `info` too: XMP, ICC profile, MPF and Photoshop once more. EXIF
# is concatenated across segments (old and new copy held at once), read again through a BytesIO
# by getexif() and its IFD parsed into Python objects: measured, five times its size at once.
_APP_COPIES: Final = (
    (b"Exif\0\0", 5),
    (b"http://ns.adobe.com/xap/1.0/\0", 2),
    (b"ICC_PROFILE\0", 2),
    (b"MPF\0", 2),
    (b"Photoshop 3.0\0", 2),
)
_APP_COPIED_FIRST: Final = frozenset(prefix[0] for prefix, _ in _APP_COPIES)
# Header segments Pillow parses in Python, by the memory that takes per byte: a frame header's
# component list becomes a tuple per 3 bytes (measured 29x; real ones are 9-18 bytes), and a
# quantization table is re-sliced per table (2x; real segments are 65-520 bytes).
_SOF_WEIGHT: Final = 32
_DQT_WEIGHT: Final = 2
_DQT, _DHP = 0xDB, 0xDE


class _Tally:
    """Running counts, each checked against its limit as soon as it grows."""

    def __init__(self, kind: str, limits: Limits) -> None:
        self.kind = kind
        self.limits = limits
        self.max_segments = limits.max_image_segments
        self.max_metadata = limits.max_metadata_bytes
        self.scans = 0
        self.segments = 0
        self.metadata = 0
        self.copied = 0
        self.stray = False  # whether stray JPEG header bytes are among the segments

    def segment(self, count: int = 1) -> None:
        self.segments += count
        if self.segments > self.max_segments:
            self._refuse_segments()

    def stray_bytes(self, count: int) -> None:
        self.stray = True
        self.segment(count)

    def meta(self, nbytes: int) -> None:
        self.metadata += nbytes
        if self.metadata > self.max_metadata:
            raise invalid(
                "image",
                f"{self.kind} carries at least {self.metadata} bytes of metadata as the parser holds it "
                f"(EXIF, XMP, ICC profile, text, application segments, header tables), over the limit of "
                f"{self.max_metadata} bytes",
            )

    def scan(self, width: int, height: int) -> None:
        self.scans += 1
        if self.scans > self.limits.max_jpeg_scans:
            raise invalid(
                "image",
                f"JPEG has at least {self.scans} scans, over the limit of {self.limits.max_jpeg_scans} scans",
            )
        pixels = width * height
        work = self.scans * pixels
        # Over max_pixels, decode() refuses the size itself (RESOURCE_EXHAUSTED) from the header.
        if work > self.limits.max_jpeg_scan_pixels and pixels <= self.limits.max_pixels:
            raise invalid(
                "image",
                f"JPEG has at least {self.scans} scans of {width}x{height} pixels = {work} scan-pixels, "
                f"over the limit of {self.limits.max_jpeg_scan_pixels} scan-pixels",
            )

    def _refuse_segments(self) -> None:
        unit = "chunks" if self.kind != "JPEG" else "markers"
        if self.stray:
            unit = "markers and stray bytes between header markers"
        limit = self.max_segments
        raise invalid(
            "image", f"{self.kind} has at least {self.segments} {unit}, over the limit of {limit} segments"
        )


def _jpeg(view: memoryview, tally: _Tally) -> None:
    end = len(view)
    pos = 2  # after SOI
    width = height = 0
    # Up to the first scan Pillow's Python loop reads the markers, one step per stray byte too.
    while pos < end:
        byte = view[pos]
        if byte != 0xFF:
            found = _find_ff(view, pos)
            stray = (end if found < 0 else found) - pos
            tally.stray_bytes(stray)
            if found < 0:
                return
            pos = found
            continue
        if pos + 1 >= end:
            return
        marker = view[pos + 1]
        if marker in (0xFF, 0x00):  # fill byte / stuffed zero: one step of Pillow's loop each
            tally.stray_bytes(1)
            pos += 1 if marker == 0xFF else 2
            continue
        if marker < 0xC0:
            return  # Pillow: "no marker found"
        tally.segment()
        if marker in _PILLOW_BARE:
            pos += 2
            continue
        if pos + 4 > end:
            return
        length = max((view[pos + 2] << 8) | view[pos + 3], 2)  # Pillow reads nothing for 0 or 1
        payload_end = pos + 2 + length
        if payload_end > end:
            return
        if 0xE0 <= marker <= 0xEF or marker == _COM:
            tally.meta(_app_bytes(view, pos + 4, payload_end))
        elif marker in _SOF or marker == _DHP:
            tally.meta(_SOF_WEIGHT * (length - 2))
            if marker != _DHP and length >= 7:
                height, width = struct.unpack_from(">HH", view, pos + 5)
        elif marker == _DQT:
            tally.meta(_DQT_WEIGHT * (length - 2))
        pos = payload_end
        if marker == _SOS:
            tally.scan(width, height)
            break
    # libjpeg reads the rest, in C: only markers cost it anything; stray bytes do not.
    while pos < end:
        next_marker = _NEXT_MARKER.search(view, pos)
        if next_marker is None:
            return
        pos = next_marker.start()
        marker = view[pos + 1]
        if marker == _EOI:
            return  # what follows (an MPF picture, a trailer) is never read
        tally.segment()
        if marker in (0x01, _SOI) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if pos + 4 > end:
            return
        length = (view[pos + 2] << 8) | view[pos + 3]
        if length < 2:
            return
        pos += 2 + length  # libjpeg skips APPn/COM here without keeping them
        if marker == _SOS:
            tally.scan(width, height)


def _find_ff(view: memoryview, start: int) -> int:
    found = _FF.search(view, start)
    return -1 if found is None else found.start()


_FF: Final = re.compile(rb"\xff")


def _app_bytes(view: memoryview, start: int, end: int) -> int:
    """What Pillow holds for one APPn/COM payload: the bytes in `applist`, times the copies it
    makes of the kinds it also puts into `info`."""
    size = end - start
    if size < 4 or view[start] not in _APP_COPIED_FIRST:
        return size  # the common case, decided without a copy or a comparison
    head = bytes(view[start : start + 30])
    return size * next((copies for prefix, copies in _APP_COPIES if head.startswith(prefix)), 1)


# --- PNG -------------------------------------------------------------------------------------------

_CHUNK_TYPE: Final = re.compile(rb"\w\w\w\w")  # Pillow's is_cid: anything else ends its parse
# Pillow refuses text or an ICC profile inflating past this (PngImagePlugin.MAX_TEXT_CHUNK).
_MAX_INFLATED_CHUNK: Final = 1024 * 1024
_INFLATE_STEP: Final = 64 * 1024
_DATA_CHUNKS: Final = frozenset({b"IDAT", b"fdAT", b"DDAT"})
# A data chunk this long costs the decoder more in its bytes than in Pillow's step to the next.
_SMALL_DATA_CHUNK: Final = 1024
# cHRM values become a tuple of floats: 12 times the chunk's size, measured.
_CHRM_WEIGHT: Final = 12
# Chunks Pillow's PngStream has a handler for; others are read, and kept when private.
_PNG_HANDLED: Final = frozenset(
    {
        b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"iCCP",
        b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"acTL", b"fcTL", b"fdAT",
    }
)  # fmt: skip


def _inflated_size(data: memoryview, cap: int) -> int:
    """Bytes `data` inflates to, counting no further than `cap` (so this never inflates more)."""
    inflater = zlib.decompressobj()
    total = 0
    pending: bytes | memoryview = data
    try:
        while total < cap:
            out = inflater.decompress(pending, min(_INFLATE_STEP, cap - total))
            pending = inflater.unconsumed_tail
            total += len(out)
            if not out or inflater.eof:
                break
    except zlib.error:
        total += _INFLATE_STEP  # Pillow inflated up to the damage, in steps no larger than this
    return min(total, cap)


def _png_metadata(cid: bytes, body: memoryview, tally: _Tally) -> None:
    cap = min(_MAX_INFLATED_CHUNK + 1, max(tally.limits.max_metadata_bytes - tally.metadata + 1, 1))
    if cid in (b"tEXt", b"eXIf", b"PLTE", b"tRNS"):
        tally.meta(len(body))  # kept as read
        return
    if cid == b"cHRM":
        tally.meta(_CHRM_WEIGHT * len(body))
        return
    if cid == b"iCCP":
        name_end = _index(body, 0)  # Pillow takes the byte after the name as the method
        if name_end + 1 < len(body) and body[name_end + 1] == 0:
            tally.meta(_inflated_size(body[name_end + 2 :], cap))
        return
    if cid == b"zTXt":
        key_end = _index(body, 0)
        if key_end >= 0 and key_end + 1 < len(body) and body[key_end + 1] == 0:
            tally.meta(_inflated_size(body[key_end + 2 :], cap))
        return
    if cid == b"iTXt":
        key_end = _index(body, 0)
        flags = key_end + 1
        lang_end = _index(body, flags + 2) if key_end >= 0 else -1
        text_start = _index(body, lang_end + 1) + 1 if lang_end >= 0 else 0
        if key_end < 0 or flags + 2 > len(body) or lang_end < 0 or text_start == 0:
            return
        text = body[text_start:]
        if body[flags] != 0 and body[flags + 1] != 0:
            return  # an unknown compression method: Pillow skips the chunk
        size = _inflated_size(text, cap) if body[flags] != 0 else len(text)
        # XMP is kept twice: as text and as bytes in info["xmp"].
        tally.meta(2 * size if bytes(body[:key_end]) == b"XML:com.adobe.xmp" else size)
        return
    if cid not in _PNG_HANDLED and cid[1:2].islower():
        tally.meta(len(body))  # an unknown private chunk: Pillow keeps it in private_chunks


def _index(view: memoryview, start: int) -> int:
    """Position of the first NUL at or after `start`, or -1."""
    found = _NUL.search(view, start) if 0 <= start <= len(view) else None
    return -1 if found is None else found.start()


_NUL: Final = re.compile(rb"\x00")


def _png(view: memoryview, tally: _Tally) -> None:
    end = len(view)
    pos = 8
    seen_data = False
    frames: int | None = None  # acTL's frame count, as Pillow reads it
    frame_before_data = False
    while pos + 8 <= end:
        length, cid = struct.unpack_from(">I4s", view, pos)
        body_start = pos + 8
        body_end = body_start + length
        if _CHUNK_TYPE.fullmatch(cid) is None or body_end > end:
            return
        if cid in _DATA_CHUNKS:
            seen_data = True
            if length < _SMALL_DATA_CHUNK:
                tally.segment()
        elif cid == b"IEND":
            return
        else:
            animated = frames is not None and frames + (0 if frame_before_data else 1) > 1
            if cid == b"fcTL" and seen_data and animated:
                return  # Pillow decodes the first frame only and stops reading here
            tally.segment()
            tally.copied = max(tally.copied, length)  # Pillow reads the chunk whole, for a moment
            if cid == b"acTL" and not seen_data and length >= 8:
                # As Pillow reads it: a second acTL cancels the first, a third counts again.
                count = struct.unpack_from(">I", view, body_start)[0]
                frames = None if frames is not None or not 0 < count <= 0x80000000 else count
            elif cid == b"fcTL" and not seen_data:
                frame_before_data = True
            else:
                with view[body_start:body_end] as body:
                    _png_metadata(cid, body, tally)
        pos = body_end + 4


# --- WebP ------------------------------------------------------------------------------------------

_WEBP_METADATA: Final = frozenset({b"ICCP", b"EXIF", b"XMP "})


def _webp(view: memoryview, tally: _Tally) -> None:
    tally.copied = 2 * len(view)  # Pillow reads the whole file into bytes, and _webp copies that
    if len(view) < 12:
        return
    riff_size = struct.unpack_from("<I", view, 4)[0]
    end = min(len(view), 8 + riff_size)  # libwebp ignores whatever follows the RIFF payload
    pos = 12
    while pos + 8 <= end:
        fourcc, size = struct.unpack_from("<4sI", view, pos)
        tally.segment()
        if fourcc in _WEBP_METADATA:
            tally.meta(min(size, end - pos - 8))  # Pillow copies the first of each kind into info
        pos += 8 + size + (size & 1)


_SCANNERS: Final = {"image/jpeg": ("JPEG", _jpeg), "image/png": ("PNG", _png), "image/webp": ("WebP", _webp)}


def inspect_cost(data: BufferLike, content_type: str, limits: Limits) -> ImageCost:
    """Counts what parsing `data` will cost beyond its pixels; `content_type` is the sniffed one of
    decode.SUPPORTED_CONTENT_TYPES.

    Raises INVALID_ARGUMENT when a count exceeds its limit in `limits`, as soon as it does. Damage
    ends the scan without an error. Reads the bytes only: no decoder, no copy of the data."""
    kind, scanner = _SCANNERS[content_type]
    tally = _Tally(kind, limits)
    refusal: ServiceError | None = None
    with memoryview(data) as raw, raw.cast("B") as view:
        try:
            scanner(view, tally)
        except ServiceError as err:
            # Without the scan's frames: their slices of `data` would keep an mmap from closing.
            refusal = err.with_traceback(None)
        except (IndexError, struct.error, ValueError):
            pass  # structure cut short where the scan did not expect it: the decoder will say so
    if refusal is not None:
        raise refusal
    return ImageCost(tally.scans, tally.segments, tally.metadata, tally.copied)
