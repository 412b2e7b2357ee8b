# Two commands on a fresh machine:
#   make demo   create .venv, install, run the headline job on the built-in demo cohort
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export WANDB_SILENT ?= true

.PHONY: install demo test bench clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,sweep]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) run.py experiment=seg_multiclass

test: install
	WANDB_MODE=offline $(PY) -m pytest -q

bench: install
	$(PY) bench/run_all.py --quick

clean-demo:
	rm -rf data/demo
