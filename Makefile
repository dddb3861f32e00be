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
# Test files run on this many processes (pytest-xdist; a file's tests stay on one process so its module
# fixtures are built once): two for the inner loop (-m 'not slow': 150 s on one process here, 77-81 s on two),
# one for the full suite, whose servers, subprocesses and training jobs start processes of their own (on two it
# took 19 min here against 21 on one, measured the same day: too little to gain for timing-sensitive load tests
# sharing the cores). PYTEST_WORKERS=0 runs everything in this process, e.g. to step through with pdb.
PYTEST_WORKERS ?= $(if $(findstring not slow,$(PYTEST_ARGS)),2,0)

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
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

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
