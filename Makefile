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

# each step says what it does (@echo "==> ..."); the install runs once (again only when pyproject.toml changes)
$(VENV)/.installed: pyproject.toml
	@echo "==> [install 1/3] creating the virtual environment $(VENV) ($(PYTHON))"
	$(PYTHON) -m venv $(VENV)
	@echo "==> [install 2/3] upgrading pip"
	$(PY) -m pip install -q --upgrade pip
	@echo "==> [install 3/3] installing histolight and its dependencies into $(VENV) (first time: several minutes;"
	@echo "    the pinned torch is its CUDA build, about 6.5 GB in $(VENV), see README 'Install')"
	$(PY) -m pip install -q -e ".[dev,sweep]"
	touch $@
	@echo "==> installed: $(VENV)/bin/histolight (or 'source $(VENV)/bin/activate', then histolight / python run.py)"

install: $(VENV)/.installed

demo: install
	@echo "==> [demo] experiment=seg_multiclass: generate the demo cohort on first use (data/demo/), train a U-Net,"
	@echo "    write the model, metrics and validation overlays under outputs/<date>/<time>/ (a few minutes on CPU)"
	$(VENV)/bin/histolight experiment=seg_multiclass
	@echo "==> [demo] done. Next: README 'First hour' ($(VENV)/bin/histolight task=segment task.model=<run dir>)"

lint: install
	@echo "==> [lint 1/2] ruff check"
	$(PY) -m ruff check .
	@echo "==> [lint 2/2] ruff format --check"
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: lint
	@echo "==> [test] the whole test suite (pytest, W&B offline; slow end-to-end tests included, about 15 min)"
	$(PYTEST)
	@echo "==> [test] done"

test-fast: install
	@echo "==> [test-fast] tests not marked slow, in 2 processes (pytest -m 'not slow' -n 2)"
	$(PYTEST) -m "not slow" -n 2

bench: install
	$(PY) bench/run_all.py --quick

clean-demo:
	rm -rf data/demo
