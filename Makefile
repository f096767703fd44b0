# One entry point per job. Each creates .venv and installs what it needs first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv test lint typecheck pytest bench bench-instructions soak fuzz demo demo-limiter clean

help:
	@echo "make test   - install into .venv, then ruff + mypy --strict + the whole test suite"
	@echo "make demo   - Redis, fake OpenAI (2 keys, 2 models) and Zapier, 3 chatbot replicas, load,"
	@echo "              report per key and model, then 8 s of the same load without the shared"
	@echo "              limiter (about 1 min); to leave the cluster running:"
	@echo "              .venv/bin/python -m chatbot cluster --keep; a key's limit lowered"
	@echo "              mid-run: .venv/bin/python -m chatbot cluster --tier-change (~30 s)"
	@echo "make demo-limiter - 4 processes: the old per-process semaphore vs. the Redis limiter"
	@echo "make bench  - benchmarks side by side; figures go to benchmarks/results/"
	@echo "make bench-instructions - instructions Redis runs per pair (callgrind; needs valgrind)"
	@echo "make fuzz   - the hypothesis tests 5 times with new random examples each time"
	@echo "make soak   - 16 processes x 64 tasks x 60 s on one Redis, refereed (not in make test)"

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check limiter tests benchmarks chatbot examples
	$(BIN)/ruff format --check limiter tests benchmarks chatbot examples

typecheck: $(STAMP)
	$(BIN)/mypy --strict limiter

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

fuzz: $(STAMP)
	for i in 1 2 3 4 5; do \
		HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q tests/test_fuzz.py tests/test_model.py \
		|| exit 1; done

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-instructions: $(STAMP)
	$(BIN)/python -m benchmarks.instructions

soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak

demo: $(STAMP)
	$(BIN)/python -m chatbot cluster --replicas 3 --users 30 --messages 8

demo-limiter: $(STAMP)
	$(BIN)/python examples/multiprocess_demo.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
