# The two commands of the README: `make demo` and `make test`. Both run the idempotent installer first.
SHELL := /bin/bash
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test lint
install:
	@bash scripts/install.sh

demo: install
	@bash scripts/demo.sh

test: install
	@bash scripts/test.sh

lint: install
	@ruff check .
