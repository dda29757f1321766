# syntax=docker/dockerfile:1
# Triton for triton.profile=cpu: NVIDIA's container plus the Python packages that the cpu
# profile's model.py imports (the Python backend runs ONNX Runtime on the CPU). NVIDIA's image has
# the onnxruntime *backend* for the gpu profile, but not the onnxruntime Python package.
#   docker build -f helm/bgremove/images/triton-cpu.Dockerfile -t <registry>/bgremove-triton-cpu:24.10 helm/bgremove/images
# then: --set triton.profile=cpu --set triton.cpuImage.repository=<registry>/bgremove-triton-cpu --set-string triton.cpuImage.tag=24.10
FROM nvcr.io/nvidia/tritonserver:24.10-py3
# The 24.10 container's Python is 3.10 (Ubuntu 22.04): onnxruntime 1.23.2 is the newest release
# with cp310 wheels; numpy stays on the project's pin.
RUN python3 -m pip install --no-cache-dir --only-binary=:all: "onnxruntime==1.23.2" "numpy==1.26.4"
# triton-server, the non-root user NVIDIA's image creates with uid/gid 1000.
USER 1000:1000
