"""Tiny ONNX stand-ins with U2-Net's input and outputs, built in the tests instead of downloaded,
and a model card for one of them (`tiny`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from bgremove_gateway.pipeline.contract import MODEL_INPUT_SIZE

SIZE = MODEL_INPUT_SIZE


def synthetic_u2net(path: Path, *, opset: int = 11, input_name: str = "x.in", size: int = SIZE) -> Path:
    """A small stand-in with U2-Net's I/O layout: one float [1,3,S,S] input under its own name,
    seven sigmoid maps [1,1,S,S], the first being d0."""
    rng = np.random.default_rng(7)
    inits, nodes, outputs = [], [], []
    for k in range(7):
        w = numpy_helper.from_array(rng.normal(size=(1, 3, 3, 3)).astype(np.float32), f"w{k}")
        inits.append(w)
        nodes.append(helper.make_node("Conv", [input_name, f"w{k}"], [f"c{k}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Sigmoid", [f"c{k}"], [f"d{k}"]))
        outputs.append(helper.make_tensor_value_info(f"d{k}", TensorProto.FLOAT, [1, 1, size, size]))
    graph = helper.make_graph(
        nodes,
        "synthetic_u2net",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 3, size, size])],
        outputs,
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


# A rembg-compatible model that is none of the shipped ones: its own input name, its mask at
# output 3 (not d0), an IS-Net-like normalisation (mean 0.5, std 1) and small batch settings.
TINY_INPUT = "pixels.in"
TINY_MASK_INDEX = 3


def tiny_card(weights_md5: str, **overrides: object) -> dict[str, object]:
    card: dict[str, object] = {
        "name": "tiny",
        "title": "Tiny",
        "description": "a synthetic U2-Net-shaped network built by the tests",
        "source": {"kind": "file", "path": "tiny.onnx"},
        "md5": weights_md5,
        "licences": ["test data, no licence needed"],
        "input_size": SIZE,
        "input_name": TINY_INPUT,
        "normalise": {"divide_by_max": True, "mean": [0.5, 0.5, 0.5], "std": [1.0, 1.0, 1.0]},
        "mask_output": TINY_MASK_INDEX,
        "cpu": {"max_batch_size": 4, "preferred_batch_sizes": [2, 4], "max_queue_size": 8},
        "gpu": {"max_batch_size": 16, "preferred_batch_sizes": [16], "warmup_batch_sizes": [1, 16]},
    }
    card.update(overrides)
    return card


def write_tiny_model(repo: Path, *, size: int = SIZE, **overrides: object) -> Path:
    """<repo>/tiny/ with synthetic weights (tiny.onnx) taking `size`x`size` images and a card
    (model.json) naming them; the folder `prepare-models` turns into a servable model. Returns the
    card's path."""
    folder = repo / "tiny"
    folder.mkdir(parents=True, exist_ok=True)
    weights = synthetic_u2net(folder / "tiny.onnx", input_name=TINY_INPUT, size=size)
    card = folder / "model.json"
    card.write_text(json.dumps(tiny_card(md5(weights), **{"input_size": size, **overrides}), indent=2))
    return card


def reference_mask(
    session: Any,
    pixels: npt.NDArray[np.uint8],
    *,
    divide_by_max: bool = True,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    output: int = TINY_MASK_INDEX,
) -> npt.NDArray[np.uint8]:
    """rembg's pipeline in numpy at batch 1 on the original network (an onnxruntime session):
    normalise, run, take the mask output, min-max it to 0..255 (rounded, as the graph does)."""
    x = pixels / max(float(pixels.max()), 1.0) if divide_by_max else pixels / 255.0
    x = (x - np.asarray(mean)) / np.asarray(std)
    batch = x.transpose(2, 0, 1)[np.newaxis].astype(np.float32)
    pred = session.run(None, {session.get_inputs()[0].name: batch})[output][0, 0]
    span = max(float(pred.max() - pred.min()), float(np.finfo(np.float32).tiny))
    mask: npt.NDArray[np.uint8] = np.clip(np.round((pred - pred.min()) / span * 255), 0, 255).astype(np.uint8)
    return mask
