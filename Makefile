# `make demo` and `make test` do all the set-up on a fresh machine: they create .venv and install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench gpu-check clean chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: this takes the CPU build on the machine's disk, not a CUDA download.
	$(PY) -m pip install --quiet torch==2.13.0
	# llama-cpp-python takes minutes to build here: the shared wheelhouse has it prebuilt when present.
	# Built from source, it is built portable (AVX2, as that wheel is): its default -march=native build
	# died with an illegal instruction in the tests on this project's machine (cause not established).
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF" \
		$(PY) -m pip install --quiet --find-links ../shared/wheels -e '.[dev]'
	# lm-eval has no plugin discovery for models: this start-up hook registers `havoc` (see lm_eval_plugin.py).
	echo 'import importlib.util; importlib.util.find_spec("havoc_eval") and __import__("havoc_eval.lm_eval_plugin")' \
		> "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/havoc_lm_eval.pth"
	touch $(STAMP)

# The main job: tokenizer, data, ~4 minutes of training on a 2-core CPU, loss plot and samples.
demo: $(STAMP)
	rm -rf runs/quickstart
	$(VENV)/bin/havoc quickstart --out runs/quickstart

# The chat-page test drives a real browser: Debian's chromium (Playwright never downloads one).
chromium:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: $(STAMP) chromium
	$(VENV)/bin/ruff check src tests benchmarks test_smoke.py
	$(PY) -m pytest -q
	$(PY) test_smoke.py

bench: $(STAMP)
	mkdir -p runs/bench
	$(VENV)/bin/havoc bench small --repeats 7 --json runs/bench/core.json --chart runs/bench/core.png
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_attention.py
	$(PY) benchmarks/bench_grammar.py
	# Trains a small-preset target and a tiny draft on the demo's data first (~20 min; cached in runs/).
	$(PY) benchmarks/bench_speculative.py

# On a machine with a CUDA GPU: its own python and torch (never reinstalled), HAVOC from src/.
# Tests marked cuda, the 7B shape beside HF, 1B training tokens/s and MFU; results in GPU_CHECK_OUT.
GPU_CHECK_OUT ?= runs/gpu-check
gpu-check:
	PYTHONPATH=src $(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
