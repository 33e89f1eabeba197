PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench lint clean

# Create or refresh the venv only when pyproject.toml changes (idempotent).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m experiments.pipeline

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist worksteal tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.decode
	$(BIN)/python -m benchmarks.train
	$(BIN)/python -m benchmarks.ssm_decode
	$(BIN)/python -m benchmarks.compile_depth
	$(BIN)/python -m benchmarks.speculative
	$(BIN)/python -m benchmarks.rl
	$(BIN)/python -m benchmarks.kernels  # off a GPU: the kernels' correctness on tiny shapes only (see RESULTS.md)

lint: $(STAMP)
	$(BIN)/ruff check lmx tests experiments benchmarks

clean:
	rm -rf $(VENV)
