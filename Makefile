# Two commands set up a fresh machine: `make run` runs Parley, `make test` runs the whole suite.
# Both create .venv (Python >= 3.11) and install the pinned dependencies from requirements.lock.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint lock clean

# The same two pip steps as the Dockerfile: the pinned lock, then Parley itself without deps.
$(VENV)/.installed: pyproject.toml requirements.lock requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock -r requirements-dev.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

run: $(VENV)/.installed
	$(BIN)/parley run

test: $(VENV)/.installed
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Re-pin after changing dependencies in pyproject.toml. pip freeze drops environment markers:
# MARKERS puts back pyproject's (uvloop is not built for Windows).
MARKERS := s/^uvloop==.*/& ; sys_platform != "win32"/
lock:
	rm -rf .lockvenv && $(PYTHON) -m venv .lockvenv
	.lockvenv/bin/python -m pip install -q --upgrade pip
	.lockvenv/bin/python -m pip install -q -e .
	.lockvenv/bin/python -m pip freeze --exclude-editable | grep -v '^-e' | sed '$(MARKERS)' \
		> requirements.lock
	.lockvenv/bin/python -m pip install -q -e '.[dev]'
	.lockvenv/bin/python -m pip freeze --exclude-editable | grep -v '^-e' | sed '$(MARKERS)' \
		| grep -vxF -f requirements.lock > requirements-dev.lock
	rm -rf .lockvenv

clean:
	rm -rf $(VENV)
