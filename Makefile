# Two commands are all the set-up there is: `make run` and `make test`.
# requirements.lock pins every transitive version known to resolve here (pip backtracks for minutes without it);
# refresh it with `make lock` after changing dependencies.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | cksum | cut -d" " -f1)
DATA ?= data/world
export OPENBLAS_NUM_THREADS ?= 1
export MLFLOW_TRACKING_URI ?= sqlite:///mlruns/mlflow.db

.PHONY: run test install lint format clean lock

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements.lock -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/nextbest run --data $(DATA) --serve

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) data mlruns/*.db

lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v -E '^(nextbest|torch)==' > requirements.lock
	echo "torch==2.13.0" >> requirements.lock
