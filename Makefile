PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-slow run bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

run: $(STAMP)
	$(BIN)/hfrun solver=hf task=temporal_order_T30 run.eval_every=1 run.max_seconds=120

bench: $(STAMP)
	$(BIN)/python -m hfrun.bench

clean:
	rm -rf $(VENV) outputs multirun
