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
	$(BIN)/ruff check --line-length 100 --select E,F,W,I,B,UP,SIM,RUF --target-version py311 server tests
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/python -m server.testing.demo

bench: $(STAMP)
	$(BIN)/python -m server.testing.bench $(if $(CALLS),--calls $(CALLS)) $(if $(SECONDS),--seconds $(SECONDS))

clean:
	rm -rf $(VENV) *.egg-info out
