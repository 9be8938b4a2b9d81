# Two commands on a fresh machine: `make demo` (set up .venv, run the demo) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On the project's machines these two wheels lie on local disk (pip's constraint file caps torch at
# them); installing them first means the project install below resolves torch without a download.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
RUN ?= runs/demo
# Two xdist workers, each running whole test modules, longest first (tests/conftest.py): Ray tests mostly wait (start-up,
# shutdown, polling), so two overlap their waiting on two cores. TEST_WORKERS=0 runs one process. Tests
# marked solo (they need the only Ray on the machine) run alone afterwards.
TEST_WORKERS ?= 2

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(BIN)/cxr demo --run $(RUN)

test: setup
	RAY_DATA_DISABLE_PROGRESS_BARS=1 GX_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m 'not solo' --durations=25
	RAY_DATA_DISABLE_PROGRESS_BARS=1 GX_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q -m solo

clean:
	rm -rf $(VENV) runs .pytest_cache
