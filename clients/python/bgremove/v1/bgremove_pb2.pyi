from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_PNG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_WEBP: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_MASK: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_JPEG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_ZIP: _ClassVar[OutputFormat]

class Placement(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLACEMENT_UNSPECIFIED: _ClassVar[Placement]
    PLACEMENT_ORIGINAL: _ClassVar[Placement]
    PLACEMENT_CENTER: _ClassVar[Placement]
    PLACEMENT_PERCENT: _ClassVar[Placement]
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_PNG: OutputFormat
OUTPUT_FORMAT_WEBP: OutputFormat
OUTPUT_FORMAT_MASK: OutputFormat
OUTPUT_FORMAT_JPEG: OutputFormat
OUTPUT_FORMAT_ZIP: OutputFormat
PLACEMENT_UNSPECIFIED: Placement
PLACEMENT_ORIGINAL: Placement
PLACEMENT_CENTER: Placement
PLACEMENT_PERCENT: Placement

class Color(_message.Message):
    __slots__ = ("r", "g", "b")
    R_FIELD_NUMBER: _ClassVar[int]
    G_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    r: int
    g: int
    b: int
    def __init__(self, r: _Optional[int] = ..., g: _Optional[int] = ..., b: _Optional[int] = ...) -> None: ...

class Length(_message.Message):
    __slots__ = ("px", "percent")
    PX_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    px: int
    percent: float
    def __init__(self, px: _Optional[int] = ..., percent: _Optional[float] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: Length
    y1: Length
    x2: Length
    y2: Length
    def __init__(self, x1: _Optional[_Union[Length, _Mapping]] = ..., y1: _Optional[_Union[Length, _Mapping]] = ..., x2: _Optional[_Union[Length, _Mapping]] = ..., y2: _Optional[_Union[Length, _Mapping]] = ...) -> None: ...

class Margins(_message.Message):
    __slots__ = ("top", "right", "bottom", "left")
    TOP_FIELD_NUMBER: _ClassVar[int]
    RIGHT_FIELD_NUMBER: _ClassVar[int]
    BOTTOM_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    top: Length
    right: Length
    bottom: Length
    left: Length
    def __init__(self, top: _Optional[_Union[Length, _Mapping]] = ..., right: _Optional[_Union[Length, _Mapping]] = ..., bottom: _Optional[_Union[Length, _Mapping]] = ..., left: _Optional[_Union[Length, _Mapping]] = ...) -> None: ...

class Position(_message.Message):
    __slots__ = ("placement", "x_percent", "y_percent")
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    X_PERCENT_FIELD_NUMBER: _ClassVar[int]
    Y_PERCENT_FIELD_NUMBER: _ClassVar[int]
    placement: Placement
    x_percent: float
    y_percent: float
    def __init__(self, placement: _Optional[_Union[Placement, str]] = ..., x_percent: _Optional[float] = ..., y_percent: _Optional[float] = ...) -> None: ...

class Options(_message.Message):
    __slots__ = ("format", "bg_color", "crop", "crop_margin", "max_output_side", "model", "roi", "scale_percent", "position", "bg_image", "max_output_pixels", "crop_margins")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    BG_COLOR_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    CROP_MARGIN_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_SIDE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROI_FIELD_NUMBER: _ClassVar[int]
    SCALE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    BG_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_PIXELS_FIELD_NUMBER: _ClassVar[int]
    CROP_MARGINS_FIELD_NUMBER: _ClassVar[int]
    format: OutputFormat
    bg_color: Color
    crop: bool
    crop_margin: int
    max_output_side: int
    model: str
    roi: Region
    scale_percent: float
    position: Position
    bg_image: bytes
    max_output_pixels: int
    crop_margins: Margins
    def __init__(self, format: _Optional[_Union[OutputFormat, str]] = ..., bg_color: _Optional[_Union[Color, _Mapping]] = ..., crop: _Optional[bool] = ..., crop_margin: _Optional[int] = ..., max_output_side: _Optional[int] = ..., model: _Optional[str] = ..., roi: _Optional[_Union[Region, _Mapping]] = ..., scale_percent: _Optional[float] = ..., position: _Optional[_Union[Position, _Mapping]] = ..., bg_image: _Optional[bytes] = ..., max_output_pixels: _Optional[int] = ..., crop_margins: _Optional[_Union[Margins, _Mapping]] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("content_type", "total_size", "sha256", "options")
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    content_type: str
    total_size: int
    sha256: bytes
    options: Options
    def __init__(self, content_type: _Optional[str] = ..., total_size: _Optional[int] = ..., sha256: _Optional[bytes] = ..., options: _Optional[_Union[Options, _Mapping]] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class BoundingBox(_message.Message):
    __slots__ = ("x", "y", "width", "height")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    x: int
    y: int
    width: int
    height: int
    def __init__(self, x: _Optional[int] = ..., y: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("width", "height", "content_type", "foreground", "size", "model", "input_width", "input_height")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    FOREGROUND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    content_type: str
    foreground: BoundingBox
    size: int
    model: str
    input_width: int
    input_height: int
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., content_type: _Optional[str] = ..., foreground: _Optional[_Union[BoundingBox, _Mapping]] = ..., size: _Optional[int] = ..., model: _Optional[str] = ..., input_width: _Optional[int] = ..., input_height: _Optional[int] = ...) -> None: ...

class ResultChunk(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[ResultHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class RemoveBackgroundRequest(_message.Message):
    __slots__ = ("content_type", "image", "options")
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    content_type: str
    image: bytes
    options: Options
    def __init__(self, content_type: _Optional[str] = ..., image: _Optional[bytes] = ..., options: _Optional[_Union[Options, _Mapping]] = ...) -> None: ...

class RemoveBackgroundResponse(_message.Message):
    __slots__ = ("header", "image")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    image: bytes
    def __init__(self, header: _Optional[_Union[ResultHeader, _Mapping]] = ..., image: _Optional[bytes] = ...) -> None: ...

class GetServiceInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "input_size", "ready")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    name: str
    input_size: int
    ready: bool
    def __init__(self, name: _Optional[str] = ..., input_size: _Optional[int] = ..., ready: _Optional[bool] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_upload_bytes", "max_chunk_bytes", "max_pixels", "max_unary_bytes", "idle_timeout_ms", "result_chunk_bytes", "max_output_side", "max_crop_margin", "upload_timeout_ms", "max_jpeg_scans", "max_image_segments", "max_metadata_bytes", "max_jpeg_scan_pixels", "max_bg_image_bytes")
    MAX_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_UNARY_BYTES_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    RESULT_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_CROP_MARGIN_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_JPEG_SCANS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_METADATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_JPEG_SCAN_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_BG_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_upload_bytes: int
    max_chunk_bytes: int
    max_pixels: int
    max_unary_bytes: int
    idle_timeout_ms: int
    result_chunk_bytes: int
    max_output_side: int
    max_crop_margin: int
    upload_timeout_ms: int
    max_jpeg_scans: int
    max_image_segments: int
    max_metadata_bytes: int
    max_jpeg_scan_pixels: int
    max_bg_image_bytes: int
    def __init__(self, max_upload_bytes: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., max_pixels: _Optional[int] = ..., max_unary_bytes: _Optional[int] = ..., idle_timeout_ms: _Optional[int] = ..., result_chunk_bytes: _Optional[int] = ..., max_output_side: _Optional[int] = ..., max_crop_margin: _Optional[int] = ..., upload_timeout_ms: _Optional[int] = ..., max_jpeg_scans: _Optional[int] = ..., max_image_segments: _Optional[int] = ..., max_metadata_bytes: _Optional[int] = ..., max_jpeg_scan_pixels: _Optional[int] = ..., max_bg_image_bytes: _Optional[int] = ...) -> None: ...

class GetServiceInfoResponse(_message.Message):
    __slots__ = ("models", "default_model", "limits", "output_formats", "input_content_types", "version")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMATS_FIELD_NUMBER: _ClassVar[int]
    INPUT_CONTENT_TYPES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    limits: Limits
    output_formats: _containers.RepeatedScalarFieldContainer[OutputFormat]
    input_content_types: _containers.RepeatedScalarFieldContainer[str]
    version: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., output_formats: _Optional[_Iterable[_Union[OutputFormat, str]]] = ..., input_content_types: _Optional[_Iterable[str]] = ..., version: _Optional[str] = ...) -> None: ...
