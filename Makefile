# chainrule — `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
SWEEP  ?= transformer_scaling_cpu

.DEFAULT_GOAL := help
.PHONY: help install train prepare sample evaluate export sweep sweep-report test test-full lint format bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU-only torch (for transformers, the tests' reference), not the multi-GB CUDA build: a
	# local +cpu wheel if the machine has one, else PyTorch's CPU index, else none (the tests
	# that compare with transformers are then skipped, nothing else needs torch).
	$(PY) -m pip install -q 'torch==2.13.0+cpu' 2>/dev/null \
	  || $(PY) -m pip install -q --retries 1 --timeout 20 torch --index-url https://download.pytorch.org/whl/cpu \
	  || echo "note: no CPU-only torch could be installed; the transformers comparisons will be skipped"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install chainrule with its dev tools

train: $(STAMP)  ## train the default experiment (char-level Transformer on Shakespeare); ARGS="key=value ..."
	$(PY) train.py $(ARGS)

prepare: $(STAMP)  ## prepare data once into shards: make prepare ARGS="data=text_file data.path=corpus/ [out=dir]"
	$(PY) prepare.py $(ARGS)

sample: $(STAMP)  ## sample from a run: make sample ARGS="checkpoint=outputs/... prompt=ROMEO:"
	$(PY) sample.py $(ARGS)

evaluate: $(STAMP)  ## score a run on a whole split: make evaluate ARGS="checkpoint=outputs/... split=test"
	$(PY) evaluate.py $(ARGS)

export: $(STAMP)  ## a run as a Hugging Face GPT-2 directory: make export ARGS="checkpoint=outputs/... out=hf/"
	$(PY) export.py format=hf $(ARGS)

sweep: $(STAMP)  ## run a sweep preset from sweeps/ (SWEEP=transformer_scaling_cpu: ~8 min on 2 cores), then its report
	$(PY) train.py -m sweep=$(SWEEP) $(ARGS); status=$$?; \
	$(PY) -m chainrule.sweeps --root multirun/$(SWEEP); exit $$status

sweep-report: $(STAMP)  ## table, power-law fits and plots of the newest sweep under multirun/ (or ARGS="<sweep dir> [--out DIR]")
	$(PY) -m chainrule.sweeps $(ARGS)

test: $(STAMP)  ## fast test suite (a few minutes on 2 CPU cores)
	$(PY) -m pytest -q -n 2 --dist loadfile $(ARGS)

test-full: $(STAMP)  ## every test, the slow ones included
	$(PY) -m pytest -q -n 2 --dist loadfile -m '' $(ARGS)

lint: $(STAMP)  ## ruff checks
	$(VENV)/bin/ruff check src tests bench train.py sample.py evaluate.py export.py prepare.py

format: $(STAMP)  ## ruff format + import sorting
	$(VENV)/bin/ruff check --fix --select I src tests bench train.py sample.py evaluate.py export.py prepare.py
	$(VENV)/bin/ruff format src tests bench train.py sample.py evaluate.py export.py prepare.py

bench: $(STAMP)  ## run the benchmarks in bench/ (prints figures, writes bench/results/)
	$(PY) bench/run_all.py $(ARGS)

clean:  ## remove the venv, run outputs and caches
	rm -rf $(VENV) outputs multirun wandb .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
