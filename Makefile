# Two entry points (see README): `make run` and `make test`. Each installs what it needs on first
# use, from the committed locks under requirements/ (every package pinned and hash-checked).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# The main venv: runtime, s3 and dev extras plus the build backend (pyproject.toml chooses,
# requirements/dev.txt pins). The images install requirements/main.txt (runtime and s3).
LOCK := requirements/dev.txt
# Label Studio runs in a venv of its own (its Django stack must not share ours); the end-to-end
# tests of /labelstudio start it from there.
LS_VENV := .venv-labelstudio
LS_STAMP := $(LS_VENV)/.installed
LS_LOCK := requirements/labelstudio.txt

.PHONY: run test test-vit-b lint bench-quick browser labelstudio npm vendor venv lock

# The web page decodes masks in the browser with onnxruntime-web when it finds it under
# service/static/vendor/ (git-ignored), fetched here from the npm registry (never a CDN at run
# time); without it the page asks the server (POST /v1/segment). Three files of its dist/: the
# wasm-only ES module, its emscripten glue and the wasm binary.
ORT_WEB_VERSION := 1.31.1
ORT_WEB_DIR := service/static/vendor/onnxruntime-web
ORT_WEB_FILES := ort.wasm.min.mjs ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm
ORT_WEB_STAMP := $(ORT_WEB_DIR)/.version-$(ORT_WEB_VERSION)
vendor: $(ORT_WEB_STAMP)
$(ORT_WEB_STAMP):
	@if command -v npm >/dev/null 2>&1; then \
		tmp=$$(mktemp -d) && \
		npm pack --silent --pack-destination "$$tmp" onnxruntime-web@$(ORT_WEB_VERSION) >/dev/null && \
		tar -xzf "$$tmp/onnxruntime-web-$(ORT_WEB_VERSION).tgz" -C "$$tmp" && \
		rm -rf $(ORT_WEB_DIR) && mkdir -p $(ORT_WEB_DIR) && \
		cp $(addprefix "$$tmp"/package/dist/,$(ORT_WEB_FILES)) "$$tmp/package/package.json" \
			$(ORT_WEB_DIR)/ && \
		rm -rf "$$tmp" && touch $@; \
	else echo "npm not found: the web page will decode masks on the server"; fi

# `make test` must test the page's local decoding, so it installs Debian's npm when missing
# (`make run` does without: the page then asks the server).
npm:
	@command -v npm >/dev/null 2>&1 || { \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q npm \
		|| { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q npm; }; }

# The browser tests (#6) drive Debian's chromium; install it from the distribution when missing
# (Playwright's own browser download cannot reach its host from here).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium \
		|| { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }; }

# A changed lock makes a new venv (nothing of the old one left over); `pip install` then also
# runs the resolver over the lock, so a lock that misses a dependency fails here. `venv` runs
# after the stamp on every call: a package changed by hand goes back to the lock's version
# (tests/test_locks.py names any difference that remains).
$(STAMP): $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --require-hashes -r $(LOCK)
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)
	@$(VENV)/bin/pip install --quiet --require-hashes -r $(LOCK)

$(LS_STAMP): $(LS_LOCK)
	rm -rf $(LS_VENV)
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --quiet --require-hashes -r $(LS_LOCK)
	touch $(LS_STAMP)

labelstudio: $(LS_STAMP)
	@$(LS_VENV)/bin/pip install --quiet --require-hashes -r $(LS_LOCK)

# The locks, from pyproject.toml and requirements/*.in (uv pip compile, pinned in the dev extra):
# for CPython 3.11 on x86-64 Linux (this machine, the images, CI). The runtime lock takes the
# dev lock's versions, so the images run what the tests ran.
UV_COMPILE = $(VENV)/bin/uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" $(LOCK_FLAGS)
# Versions already locked stay unless pyproject.toml or an .in file asks otherwise; to move one:
# `make lock LOCK_FLAGS="--upgrade-package NAME"` (or --upgrade for all).
lock: $(STAMP)
	$(UV_COMPILE) pyproject.toml requirements/build.in --extra dev --extra s3 -o $(LOCK)
	$(UV_COMPILE) pyproject.toml requirements/build.in --extra s3 -c $(LOCK) \
		-o requirements/main.txt
	$(UV_COMPILE) requirements/labelstudio.in -o $(LS_LOCK)

run: venv vendor
	$(VENV)/bin/regcl up

bench-quick: venv
	$(VENV)/bin/regcl bench cl --quick

lint: venv
	$(VENV)/bin/ruff check .

test: venv lint browser labelstudio npm vendor
	$(VENV)/bin/python -m pytest

# Real SAM (vit_b, random weights written like the official checkpoint) through the whole
# service on the CPU, alone and with its timings printed (it is part of `make test` too).
test-vit-b: venv
	$(VENV)/bin/python -m pytest tests/deploy/test_vit_b_flow.py -s
