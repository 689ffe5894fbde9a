# Quick start: `make demo`, then `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# constraints.txt pins torch==2.13.0 (the local CPU wheel); a looser spec pulls CUDA.
PIP    := $(BIN)/python -m pip install -c constraints.txt

.PHONY: demo demo-quick test lint typecheck unit install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e .
	touch $@

# The demo's promise is the report it writes, so it installs the `report` extra
# (plotly, whose plotly.js is inlined into report.html). plotly stays an extra rather
# than a core dependency: training with a Monitor, `diagnose` and the run store need
# none of it, and a report can be written later on another machine.
$(VENV)/.installed-report: $(VENV)/.installed
	$(PIP) -e ".[report]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e ".[dev]"
	touch $@ $(VENV)/.installed $(VENV)/.installed-report

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed-report
	$(BIN)/gradsight demo

demo-quick: $(VENV)/.installed-report
	$(BIN)/gradsight demo --quick

LINT_PATHS := src tests $(wildcard benchmarks docs)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/ruff check $(LINT_PATHS)

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

unit: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

test: lint typecheck unit

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
