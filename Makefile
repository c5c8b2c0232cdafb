# Every target sets up its own virtual environment on first use, so a fresh clone needs only
# python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint demo bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m server

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check server tests  # rules in pyproject.toml, with: the product never imports server.testing
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/python -m server.testing.demo $(if $(CONSOLE),--console)

bench: $(STAMP)
	$(BIN)/python -m server.testing.bench $(if $(CALLS),--calls $(CALLS)) $(if $(SECONDS),--seconds $(SECONDS)) $(if $(ROUNDS),--rounds $(ROUNDS)) $(BENCH_ARGS)
	$(BIN)/python -m server.testing.prewarm  # the greeting's first audio, with and without pre-warm

clean:
	rm -rf $(VENV) *.egg-info out
