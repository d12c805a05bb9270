# Set-up and entry points. Each target installs what is missing into .venv first.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/cpu-constraints.txt
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PIP) -c .ci/cpu-constraints.txt torch 2>&1 | $(QUIET_PIP)
	$(PIP) -c .ci/cpu-constraints.txt -e ".[dev]" 2>&1 | $(QUIET_PIP)
	$(PY) -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 'unexpected torch ' + torch.__version__)"
	touch $@

demo: install
	$(VENV)/bin/cf demo $(ARGS)

# One pytest worker per core (at most TEST_WORKERS), each single-threaded; a test file stays on one worker so its
# module-scoped runs are made once. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 4
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q --durations=15 \
	  $$( [ "$(TEST_WORKERS)" = 0 ] || echo "-n auto --maxprocesses=$(TEST_WORKERS) --dist loadfile" ) \
	  tests --nbmake notebooks $(ARGS)

bench: install
	$(PY) bench/chunk_cost.py
