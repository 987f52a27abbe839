# Two commands on a fresh machine:  `make repro` (the pipeline) and `make test` (the test suite).
# Each creates .venv and installs Imager into it when missing or when pyproject.toml changed.
# `make test-fast` is the edit-test loop: the linter and the tests outside the slow tier.
PYTHON ?= python3
VENV   ?= .venv
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install repro lint browser test test-fast docs docs-images docs-serve bench mlflow-ui clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

repro: install            ## run the whole DVC pipeline on the embedded default (OpenMoji)
	dvc repro

lint: install             ## ruff (its settings are in pyproject.toml)
	ruff check .

browser:                  ## Chromium for the browser tests (tests/browser/): apt-get installs it when missing, as root
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	else echo "Chromium is missing: the browser tests will be skipped. Install it as root: apt-get install chromium (or sudo make browser)"; fi

test: lint browser        ## the linter, then the whole test suite (what CI runs)
	python -m pytest $(PYTEST_ARGS)

test-fast: lint           ## the linter, then the tests outside the slow tier (no end-to-end training or dvc repro)
	python -m pytest -m "not slow" $(PYTEST_ARGS)

docs: install             ## build the documentation site into site/ in strict mode (a broken link or reference fails)
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict

docs-images: install      ## redraw the tutorials' pictures (docs/images/tutorials/) from the trained pipeline
	python docs/run_tutorials.py
	python docs/mlflow_screenshots.py   # the MLflow UI of the experiments tutorial, from ./mlflow.db (docs/images/mlflow/)

docs-serve: install       ## serve the documentation site at http://127.0.0.1:8000, rebuilt on every change
	NO_MKDOCS_2_WARNING=1 mkdocs serve

bench: install            ## run the benchmarks into benchmarks/results/ (options: make bench ARGS="--fid --publish")
	python -m benchmarks $(ARGS)

mlflow-ui: install        ## browse the MLflow runs of this project
	mlflow ui --backend-store-uri sqlite:///mlflow.db

clean-venv:
	rm -rf $(VENV)
