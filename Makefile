# The two front-door commands: `make demo` and `make test`. Both build .venv if missing.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Extra pip args for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
export GEOFEAT_HOME ?= $(CURDIR)/geofeat-data
# Prefect server port on 127.0.0.1 (make demo PORT=4300 if 4200 is taken)
PORT ?= 4200

.PHONY: venv demo test test-server down clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and exactly pinned: pip then keeps it instead of pulling the newest CUDA build.
	$(BIN)/pip install -q $(TORCH_PIP_ARGS) torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

## The whole chain on the embedded demo world, through a real local Prefect server:
## build the feature catalog -> train the (tiny) experts -> evaluate; prints the report.
demo: venv
	$(BIN)/geofeat up --port $(PORT)
	eval "$$($(BIN)/geofeat env)"; \
	  $(BIN)/prefect deployment run build-feature-datasets/demo --watch && \
	  $(BIN)/prefect deployment run train-experts/demo --watch && \
	  $(BIN)/prefect deployment run evaluate/demo --watch
	$(BIN)/geofeat summary
	$(BIN)/geofeat report
	@echo "Prefect UI: $$($(BIN)/geofeat env --get PREFECT_API_URL | sed 's#/api$$##')   stop it with: $(BIN)/geofeat down"

## Install and run the whole test suite (CPU, generated data only).
test: venv
	$(BIN)/python -m pytest

## Only the end-to-end test against a real local Prefect server.
test-server: venv
	$(BIN)/python -m pytest -m server

down:
	$(BIN)/geofeat down

clean: down
	rm -rf $(GEOFEAT_HOME)
