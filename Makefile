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

.PHONY: env demo test test-fast clean-env

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(PY) -m mindspeed_lab demo

# The whole suite, multi-process (msrun) tests included. CI runs exactly this.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Single-process tests only (no msrun jobs): a quick check while developing.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not multiprocess and not notebook and not browser and not slow" $(PYTEST_ARGS)

clean-env:
	rm -rf $(VENV)
