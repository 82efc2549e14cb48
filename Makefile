# Two commands on a fresh clone: `make run` and `make test`. Both set up .venv first (once; a stamp
# file makes the second time a no-op). torch==2.13.0 goes in alone first so pip takes the local CPU
# wheel; everything else is installed under constraints.txt (exact pins). The editable install is in compat mode
# (a path entry, not setuptools' default import hook): then medprune's regular packages `data` and `models` win
# over a `data/` or `models/` folder of the working directory, so the commands work from a researcher's folder.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.medprune-installed
EXP    ?=
ARGS   ?=

export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup run test test-unit test-all test-slow ui sweep report bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]' --config-settings editable_mode=compat
	@if $(BIN)/python -m pip list 2>/dev/null | grep -i '^nvidia-'; then \
		echo "error: CUDA (nvidia-*) packages were pulled in; check constraints.txt" >&2; exit 1; fi
	touch $@

run: setup
	$(BIN)/python -m pipeline.run $(ARGS)

# Tiers (tests/conftest.py): unit (in-process, the bulk), integration (pipeline jobs on tiny settings),
# slow (processes, signals, servers, every preset end to end), realdata (../shared/realdata, skipped when absent).
# `make test` = unit + integration, one pytest worker per core (at most 4; pytest-xdist), a test file per worker
# (its module fixtures are shared by its tests); `make test-slow` runs the slow tier alone, one test at a time (its
# tests start processes and time kills).
XDIST := -n auto --maxprocesses 4 --dist loadfile

test: setup
	$(BIN)/python -m pytest -q $(XDIST) $(ARGS)

test-unit: setup
	$(BIN)/python -m pytest -q -m unit $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(ARGS)

test-all: setup
	$(BIN)/python -m pytest -q $(XDIST) -m "unit or integration" $(ARGS)
	$(BIN)/python -m pytest -q -m slow $(ARGS)

sweep: setup
	$(BIN)/python -m pipeline.run -m $(if $(EXP),experiment=$(EXP)) $(ARGS)

report: setup
	$(BIN)/python -m pipeline.report $(EXP) $(ARGS)

bench: setup
	$(BIN)/python scripts/bench.py $(ARGS)

ui: setup
	$(BIN)/python -m pipeline.tracking ui

clean:
	rm -rf outputs
