# Two entry points (see README): `make run` and `make test`. Each installs what it needs into
# .venv on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# Label Studio (#11) runs in a venv of its own (its Django stack must not share ours); the
# end-to-end test of /labelstudio starts it from there. Pinned in requirements-labelstudio.txt.
LS_VENV := .venv-labelstudio
LS_STAMP := $(LS_VENV)/.installed

.PHONY: run test test-vit-b lint bench-quick browser labelstudio

# The browser tests (#6) drive Debian's chromium; install it from the distribution when missing
# (Playwright's own browser download cannot reach its host from here).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium \
		|| { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }; }

$(LS_STAMP): requirements-labelstudio.txt
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --quiet -r requirements-labelstudio.txt
	touch $(LS_STAMP)

labelstudio: $(LS_STAMP)

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

test: $(STAMP) lint browser labelstudio
	$(VENV)/bin/python -m pytest

# Real SAM (vit_b, random weights written like the official checkpoint) through the whole
# service on the CPU; minutes to tens of minutes, so not part of `make test` (docs/deploy.md).
test-vit-b: $(STAMP)
	REGCL_TEST_VIT_B=1 $(VENV)/bin/python -m pytest tests/deploy/test_vit_b_flow.py -s
