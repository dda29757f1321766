"""The served model's input and output, as the gateway sends them and the serving graph declares them.

In: `image`, uint8 RGB [N, S, S, 3]. Out: `mask`, uint8 [N, S, S], where S is the model's card's
input_size (320 for U2-Net(-P)). triton/graph.py writes this into the ONNX graph it builds,
preprocess.py makes the input, triton/client.py sends it, reads the mask and learns each served
model's S from Triton's model metadata, GetServiceInfo reports it. The Triton configs under
model_repository/ spell out the same names, types and shapes for Triton;
tests/unit/triton/test_graph.py checks they agree.
"""

from __future__ import annotations

from typing import Final

import numpy as np

# Side of the square image U2-Net(-P) takes and of the mask it returns; also the size assumed for a
# model whose size Triton has not told the gateway (yet).
MODEL_INPUT_SIZE: Final = 320
# The input sizes a model card may declare: IS-Net and BiRefNet take 1024; beyond 2048 one image
# tensor alone would be 12 MiB, and below 64 no mask is worth upsampling.
MIN_INPUT_SIZE: Final = 64
MAX_INPUT_SIZE: Final = 2048
INPUT_CHANNELS: Final = 3  # RGB
INPUT_NAME: Final = "image"
OUTPUT_NAME: Final = "mask"
# Both ways: a quarter of the bytes of float32; the graph itself scales and normalises.
INPUT_DTYPE: Final = np.uint8
OUTPUT_DTYPE: Final = np.uint8
