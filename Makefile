# `make demo` and `make test` work on a machine with nothing installed: they create
# .venv, install the CPU build of torch first (a bare `torch` would pull CUDA), then
# gatelab with its extras. The stamp file re-installs only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gatelab-installed

.PHONY: demo test lint install clean

demo: $(STAMP)
	$(VENV)/bin/gatelab reproduce softmax-gaussian --quick

test: $(STAMP)
	$(PY) -m pytest -q

# Lint rules and type checks are configured in pyproject.toml ([tool.ruff], [tool.mypy]);
# CI runs this after the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
