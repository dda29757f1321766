"""The data path, one module a step: upload, costs, image size, decode, preprocess (resize),
infer (in triton/), postprocess, encode; flow.py runs them in order."""
