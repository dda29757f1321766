"""Triton Python-backend model: runs 1/model.onnx (the serving graph built by
`bgremove prepare-models`) with ONNX Runtime on the CPU.

Used by configs/cpu.pbtxt. The GPU configs use Triton's onnxruntime backend on the same
model.onnx instead, so this file is the CPU path only. u2net/1/model.py links here.

The graph takes uint8 RGB [N, S, S, 3] and returns a uint8 mask [N, S, S] (S: the card's
input_size, 320 for U2-Net); all normalisation is inside it and per image, so requests can be batched freely.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

DEFAULT_INTRA_OP_THREADS = 2


def _parameter(model_config: dict[str, Any], key: str, default: str) -> str:
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value or default


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        model_config = json.loads(args["model_config"])
        self.input_name = model_config["input"][0]["name"]
        self.output_name = model_config["output"][0]["name"]
        output_config = pb_utils.get_output_config_by_name(model_config, self.output_name)
        self.output_dtype = pb_utils.triton_string_to_numpy(output_config["data_type"])

        options = ort.SessionOptions()
        # The dynamic batcher hands one batch at a time to this instance; parallelism comes from
        # ONNX Runtime's intra-op threads, sized to the cores the pod is given.
        options.intra_op_num_threads = int(
            _parameter(model_config, "intra_op_thread_count", str(DEFAULT_INTRA_OP_THREADS))
        )
        options.inter_op_num_threads = 1
        # See configs/cpu.pbtxt: spinning threads starve the gateway's CPU work on shared cores.
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", _parameter(model_config, "allow_spinning", "0")
        )
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.session_input = self.session.get_inputs()[0].name
        self.session_output = self.session.get_outputs()[0].name

    def execute(self, requests: list[Any]) -> list[Any]:
        """One ONNX Runtime run for the whole batch Triton assembled, split back per request."""
        responses: list[Any] = [None] * len(requests)
        images: list[np.ndarray] = []
        owners: list[int] = []
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            if tensor is None:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"missing input tensor '{self.input_name}'")
                )
                continue
            images.append(tensor.as_numpy())
            owners.append(i)

        if images:
            batch = images[0] if len(images) == 1 else np.concatenate(images)
            try:
                masks = self.session.run([self.session_output], {self.session_input: batch})[0]
            except Exception as exc:  # one failure answers every request of the batch, never crashes the stub
                for i in owners:
                    responses[i] = pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"model execution failed: {exc}")
                    )
                return responses
            start = 0
            for i, image in zip(owners, images, strict=True):
                count = image.shape[0]
                mask = masks[start : start + count].astype(self.output_dtype, copy=False)
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(self.output_name, mask)]
                )
                start += count
        return responses

    def finalize(self) -> None:
        self.session = None
