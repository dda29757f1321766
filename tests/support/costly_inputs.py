"""The costly corpus: small images built to make the parsers work hard, for test_costs.py.

Each kind comes at the largest size the given Limits allow ("at"), one step over ("over"), and as
the attack was reproduced on the running service, sized to the upload limit ("attack"). All are
real images (Pillow writes the pixels) with structure added where the parsers will walk it.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from PIL import Image

from bgremove_gateway.config import Limits
from bgremove_gateway.pipeline.costs import inspect_cost

MiB = 1024 * 1024
MAX_SEGMENT_PAYLOAD = 65533  # a JPEG segment's length field counts itself: 65535 - 2
MAX_INFLATED_CHUNK = 1024 * 1024  # what Pillow inflates a PNG text or ICC chunk to, at most


def encoded(image: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


# --- JPEG ------------------------------------------------------------------------------------------


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a well-formed JPEG, a scan's entropy-coded data
    included in its SOS segment; SOI and EOI are not listed."""
    segments = []
    pos = 2
    while data[pos + 1] != 0xD9:
        marker = data[pos + 1]
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if marker == 0xDA:  # the entropy-coded data runs to the next marker that is not RSTn
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        segments.append((marker, pos, end))
        pos = end
    return segments


@functools.cache  # the largest takes a second to encode, and several items start from it
def progressive_jpeg(width: int, height: int, *, flat: bool = False) -> bytes:
    """A smooth progressive picture (libjpeg's 10 scans), or a flat one, whose scans are tiny."""
    if flat:
        return encoded(
            Image.new("RGB", (width, height), (120, 130, 140)), "JPEG", progressive=True, quality=90
        )
    gradient = Image.linear_gradient("L").resize((width, height))
    image = Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.ROTATE_180), gradient))
    return encoded(image, "JPEG", progressive=True, quality=90)


def plain_jpeg() -> bytes:
    return encoded(Image.new("RGB", (64, 48), (200, 120, 40)), "JPEG", quality=90)


def jpeg_scan_count(data: bytes) -> int:
    return sum(marker == 0xDA for marker, _, _ in jpeg_segments(data))


def jpeg_with_scans(base: bytes, scans: int) -> bytes:
    """`base` with its last scan repeated until the file has `scans` scans: each repeat refines
    coefficients already final, so the picture is unchanged and libjpeg redoes the whole pass."""
    segments = jpeg_segments(base)
    _, start, end = segments[-1]
    assert segments[-1][0] == 0xDA
    extra = scans - jpeg_scan_count(base)
    assert extra >= 0
    return base[:end] + base[start:end] * extra + base[end:]


def jpeg_with_segments(base: bytes, count: int, marker: int = 0xE0, payload: bytes = b"") -> bytes:
    """`count` copies of one segment right after SOI (empty APP0 by default: 4 bytes each)."""
    segment = struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload
    return base[:2] + segment * count + base[2:]


def jpeg_header_segments(data: bytes) -> int:
    """Markers the cost scan counts in a well-formed JPEG: every segment, SOI/EOI aside."""
    return len(jpeg_segments(data))


def jpeg_with_stray_bytes(base: bytes, count: int, byte: bytes = b"\x00") -> bytes:
    """`count` stray bytes between the first header segment and the next: Pillow's header loop
    steps over them one by one, libjpeg skips them with a warning."""
    _, _, end = jpeg_segments(base)[0]
    return base[:end] + byte * count + base[end:]


def jpeg_with_metadata(base: bytes, total: int, prefix: bytes = b"", marker: int = 0xEF) -> bytes:
    """APPn segments as full as a segment can be, carrying `total` payload bytes in all, each
    payload starting with `prefix` (b"Exif\\0\\0", b"ICC_PROFILE\\0"...)."""
    segments = []
    left = total
    while left > 0:
        size = min(left, MAX_SEGMENT_PAYLOAD)
        body = (prefix + bytes(size))[:size]
        segments.append(struct.pack(">BBH", 0xFF, marker, size + 2) + body)
        left -= size
    return base[:2] + b"".join(segments) + base[2:]


def exif_ifd(entries: int) -> bytes:
    """A big-endian TIFF header and IFD0 with `entries` SHORT entries (valid, distinct tags)."""
    rows = b"".join(struct.pack(">HHIHH", 0x8000 + i % 0x7000, 3, 1, i & 0xFFFF, 0) for i in range(entries))
    return b"MM\x00\x2a" + struct.pack(">IH", 8, entries) + rows + b"\x00\x00\x00\x00"


def jpeg_with_exif_segments(base: bytes, total: int) -> bytes:
    """EXIF split over APP1 segments carrying `total` payload bytes: Pillow appends each to
    info["exif"] (copying what it has each time) and parses the IFD, 65535 entries at most."""
    tiff = exif_ifd(0xFFFF)
    step = MAX_SEGMENT_PAYLOAD - 6
    pieces = []
    size = total - 6 * -(-total // MAX_SEGMENT_PAYLOAD)  # less each segment's "Exif\0\0"
    body = tiff.ljust(size, b"\0")[:size]
    for offset in range(0, len(body), step):
        piece = b"Exif\0\0" + body[offset : offset + step]
        pieces.append(struct.pack(">BBH", 0xFF, 0xE1, len(piece) + 2) + piece)
    return base[:2] + b"".join(pieces) + base[2:]


def jpeg_with_photoshop(base: bytes, total: int) -> bytes:
    """APP13 Photoshop segments packed with empty 8BIM resources (12 bytes each), which Pillow
    parses one by one in Python, carrying `total` payload bytes in all."""
    header = b"Photoshop 3.0\0"
    per_segment = (MAX_SEGMENT_PAYLOAD - len(header)) // 12
    segments = []
    left = total
    index = 0
    while left > len(header):
        count = min(per_segment, (left - len(header)) // 12)
        if count == 0:
            break
        resources = b"".join(
            b"8BIM" + struct.pack(">HBBI", (index + i) & 0xFFFF, 0, 0, 0) for i in range(count)
        )
        index += count
        payload = header + resources
        segments.append(struct.pack(">BBH", 0xFF, 0xED, len(payload) + 2) + payload)
        left -= len(payload)
    return base[:2] + b"".join(segments) + base[2:]


def jpeg_with_quantization_tables(base: bytes, tables: int) -> bytes:
    """`tables` quantization tables (65 bytes each, all for table 0) in full DQT segments: Pillow
    parses each in Python, re-slicing the rest of its segment every time."""
    per_segment = MAX_SEGMENT_PAYLOAD // 65
    table = b"\x00" + bytes(range(1, 65))
    segments = []
    for start in range(0, tables, per_segment):
        payload = table * min(per_segment, tables - start)
        segments.append(struct.pack(">BBH", 0xFF, 0xDB, len(payload) + 2) + payload)
    return base[:2] + b"".join(segments) + base[2:]


SOF_COMPONENTS_PER_SEGMENT = (MAX_SEGMENT_PAYLOAD - 6) // 3


def jpeg_with_frame_headers(base: bytes, components: int) -> bytes:
    """Frame headers (SOF0) ahead of the real one listing `components` components in all: Pillow
    appends a tuple for each 3 bytes, whatever the component count in the header says."""
    segments = []
    for start in range(0, components, SOF_COMPONENTS_PER_SEGMENT):
        count = min(SOF_COMPONENTS_PER_SEGMENT, components - start)
        payload = b"\x08\x00\x10\x00\x10\x03" + b"\x01\x11\x00" * count
        segments.append(struct.pack(">BBH", 0xFF, 0xC0, len(payload) + 2) + payload)
    return base[:2] + b"".join(segments) + base[2:]


def frame_header_bytes(components: int) -> int:
    """Payload bytes of jpeg_with_frame_headers(_, components)'s segments."""
    return 6 * -(-components // SOF_COMPONENTS_PER_SEGMENT) + 3 * components


# --- PNG -------------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def plain_png() -> bytes:
    return encoded(Image.new("RGB", (64, 48), (200, 120, 40)), "PNG")


def png_with_chunks(base: bytes, chunks: bytes) -> bytes:
    """`chunks` inserted right after IHDR, where Pillow's header loop parses them."""
    ihdr_end = 8 + 12 + 13
    assert base[12:16] == b"IHDR"
    return base[:ihdr_end] + chunks + base[ihdr_end:]


ONE_MIB_OF_ZEROS = zlib.compress(bytes(MAX_INFLATED_CHUNK), 9)
# Not UTF-8: Pillow drops such iTXt text without counting it against its own text-memory limit.
ONE_MIB_OF_FF = zlib.compress(b"\xff" * MAX_INFLATED_CHUNK, 9)


def inflating_chunk(kind: bytes) -> bytes:
    """An iCCP, zTXt or iTXt chunk with an empty name or keyword inflating to 1 MiB, the most
    Pillow inflates per chunk, none of which Pillow counts against its own text-memory limit."""
    if kind == b"iTXt":
        return png_chunk(kind, b"\0\x01\x00\0\0" + ONE_MIB_OF_FF)
    return png_chunk(kind, b"\0\0" + ONE_MIB_OF_ZEROS)


def png_with_inflating_chunks(kind: bytes, count: int) -> bytes:
    return png_with_chunks(plain_png(), inflating_chunk(kind) * count)


def png_with_empty_chunks(count: int, kind: bytes = b"prIv") -> bytes:
    """`count` empty chunks (private and unknown by default: Pillow raises and catches an
    AttributeError for each, then keeps it in private_chunks)."""
    return png_with_chunks(plain_png(), png_chunk(kind, b"") * count)


def png_with_small_data_chunks(count: int) -> bytes:
    """The image data followed by `count` empty IDAT chunks, each a step of Pillow's reader."""
    base = plain_png()
    iend = base.rindex(b"IEND") - 4
    return base[:iend] + png_chunk(b"IDAT", b"") * count + base[iend:]


def png_with_chromaticity(size: int) -> bytes:
    """One cHRM chunk of `size` bytes (a multiple of 4): Pillow makes a tuple of floats of it."""
    return png_with_chunks(plain_png(), png_chunk(b"cHRM", bytes(size)))


def png_with_private_bytes(total: int) -> bytes:
    """Private chunks of 1 MiB carrying `total` bytes in all, which Pillow reads and keeps."""
    chunks = []
    left = total
    while left > 0:
        size = min(left, MiB)
        chunks.append(png_chunk(b"prIv", bytes(size)))
        left -= size
    return png_with_chunks(plain_png(), b"".join(chunks))


# --- WebP ------------------------------------------------------------------------------------------


def riff_chunk(fourcc: bytes, body: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(body)) + body + (b"\0" if len(body) & 1 else b"")


def webp_chunks(data: bytes) -> list[bytes]:
    """The RIFF chunks of a WebP file, each with its header and padding."""
    chunks = []
    pos = 12
    while pos + 8 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos + 4)
        end = pos + 8 + size + (size & 1)
        chunks.append(data[pos:end])
        pos = end
    return chunks


def webp_from_chunks(chunks: list[bytes]) -> bytes:
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def extended_webp() -> bytes:
    """A small lossy WebP in the extended format (VP8X), where extra chunks are allowed."""
    return encoded(Image.new("RGB", (64, 48), (200, 120, 40)), "WEBP", quality=80, xmp=b"<x/>")


def webp_with_chunks(base: bytes, extra: bytes) -> bytes:
    """`extra` (whole chunks) inserted after VP8X, where libwebp's demuxer stores each one."""
    chunks = webp_chunks(base)
    assert chunks[0].startswith(b"VP8X")
    return webp_from_chunks([chunks[0], extra, *chunks[1:]])


def webp_with_unknown_chunks(count: int) -> bytes:
    return webp_with_chunks(extended_webp(), riff_chunk(b"ZZZZ", b"") * count)


def webp_with_xmp_bytes(total: int) -> bytes:
    """One XMP chunk of `total` bytes (replacing the base's), which Pillow copies into info."""
    chunks = [c for c in webp_chunks(extended_webp()) if not c.startswith(b"XMP ")]
    return webp_from_chunks([*chunks, riff_chunk(b"XMP ", b"<x/>".ljust(total, b" "))])


def webp_with_frames(count: int) -> bytes:
    """An animation of `count` identical ANMF frames: libwebp's demuxer records every one."""
    frames = [Image.new("RGB", (16, 8), color) for color in ("red", "blue")]
    base = encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    chunks = webp_chunks(base)
    anmf = [c for c in chunks if c.startswith(b"ANMF")]
    head = [c for c in chunks if not c.startswith(b"ANMF")]
    return webp_from_chunks([*head, *([anmf[0]] * count)])


def webp_segments(data: bytes) -> int:
    return len(webp_chunks(data))


# --- the corpus ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Costly:
    name: str  # kind-variant, e.g. "jpeg-scans-at"
    content_type: str
    make: Callable[[], bytes]
    limit: str  # the Limits field this is sized against
    variant: str  # "at": the most the limits allow; "over": one step past; "attack": upload-sized
    decodes: bool = True  # whether decode() returns pixels when it is within the limits


def _fit(unit: int, total: int) -> int:
    """How many `unit`s fit in `total` (at least one)."""
    return max(1, total // unit)


def corpus(limits: Limits) -> Iterator[Costly]:
    """Every costly kind against `limits`: at the limit, just over it and upload-sized."""
    segments, metadata, upload = limits.max_image_segments, limits.max_metadata_bytes, limits.max_upload_bytes
    jpeg, png, webp = "image/jpeg", "image/png", "image/webp"

    def item(
        name: str,
        content_type: str,
        limit: str,
        at: Callable[[], bytes],
        over: Callable[[], bytes],
        attack: Callable[[], bytes] | None = None,
        attack_limit: str = "",
        decodes: bool = True,
    ) -> Iterator[Costly]:
        yield Costly(f"{name}-at", content_type, at, limit, "at", decodes)
        yield Costly(f"{name}-over", content_type, over, limit, "over", decodes)
        if attack is not None:
            yield Costly(f"{name}-attack", content_type, attack, attack_limit or limit, "attack", decodes)

    def scans(side: int, count: int, flat: bool = False) -> Callable[[], bytes]:
        return lambda: jpeg_with_scans(progressive_jpeg(side, side, flat=flat), count)

    # Scans: the most the scan count allows (at the largest size the scan-pixel budget leaves it),
    # the most the scan-pixel budget allows at max_pixels. The reproduced attack: a 4000x4000
    # flat picture (94 KB) with its last scan repeated; 1000 scans make it 125 KB.
    most = limits.max_jpeg_scans
    side = int((limits.max_jpeg_scan_pixels / most) ** 0.5)
    yield from item(
        "jpeg-scans",
        jpeg,
        "max_jpeg_scans",
        scans(side, most),
        scans(256, most + 1),
        scans(4000, 1000, flat=True),
        attack_limit="max_jpeg_scan_pixels",
    )
    big = int(limits.max_pixels**0.5)
    big_scans = limits.max_jpeg_scan_pixels // (big * big)
    yield from item(
        "jpeg-scan-pixels", jpeg, "max_jpeg_scan_pixels", scans(big, big_scans), scans(big, big_scans + 1)
    )

    # Marker floods: empty APP0 and COM segments, stray and fill bytes between header markers;
    # 20 MB of empty APP0 segments was the reproduced attack.
    base = plain_jpeg()
    room = segments - jpeg_header_segments(base)
    flood = _fit(4, upload - len(base))
    for marker, label in ((0xE0, "app0"), (0xFE, "com")):
        yield from item(
            f"jpeg-{label}-flood",
            jpeg,
            "max_image_segments",
            partial(jpeg_with_segments, base, room, marker),
            partial(jpeg_with_segments, base, room + 1, marker),
            partial(jpeg_with_segments, base, flood, marker),
        )
    for byte, label in ((b"\0", "stray"), (b"\xff", "fill")):
        yield from item(
            f"jpeg-{label}-bytes",
            jpeg,
            "max_image_segments",
            partial(jpeg_with_stray_bytes, base, room, byte),
            partial(jpeg_with_stray_bytes, base, room + 1, byte),
            partial(jpeg_with_stray_bytes, base, upload - len(base), byte),
        )

    # Metadata: full APPn segments that Pillow keeps once (APP15), twice (Photoshop resources,
    # parsed one by one) or five times (EXIF, concatenated and parsed); quantization tables (2x)
    # and frame headers (32x: a tuple per component), which Pillow parses in Python too.
    left = metadata - inspect_cost(base, jpeg, limits).metadata_bytes
    most_app = min(upload - len(base), 640 * MAX_SEGMENT_PAYLOAD)
    yield from item(
        "jpeg-app-metadata",
        jpeg,
        "max_metadata_bytes",
        partial(jpeg_with_metadata, base, left),
        partial(jpeg_with_metadata, base, left + 1),
        partial(jpeg_with_metadata, base, most_app),
    )
    for label, build, copies in (("exif", jpeg_with_exif_segments, 5), ("photoshop", jpeg_with_photoshop, 2)):
        yield from item(
            f"jpeg-{label}",
            jpeg,
            "max_metadata_bytes",
            partial(build, base, left // copies),
            partial(build, base, left // copies + MAX_SEGMENT_PAYLOAD),
            partial(build, base, most_app),
        )
    yield from item(
        "jpeg-dqt",
        jpeg,
        "max_metadata_bytes",
        partial(jpeg_with_quantization_tables, base, left // 130),
        partial(jpeg_with_quantization_tables, base, left // 130 + 1),
        partial(jpeg_with_quantization_tables, base, (upload - len(base)) // 66),
    )
    sof_at = left // 96
    while 32 * frame_header_bytes(sof_at) > left:
        sof_at -= 1
    yield from item(
        "jpeg-sof",
        jpeg,
        "max_metadata_bytes",
        partial(jpeg_with_frame_headers, base, sof_at),
        partial(jpeg_with_frame_headers, base, sof_at + 1),
        partial(jpeg_with_frame_headers, base, (upload - len(base)) * 99 // 300),
        decodes=False,  # libjpeg refuses a second frame header: Pillow has parsed them all by then
    )

    # PNG chunks inflating to 1 MiB each; 2.9 MB of them was the reproduced attack.
    for kind in (b"iCCP", b"zTXt", b"iTXt"):
        count = metadata // MAX_INFLATED_CHUNK
        yield from item(
            f"png-{kind.decode().lower()}",
            png,
            "max_metadata_bytes",
            partial(png_with_inflating_chunks, kind, count),
            partial(png_with_inflating_chunks, kind, count + 1),
            partial(png_with_inflating_chunks, kind, _fit(len(inflating_chunk(kind)), 2_900_000)),
        )
    yield from item(
        "png-private-bytes",
        png,
        "max_metadata_bytes",
        partial(png_with_private_bytes, metadata),
        partial(png_with_private_bytes, metadata + 1),
    )
    yield from item(
        "png-chrm",
        png,
        "max_metadata_bytes",
        partial(png_with_chromaticity, metadata // 48 * 4),
        partial(png_with_chromaticity, metadata // 48 * 4 + 4),
        partial(png_with_chromaticity, upload - 200),
    )
    png_room = segments - 2  # the base's IHDR and its one short IDAT
    png_flood = _fit(12, upload - 200)
    yield from item(
        "png-chunk-flood",
        png,
        "max_image_segments",
        partial(png_with_empty_chunks, png_room),
        partial(png_with_empty_chunks, png_room + 1),
        partial(png_with_empty_chunks, png_flood),
    )
    yield from item(
        "png-small-idat",
        png,
        "max_image_segments",
        partial(png_with_small_data_chunks, png_room),
        partial(png_with_small_data_chunks, png_room + 1),
        partial(png_with_small_data_chunks, png_flood),
    )

    # WebP: unknown chunks and animation frames, each a record in libwebp's demuxer.
    webp_room = segments - webp_segments(extended_webp())
    yield from item(
        "webp-chunk-flood",
        webp,
        "max_image_segments",
        partial(webp_with_unknown_chunks, webp_room),
        partial(webp_with_unknown_chunks, webp_room + 1),
        partial(webp_with_unknown_chunks, _fit(8, upload - 200)),
    )
    frame_room = segments - (webp_segments(webp_with_frames(1)) - 1)
    frame_size = len(webp_with_frames(2)) - len(webp_with_frames(1))
    yield from item(
        "webp-frames",
        webp,
        "max_image_segments",
        partial(webp_with_frames, frame_room),
        partial(webp_with_frames, frame_room + 1),
        partial(webp_with_frames, _fit(frame_size, upload - 200)),
    )
    yield from item(
        "webp-xmp",
        webp,
        "max_metadata_bytes",
        partial(webp_with_xmp_bytes, metadata),
        partial(webp_with_xmp_bytes, metadata + 1),
    )
