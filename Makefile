# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The main job: the paper's story end to end (full fine-tuning vs LoRA, merge, mixed batch).
demo: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[plot]'
	$(BIN)/minilora demo

# The whole suite, hypothesis profile "ci" (fixed example counts, no deadline), on every core
# (pytest-xdist) with one BLAS thread per worker: threads beyond the cores only spin.
test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --hypothesis-profile=ci

lint: $(BIN)/python
	$(BIN)/ruff check minilora tests

bench: $(BIN)/python
	$(BIN)/python -m benchmarks.bench --compare-torch

# The course site: every tutorial executed (full mode: a few minutes), the docs pages and the API
# reference, into site/ (open site/index.html; no network needed). MINILORA_FAST=1 for a smoke build.
docs: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	$(BIN)/python docs/build_site.py --out site

clean:
	rm -rf $(VENV) site build *.egg-info minilora-out .pytest_cache .hypothesis
