# Set-up is part of every target: a fresh machine needs only python3 (>= 3.10) with venv and pip.
PYTHON ?= python3
VENV ?= .venv
# torch first, pinned, so pip takes the local CPU wheel where one is provided (and PyPI's CUDA build
# elsewhere); override with e.g. `make TORCH=torch==2.8.0` to keep another build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo scorer-demo test test-fast bench install
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python recipes/iterative_dpo.py --config iterative_dpo_smoke

scorer-demo: install
	$(BIN)/pairrm-rlhf demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The developer loop: everything but training and multi-process tests (< 2 minutes).
test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow and not multiprocess"

bench: install
	$(BIN)/pairrm-rlhf bench
