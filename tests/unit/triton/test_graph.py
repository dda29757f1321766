"""The model repository: verified weights, the folded serving graph against the reference
pipeline, per-image batching, the Triton configs, and idempotent preparation."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
import skimage.data
from google.protobuf import text_format
from onnx import TensorProto
from PIL import Image
from tritonclient.grpc import model_config_pb2

from bgremove_gateway.pipeline.contract import INPUT_NAME, MODEL_INPUT_SIZE, OUTPUT_NAME
from bgremove_gateway.triton import graph as model_repo
from bgremove_gateway.triton.graph import (
    U2NET,
    U2NETP,
    ModelPreparationError,
    ModelSource,
    available_models,
    build_serving_graph,
    bundled_u2netp,
    load_card,
    prepare_model,
    prepare_models,
    served_models,
    triton_config,
)
from synthetic_models import md5, synthetic_u2net

REPO = Path(__file__).resolve().parents[3] / "model_repository"
SIZE = MODEL_INPUT_SIZE
U2NETP_SHA256 = "309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8"

Image8 = npt.NDArray[np.uint8]


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def model_input(image: Image.Image) -> Image8:
    """What the gateway sends: RGB resized to 320x320 with Pillow's LANCZOS."""
    return np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS), dtype=np.uint8)


def reference_mask(session: ort.InferenceSession, pixels: Image8) -> Image8:
    """The U-2-Net repo / rembg pipeline in numpy on the original network at batch 1."""
    x = pixels / np.max(pixels)
    x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    batch = x.transpose(2, 0, 1)[np.newaxis].astype(np.float32)
    d0: npt.NDArray[np.float32] = session.run(None, {session.get_inputs()[0].name: batch})[0][:, 0]
    d0 = (d0 - d0.min()) / (d0.max() - d0.min())
    return (np.squeeze(d0) * 255).astype(np.uint8)  # rembg truncates; the graph rounds


def photos(peer_fixtures: Path) -> dict[str, Image8]:
    images = {p.name: model_input(Image.open(p)) for p in sorted(peer_fixtures.glob("*.jpg"))}
    for name in ("astronaut", "coffee", "chelsea"):
        images[name] = skimage_photo(name)
    return images


def skimage_photo(name: str) -> Image8:
    return model_input(Image.fromarray(getattr(skimage.data, name)()))


@pytest.fixture(scope="module")
def serving_graph() -> onnx.ModelProto:
    return build_serving_graph(onnx.load(str(bundled_u2netp())))


@pytest.fixture(scope="module")
def served(serving_graph: onnx.ModelProto) -> ort.InferenceSession:
    return _session(serving_graph)


# ---------------------------------------------------------------------------------- checksums


def test_bundled_weights_are_the_pinned_u2netp() -> None:
    digests = model_repo.verify_source(bundled_u2netp(), U2NETP)
    assert (digests.md5, digests.sha256) == (U2NETP.md5, U2NETP_SHA256)


def test_corrupted_copy_is_refused_with_both_checksums(tmp_path: Path) -> None:
    corrupt = tmp_path / "u2netp.onnx"
    data = bytearray(bundled_u2netp().read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))

    with pytest.raises(ModelPreparationError) as err:
        prepare_model(corrupt, U2NETP, tmp_path / "repo")
    message = str(err.value)
    assert "checksum mismatch" in message
    assert md5(corrupt) in message and U2NETP.md5 in message
    assert available_models(tmp_path / "repo") == []


def test_missing_source_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelPreparationError, match=r"not found at .*nowhere\.onnx"):
        prepare_model(tmp_path / "nowhere.onnx", U2NETP, tmp_path / "repo")


# ------------------------------------------------------------------------------ serving graph


def test_serving_graph_interface(serving_graph: onnx.ModelProto) -> None:
    (inp,), (out,) = serving_graph.graph.input, serving_graph.graph.output
    assert inp.name == INPUT_NAME and out.name == OUTPUT_NAME
    assert inp.type.tensor_type.elem_type == TensorProto.UINT8
    assert out.type.tensor_type.elem_type == TensorProto.UINT8
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert isinstance(in_dims[0], str) and in_dims[1:] == [SIZE, SIZE, 3]
    assert out_dims == [in_dims[0], SIZE, SIZE]
    assert [o.version for o in serving_graph.opset_import if o.domain in ("", "ai.onnx")] == [11]


def test_folded_graph_matches_reference_pipeline(served: ort.InferenceSession, peer_fixtures: Path) -> None:
    original = _session(bundled_u2netp())
    images = photos(peer_fixtures)
    assert len(images) >= 3
    for name, pixels in images.items():
        expected = reference_mask(original, pixels)
        got = served.run(None, {INPUT_NAME: pixels[np.newaxis]})[0][0]
        assert got.shape == (SIZE, SIZE) and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - expected.astype(int))
        assert diff.max() <= 1, f"{name}: {diff.max()} grey levels from the reference"
        # A real mask, not a constant: both ends of the range are used.
        assert got.min() == 0 and got.max() == 255, name


def test_batch_outputs_equal_single_image_outputs(served: ort.InferenceSession) -> None:
    bright = skimage_photo("astronaut")
    dark = (bright // 5).astype(np.uint8)  # max pixel ~51: per-image /max must undo this
    other = skimage_photo("coffee")
    black = np.zeros_like(bright)
    batch = np.stack([bright, dark, other, black])

    together = served.run(None, {INPUT_NAME: batch})[0]
    assert together.shape == (4, SIZE, SIZE)
    for i, pixels in enumerate(batch):
        alone = served.run(None, {INPUT_NAME: pixels[np.newaxis]})[0][0]
        assert np.abs(together[i].astype(int) - alone.astype(int)).max() <= 1, (
            f"image {i} depends on its batch"
        )
    # The dark copy is normalised by its own max, so its mask matches the bright original's.
    assert np.mean(np.abs(together[0].astype(int) - together[1].astype(int))) < 2.0


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_builder_is_generic_over_input_name_and_opset(tmp_path: Path, opset: int) -> None:
    source = synthetic_u2net(tmp_path / "u2net.onnx", opset=opset, input_name="input.weird")
    original = _session(source)
    built = build_serving_graph(onnx.load(str(source)))
    assert [i.name for i in built.graph.input] == [INPUT_NAME]
    served = _session(built)
    rng = np.random.default_rng(opset)
    batch = rng.integers(0, 256, size=(3, SIZE, SIZE, 3), dtype=np.uint8)
    batch[1] //= 7
    got = served.run(None, {INPUT_NAME: batch})[0]
    for i in range(len(batch)):
        expected = reference_mask(original, batch[i])
        assert np.abs(got[i].astype(int) - expected.astype(int)).max() <= 1


def test_builder_refuses_a_network_with_another_input_size(tmp_path: Path) -> None:
    source = synthetic_u2net(tmp_path / "small.onnx", size=224)
    with pytest.raises(ModelPreparationError, match=r"must be float32 \[1, 3, 320, 320\]"):
        build_serving_graph(onnx.load(str(source)))


# ----------------------------------------------------------------------------- preparation


def test_prepare_is_idempotent_and_records_provenance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(model_repo.U2NET_ENV, raising=False)
    repo = tmp_path / "repo"
    # fetch=False: U2-Net-P alone here; fetching the full U2-Net is tested in test_fetch.py.
    (first,) = prepare_models(repo, fetch=False)
    assert first.built and first.name == "u2netp" and first.path == repo / "u2netp/1/model.onnx"
    meta = {p.key: p.value for p in onnx.load(str(first.path)).metadata_props}
    assert meta["bgremove.source_md5"] == U2NETP.md5
    assert meta["bgremove.source_sha256"] == U2NETP_SHA256
    stamp = first.path.stat().st_mtime_ns

    (second,) = prepare_models(repo, fetch=False)
    assert not second.built and first.path.stat().st_mtime_ns == stamp

    (forced,) = prepare_models(repo, force=True, fetch=False)
    assert forced.built

    # A graph from an older builder (different graph_version) is rebuilt, not trusted.
    stale = onnx.load(str(first.path))
    onnx.helper.set_model_props(stale, {**meta, "bgremove.graph_version": "0"})
    onnx.save(stale, str(first.path))
    (rebuilt,) = prepare_models(repo, fetch=False)
    assert rebuilt.built
    assert not list(first.path.parent.glob(".*.tmp"))


def test_available_models_lists_only_prepared_folders(tmp_path: Path) -> None:
    assert available_models(tmp_path / "absent") == []
    repo = tmp_path / "repo"
    (repo / "u2net" / "1").mkdir(parents=True)
    (repo / "notes.txt").write_text("not a model")
    assert available_models(repo) == []
    prepare_models(repo, u2net_source=None, fetch=False)
    assert available_models(repo) == ["u2netp"]


def test_u2net_is_built_from_supplied_weights(tmp_path: Path) -> None:
    source = synthetic_u2net(tmp_path / "u2net.onnx")
    repo = tmp_path / "repo"
    stand_in = ModelSource("u2net", md5(source), "synthetic U2-Net stand-in")
    prepared = prepare_model(source, stand_in, repo)
    assert prepared.built and prepared.path == repo / "u2net/1/model.onnx"
    prepare_models(repo, fetch=False)
    assert available_models(repo) == ["u2net", "u2netp"]
    # Later runs without a u2net source (and without fetching) keep the built graph.
    assert [m.name for m in prepare_models(repo, fetch=False)] == ["u2netp"]
    assert available_models(repo) == ["u2net", "u2netp"]


@pytest.mark.parametrize("how", ["argument", "environment", "dropped in place"])
def test_u2net_sources_are_checksum_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.delenv(model_repo.U2NET_ENV, raising=False)
    source = synthetic_u2net(tmp_path / "u2net.onnx")
    repo = tmp_path / "repo"
    explicit = None
    if how == "argument":
        explicit = source
    elif how == "environment":
        monkeypatch.setenv(model_repo.U2NET_ENV, str(source))
    else:
        dropped = repo / "u2net/1/model.onnx"
        dropped.parent.mkdir(parents=True)
        shutil.copy(source, dropped)
        source = dropped
    with pytest.raises(ModelPreparationError) as err:
        prepare_models(repo, u2net_source=explicit, fetch=False)
    assert str(source) in str(err.value) and U2NET.md5 in str(err.value)


# --------------------------------------------------------------------------------- configs


def _configs() -> list[Path]:
    return sorted(REPO.glob("*/configs/*.pbtxt"))


def _load_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_every_model_has_cpu_gpu_and_tensorrt_configs() -> None:
    names = {(p.parent.parent.name, p.stem) for p in _configs()}
    models = ("instant", "u2net", "u2netp")
    assert names == {(m, c) for m in models for c in ("cpu", "gpu", "gpu-tensorrt")}
    # u2net and instant share u2netp's model.py instead of carrying a copy that could drift.
    for model in ("u2net", "instant"):
        assert (REPO / model / "1/model.py").resolve() == (REPO / "u2netp/1/model.py").resolve()


@pytest.mark.parametrize("path", _configs(), ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_committed_config_is_generated_from_the_card(path: Path) -> None:
    # Committed so the Dockerfile and the chart copy them as they are; `prepare-models` rewrites
    # them from model.json, so a card edit shows here until the regenerated file is committed.
    card = load_card(path.parent.parent / "model.json")
    assert path.read_text() == triton_config(card, path.stem), (
        f"{path} is not what {card.path} generates: run `make models` and commit the result"
    )


@pytest.mark.parametrize("path", _configs(), ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_config_agrees_with_the_serving_graph(path: Path, serving_graph: onnx.ModelProto) -> None:
    config = _load_config(path)
    model = path.parent.parent.name
    assert config.name == model
    graph = serving_graph.graph
    (inp,), (out,) = config.input, config.output
    assert (inp.name, out.name) == (graph.input[0].name, graph.output[0].name)
    assert inp.data_type == out.data_type == model_config_pb2.TYPE_UINT8
    assert list(inp.dims) == [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]]
    assert list(out.dims) == [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim[1:]]

    assert config.max_batch_size > 1
    batching = config.dynamic_batching
    assert config.HasField("dynamic_batching") and batching.preferred_batch_size
    assert max(batching.preferred_batch_size) <= config.max_batch_size
    assert 0 < batching.max_queue_delay_microseconds <= 10_000
    policy = batching.default_queue_policy
    assert policy.max_queue_size >= config.max_batch_size
    # Overload fails fast: a bounded queue, and queued work dropped once its caller's deadline passed.
    assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
    assert 0 < policy.default_timeout_microseconds <= 60_000_000
    assert policy.allow_timeout_override

    assert config.model_warmup
    for warmup in config.model_warmup:
        assert 1 <= warmup.batch_size <= config.max_batch_size
        assert set(warmup.inputs) == {inp.name}
        assert list(warmup.inputs[inp.name].dims) == list(inp.dims)
        assert warmup.inputs[inp.name].data_type == inp.data_type

    (group,) = config.instance_group
    accelerators = [a.name for a in config.optimization.execution_accelerators.gpu_execution_accelerator]
    if path.stem == "cpu":
        assert (config.backend, group.kind) == ("python", model_config_pb2.ModelInstanceGroup.KIND_CPU)
        assert int(config.parameters["intra_op_thread_count"].string_value) >= 1
    else:
        assert (config.backend, group.kind) == ("onnxruntime", model_config_pb2.ModelInstanceGroup.KIND_GPU)
        assert accelerators == (["tensorrt"] if path.stem == "gpu-tensorrt" else [])


@pytest.mark.parametrize("model", ["u2netp", "u2net"])
def test_prepared_repo_serves_both_models(prepared_repo: Path, model: str) -> None:
    # The benchmark stand-in is prepared too, and served only when asked for (test_instant_model.py).
    assert available_models(prepared_repo) == ["instant", "u2net", "u2netp"]
    assert served_models(prepared_repo) == ["u2net", "u2netp"]
    path = prepared_repo / model / "1/model.onnx"
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert meta["bgremove.source_md5"] == {"u2netp": U2NETP, "u2net": U2NET}[model].md5
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    assert os.access(prepared_repo / model / "1/model.py", os.R_OK)
