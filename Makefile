# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (lint + the test suite
# on the TensorFlow, JAX and PyTorch backends). Both build .venv from this repo's own files first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BACKENDS ?= tensorflow jax torch
PYTEST_ARGS ?=

.PHONY: install test lint demo clean

$(STAMP): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel of torch; an unpinned torch would pull the multi-GB CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[cpu,jax,torch,plots,test]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	@set -e; for backend in $(BACKENDS); do \
	  echo "=== pytest, KERAS_BACKEND=$$backend ==="; \
	  KERAS_BACKEND=$$backend $(BIN)/python -m pytest -q $(PYTEST_ARGS); \
	done

# The demo's data: Fashion-MNIST from the Debian package dataset-fashion-mnist, installed only when missing
# (make demo DEMO_ARGS="--dataset digits" needs nothing but scikit-learn).
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
DEMO_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

demo: install
	@if ! echo " $(DEMO_ARGS) " | grep -Eq -- "--data-dir|--dataset[ =](digits|mnist5k|cifar10|cifar100|mnist) " \
	    && [ ! -f "$(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz" ]; then \
	  echo "Fashion-MNIST is not in $(FASHION_MNIST_DIR): installing the Debian package dataset-fashion-mnist"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist \
	    || echo "Could not install dataset-fashion-mnist; try: make demo DEMO_ARGS=\"--dataset digits\""; \
	fi
	FASHION_MNIST_DIR=$(FASHION_MNIST_DIR) $(BIN)/python examples/demo.py $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
