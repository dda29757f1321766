"""The data path, one module a step: upload, costs, image size, decode, preprocess (resize),
infer (in triton/), postprocess, encode; flow.py runs them in order. contract.py is the model's
input and output, buffers.py the buffers an upload is read from in place."""
