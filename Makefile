# Two commands on a fresh machine:  `make repro` (the pipeline) and `make test` (the test suite).
# Each creates .venv and installs Imager into it when missing or when pyproject.toml changed.
PYTHON ?= python3
VENV   ?= .venv
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install repro test bench mlflow-ui clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

repro: install            ## run the whole DVC pipeline on the embedded default (OpenMoji)
	dvc repro

test: install             ## run the test suite
	python -m pytest

bench: install            ## run the benchmarks into benchmarks/results/ (options: make bench ARGS="--fid --publish")
	python -m benchmarks $(ARGS)

mlflow-ui: install        ## browse the MLflow runs of this project
	mlflow ui --backend-store-uri sqlite:///mlflow.db

clean-venv:
	rm -rf $(VENV)
