# privlm: every target installs what it needs into .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_SRC := $(shell find protos -name '*.proto' 2>/dev/null)
PROTO_STAMP := .protos-stamp
RUN_ARGS ?=
TEST_ARGS ?=

.PHONY: venv run test lint bench model protos clean help

help:
	@echo "make run     start the suite with the default model and ask it a banking question"
	@echo "make test    lint (ruff) and run the test suite"
	@echo "make lint    ruff: lint and import order"
	@echo "make bench   run the benchmarks (JSON to stdout and bench/results/)"
	@echo "make model   prepare the embedded default model (SmolLM2-135M-Instruct)"
	@echo "make protos  generate the gRPC stubs from protos/"
	@echo "make clean   remove the venv, caches and generated stubs"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(STAMP)

$(PROTO_STAMP): $(STAMP) $(PROTO_SRC)
	$(PY) -m privlm.protogen
	touch $@

protos: $(PROTO_STAMP)

model: $(STAMP)
	$(PY) -m privlm.model_prep
	$(PY) -m services.inference.engine.cpu_decode

run: protos model
	$(VENV)/bin/privlm up --demo $(RUN_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: protos model lint
	$(PY) -m pytest $(TEST_ARGS)

bench: protos model
	$(PY) -m bench

clean:
	rm -rf $(VENV) .cache $(PROTO_STAMP) privlm/v1 privlm/internal bench/results .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
