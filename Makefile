# One-command entry points. `make reproduce` sets up and runs the main job;
# `make test` sets up and runs the default test suite. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pgvar-installed

.PHONY: setup test test-slow reproduce lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: a CPU build of 2.13.0 is what the project is tested with, and an
	# unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Both print progress by file and the ten slowest tests (pyproject.toml's addopts).
test: setup
	$(BIN)/python -m pytest

# The long end-to-end tests: every experiment's smoke preset, the table end to end,
# the command-line sweeps with each launcher.
test-slow: setup
	$(BIN)/python -m pytest -m slow

reproduce: setup
	$(BIN)/pgvar-reproduce table --preset quick --out results/table-quick

lint: setup
	$(BIN)/ruff check pgvar analysis hydra_plugins tests
