# Two entry points (see README): `make run` and `make test`. Each installs what it needs into
# .venv on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test lint bench-quick

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/regcl up

bench-quick: $(STAMP)
	$(VENV)/bin/regcl bench cl --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(VENV)/bin/python -m pytest
