# Set-up is part of every target: a fresh machine needs only python3 (>= 3.11) with venv and pip.
# `make` installs from requirements/lock.txt, the exact versions CI tests (refresh it with `make lock`); the
# package's own dependencies in pyproject.toml stay ranges. The lock pins torch==2.13.0: pip takes the CPU wheel
# where the machine provides one (this project's CI machines do) and PyPI's build (CUDA on Linux) elsewhere.
PYTHON ?= python3
VENV ?= .venv
LOCK := requirements/lock.txt
BIN := $(VENV)/bin
LATEST := .venv-latest
PIP_TOOLS := pip-tools==7.7.0
UV := uv==0.13.9

.PHONY: demo scorer-demo test test-fast test-latest test-lowest bench install install-demo lock

# What the demo and the CLI use (no test tools, no DeepSpeed).
install-demo: $(VENV)/.installed-demo
$(VENV)/.installed-demo: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[plots]"
	touch $@

# Everything the test suite needs.
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[test]"
	touch $@ $(VENV)/.installed-demo

demo: install-demo
	HF_HUB_OFFLINE=1 $(BIN)/python recipes/iterative_dpo.py --config iterative_dpo_smoke

scorer-demo: install-demo
	$(BIN)/pairrm-rlhf demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The developer loop: everything but training and multi-process tests (< 2 minutes).
test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow and not multiprocess"

# The suite against the newest release of every dependency (torch stays at the lock's pin: a newer torch is a
# multi-GB CUDA download). Run it on purpose to see drift before it reaches the lock. PYTEST_ARGS narrows the
# run of test-latest and test-lowest, e.g. PYTEST_ARGS='-m "not slow"'.
test-latest:
	$(PYTHON) -m venv $(LATEST)
	grep '^torch==' $(LOCK) > $(LATEST)/torch-pin.txt
	$(LATEST)/bin/python -m pip install -q -U --upgrade-strategy eager -c $(LATEST)/torch-pin.txt -e ".[test]"
	$(LATEST)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|trl|peft|accelerate|datasets|deepspeed) '
	HF_HUB_OFFLINE=1 $(LATEST)/bin/python -m pytest -q $(PYTEST_ARGS)

# The suite against the lowest version of every direct dependency that pyproject.toml admits (uv's
# lowest-direct resolution; torch included, so this downloads PyPI's torch at its floor): the floors we claim.
LOWEST := .venv-lowest
test-lowest:
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q "$(UV)"
	$(LOWEST)/bin/uv pip compile -q --resolution lowest-direct --python $(LOWEST)/bin/python --extra test \
		pyproject.toml -o $(LOWEST)/lowest.txt
	$(LOWEST)/bin/uv pip install -q --python $(LOWEST)/bin/python -c $(LOWEST)/lowest.txt -e ".[test]"
	$(LOWEST)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|trl|peft|accelerate|datasets|deepspeed) '
	HF_HUB_OFFLINE=1 $(LOWEST)/bin/python -m pytest -q $(PYTEST_ARGS)

# Re-resolve the lock from pyproject.toml + requirements/pins.in against PyPI alone (machine-local pip
# configuration, such as a find-links folder of CPU wheels, is ignored so the lock names public releases).
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q "$(PIP_TOOLS)"
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null .venv-lock/bin/pip-compile -q --extra test --strip-extras \
		--no-emit-index-url --no-emit-find-links --annotation-style line --unsafe-package pairrm-rlhf -o $(LOCK) pyproject.toml requirements/pins.in

bench: install-demo
	$(BIN)/pairrm-rlhf bench
