# resnetlab: `make demo` and `make test` bootstrap .venv from a plain python3, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench clean browser-deps

setup: $(STAMP)

# Re-install when the project's dependencies change. torch/torchvision come from PyPI by name.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/resnetlab demo

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

# The serve page's end-to-end test drives Debian's Chromium (Playwright's own browser download needs a network
# this project does not have). Installed when apt is there and we are root; otherwise that test skips, saying so.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "note: chromium not installed; the browser test of 'resnetlab serve' will be skipped"

test: setup lint browser-deps
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
