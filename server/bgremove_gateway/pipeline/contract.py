"""The served model's input and output, as the gateway sends them and the serving graph declares them.

In: `image`, uint8 RGB [N, 320, 320, 3]. Out: `mask`, uint8 [N, 320, 320]. triton/graph.py writes
this into the ONNX graph it builds, preprocess.py makes the input, triton/client.py sends it and
reads the mask, GetServiceInfo reports the size. The Triton configs under model_repository/ spell
out the same names, types and shapes for Triton; tests/unit/triton/test_graph.py checks they agree.
"""

from __future__ import annotations

from typing import Final

import numpy as np

# Side of the square image U2-Net(-P) takes and of the mask it returns.
MODEL_INPUT_SIZE: Final = 320
INPUT_CHANNELS: Final = 3  # RGB
INPUT_NAME: Final = "image"
OUTPUT_NAME: Final = "mask"
# Both ways: a quarter of the bytes of float32; the graph itself scales and normalises.
INPUT_DTYPE: Final = np.uint8
OUTPUT_DTYPE: Final = np.uint8
