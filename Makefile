# The two set-up commands of the README. Each creates .venv and installs what it needs.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test clean

$(BIN)/codi-jax: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: $(BIN)/codi-jax
	$(BIN)/codi-jax demo --workdir outputs/demo

test: $(BIN)/codi-jax
	$(BIN)/python -m pytest -q --durations=25 tests

clean:
	rm -rf $(VENV) outputs .pytest_cache
