# Two commands on a fresh machine:  `make compare` (the main job)  and  `make test`.
# The first call builds .venv; torch and torchvision are pinned to the releases that pip
# finds on this kind of machine's disk (torchvision 0.29.1 needs torch 2.14.1).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[torch,jax,experiments,landscape,lightning,dev]" $(TORCH)
	touch $@

.PHONY: install test test-all compare
install: $(VENV)/.installed

test: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

test-all: $(VENV)/.installed
	$(PY) -m pytest -q -m ""

compare: $(VENV)/.installed
	$(VENV)/bin/rollingball compare

