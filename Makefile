# Two entry points (see README): `make run` and `make test`. Each installs what it needs into
# .venv on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# Label Studio (#11) runs in a venv of its own (its Django stack must not share ours); the
# end-to-end test of /labelstudio starts it from there. Pinned in requirements-labelstudio.txt.
LS_VENV := .venv-labelstudio
LS_STAMP := $(LS_VENV)/.installed

.PHONY: run test test-vit-b lint bench-quick browser labelstudio npm vendor

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

$(LS_STAMP): requirements-labelstudio.txt
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --quiet -r requirements-labelstudio.txt
	touch $(LS_STAMP)

labelstudio: $(LS_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP) vendor
	$(VENV)/bin/regcl up

bench-quick: $(STAMP)
	$(VENV)/bin/regcl bench cl --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint browser labelstudio npm vendor
	$(VENV)/bin/python -m pytest

# Real SAM (vit_b, random weights written like the official checkpoint) through the whole
# service on the CPU; minutes to tens of minutes, so not part of `make test` (docs/deploy.md).
test-vit-b: $(STAMP)
	REGCL_TEST_VIT_B=1 $(VENV)/bin/python -m pytest tests/deploy/test_vit_b_flow.py -s
