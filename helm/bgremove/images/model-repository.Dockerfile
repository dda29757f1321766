# syntax=docker/dockerfile:1
# The model repository as an image, for modelRepository.source=image: the chart's init container
# copies /model_repository into the Triton pod. Build from the repository root after `make models`
# (which generates u2netp/1/model.onnx from checksum-verified weights):
#   docker build -f helm/bgremove/images/model-repository.Dockerfile -t bgremove-model-repository:0.1.0 .
# Needs nothing but `cp`, so a small busybox base.
FROM busybox:1.37.0
COPY model_repository/ /model_repository/
# Fail the build rather than the rollout when the generated weights or a config are missing.
RUN test -s /model_repository/u2netp/1/model.onnx \
 && test -s /model_repository/u2netp/configs/gpu.pbtxt \
 && test -s /model_repository/u2netp/configs/cpu.pbtxt
USER 65532:65532
