"""`instant`: a stand-in network with U2-Net-P's input and output and next to no compute, for
measuring the gateway's own ceiling (`bgremove bench --serve --model instant`).

Its mask is a soft centred ellipse nudged by each pixel's luminance, so a result looks like a
cut-out and still depends on the photo. `prepare-models` builds it in code (no download); its
card (model_repository/instant/model.json) marks it `benchmark_only`, so `bgremove serve` loads it
only when asked (`--load-model instant`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bgremove_gateway.pipeline.contract import INPUT_CHANNELS, MODEL_INPUT_SIZE

# Opset and IR version are fixed so the serialised bytes, and so the card's md5, never drift.
_OPSET = 13
_IR_VERSION = 7
_INPUT = "input.1"
_OUTPUT = "d0"
# The ellipse's half-axes as fractions of the side, and how sharp its edge is.
_HALF_WIDTH, _HALF_HEIGHT = 0.36, 0.44
_EDGE = 6.0
_LUMA_WEIGHT = 0.5


def instant_network(size: int = MODEL_INPUT_SIZE) -> onnx.ModelProto:
    """float [N,3,S,S] (normalised RGB) -> sigmoid map [N,1,S,S]: an ellipse plus luminance."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    # -(x/a)^2 and -(y/b)^2 as a row and a column: their broadcast sum is the ellipse, no S² table.
    cols = (-((axis / _HALF_WIDTH) ** 2) * _EDGE).reshape(1, 1, 1, size).astype(np.float32)
    rows = (_EDGE - (axis / _HALF_HEIGHT) ** 2 * _EDGE).reshape(1, 1, size, 1).astype(np.float32)
    initializers = [
        numpy_helper.from_array(cols, "ellipse_cols"),
        numpy_helper.from_array(rows, "ellipse_rows"),
        numpy_helper.from_array(np.asarray(_LUMA_WEIGHT, np.float32), "luma_weight"),
    ]
    nodes = [
        helper.make_node("ReduceMean", [_INPUT], ["luma"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["luma", "luma_weight"], ["luma_term"]),
        helper.make_node("Add", ["ellipse_rows", "ellipse_cols"], ["ellipse"]),
        helper.make_node("Add", ["ellipse", "luma_term"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], [_OUTPUT]),
    ]
    graph = helper.make_graph(
        nodes,
        "instant",
        [helper.make_tensor_value_info(_INPUT, TensorProto.FLOAT, ["batch", INPUT_CHANNELS, size, size])],
        [helper.make_tensor_value_info(_OUTPUT, TensorProto.FLOAT, ["batch", 1, size, size])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="bgremove-standin"
    )
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


# The networks `prepare-models` can generate, by a card's source.generator.
GENERATORS: dict[str, Callable[[], onnx.ModelProto]] = {"instant": instant_network}


def write_generated(generator: str, out: Path) -> Path:
    """Writes the named generated network to `out` (its weights file, checksummed like any other)."""
    if generator not in GENERATORS:
        raise ValueError(f"unknown generator {generator!r}; known: {', '.join(sorted(GENERATORS))}")
    out.write_bytes(GENERATORS[generator]().SerializeToString())
    return out
