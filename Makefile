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

# Fashion-MNIST from Debian's dataset-fashion-mnist (the loader finds it without flags); as
# root on Debian the package is installed, elsewhere one line says what to do instead
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
fashion-mnist:
	@if [ -f $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
		|| echo "fashion-mnist: apt-get install dataset-fashion-mnist failed; its tests will skip"; \
	else \
		echo "fashion-mnist: not installed (as root on Debian: apt-get install dataset-fashion-mnist; elsewhere: rollingball compare --data fashion_mnist --download); its real-data test will skip"; \
	fi

.PHONY: install test test-all compare fashion-mnist
install: $(VENV)/.installed fashion-mnist

test: $(VENV)/.installed fashion-mnist
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

test-all: $(VENV)/.installed fashion-mnist
	$(PY) -m pytest -q -m ""

compare: $(VENV)/.installed
	$(VENV)/bin/rollingball compare

