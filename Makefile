# Two commands on a fresh machine:
#   make demo   create .venv, install, run the headline job on the built-in demo cohort
#   make test   create .venv, install, run the lint gate and the whole test suite (what CI runs)
# Also: make test-fast (tests not marked slow, < 2 min), make lint (ruff check + format check), make format.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export WANDB_SILENT ?= true
PYTEST := WANDB_MODE=offline $(PY) -m pytest -q

.PHONY: install demo test test-fast lint format bench clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,sweep]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) run.py experiment=seg_multiclass

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: lint
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

bench: install
	$(PY) bench/run_all.py --quick

clean-demo:
	rm -rf data/demo
