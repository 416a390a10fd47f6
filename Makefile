# The project's two commands (see README.md):
#   make demo   - set up the environment if needed, then run the demo
#   make test   - set up the environment if needed, then run the whole test suite
# Everything is installed into .venv from pyproject.toml (+ constraints.txt); the install is
# redone only when those files change.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_HASH := $(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
PYTEST_ARGS ?=
# The browser tests (marker `browser`) drive JupyterLab in Debian's Chromium, installed with
# apt-get when it is missing (sudo only when not root). `make test` needs it; `make test-fast` not.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: env browser demo test test-fast clean-env

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

env: $(STAMP)

$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "Chromium is missing at $(CHROMIUM) and there is no apt-get: install Chromium and run make with CHROMIUM=/path/to/chromium"; exit 1; }
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

browser: $(CHROMIUM)

demo: $(STAMP)
	$(PY) -m mindspeed_lab demo

# The whole suite, multi-process (msrun) and browser tests included. CI runs exactly this.
# MINDSPEED_REQUIRE_BROWSER=1: a missing browser fails the browser tests instead of skipping them.
test: $(STAMP) | $(CHROMIUM)
	MINDSPEED_REQUIRE_BROWSER=1 MINDSPEED_CHROMIUM=$(CHROMIUM) $(PY) -m pytest $(PYTEST_ARGS)

# Single-process tests only (no msrun jobs): a quick check while developing.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not multiprocess and not notebook and not browser and not slow" $(PYTEST_ARGS)

clean-env:
	rm -rf $(VENV)
