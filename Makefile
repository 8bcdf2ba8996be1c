# Two commands set up and run everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 lies on this project's machines; a bare `torch` requirement would pull
# a multi-GB CUDA build, so torch is installed first, pinned, with pip (uv/poetry don't see the local file).
TORCH ?= torch==2.13.0

.PHONY: demo test test-slow soak bench gpu-check lint assets clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/sarkd-diag train

# Two pytest-xdist workers, one per core of CI's 2-core machine: the tests train single-threaded
# (tests/conftest.py), so a second worker nearly halves the wall time. Whole files go to one worker
# (--dist loadfile), so a module's shared runs (module-scoped fixtures) are trained once.
# `make test TEST_WORKERS=0` runs in one process.
TEST_WORKERS ?= 2

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

soak: $(VENV)/.installed
	$(PY) -m pytest -q -m soak

bench: $(VENV)/.installed
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

# On a CUDA machine, with its own torch and no network: see the script's header.
gpu-check:
	bash benchmarks/gpu_check.sh

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check sarkd_diag tests benchmarks scripts
	$(VENV)/bin/lint-imports

assets: $(VENV)/.installed
	$(PY) scripts/make_assets.py

clean:
	rm -rf $(VENV) runs .pytest_cache
