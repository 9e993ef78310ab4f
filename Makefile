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
# It installs into the active virtual environment when there is one ($VIRTUAL_ENV), else into
# .venv. TORCH_INDEX: an extra package index for torch's CPU build, e.g.
# `make docs TORCH_INDEX=https://download.pytorch.org/whl/cpu` (a plain `pip install torch` on
# Linux fetches the CUDA build, gigabytes); empty, pip uses the indexes it is configured with.
# pip runs with -qq (errors only): every editable mode of setuptools prints an information box
# ("Editable installation", or "compat mode is transitional") that pip would copy into the log.
DOCS_VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),$(VENV))
TORCH_INDEX ?=
docs: $(DOCS_VENV)/bin/python
	$(DOCS_VENV)/bin/python -m pip install --quiet --quiet $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -e '.[docs]'
	$(DOCS_VENV)/bin/python docs/build_site.py --out site

clean:
	rm -rf $(VENV) site build *.egg-info minilora-out .pytest_cache .hypothesis
