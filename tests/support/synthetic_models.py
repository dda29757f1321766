"""Tiny ONNX stand-ins with U2-Net's input and outputs, built in the tests instead of downloaded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
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
