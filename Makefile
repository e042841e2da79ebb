# `make demo` and `make test` do all the set-up on a fresh machine: they create .venv and install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: this takes the CPU build on the machine's disk, not a CUDA download.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job: tokenizer, data, ~5 minutes of training on this CPU, loss plot and samples.
demo: $(STAMP)
	rm -rf runs/quickstart
	$(VENV)/bin/havoc quickstart --out runs/quickstart

test: $(STAMP)
	$(PY) -m pytest -q
	$(PY) test_smoke.py

bench: $(STAMP)
	$(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
