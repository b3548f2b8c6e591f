# Two commands on a fresh machine:  make demo  (the main job)  and  make test  (the tests).
# Both create .venv/ with the project and its pinned dependencies on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp

# Prefect runs offline here: a temporary local server, no analytics.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: demo test test-slow bench install clean e2e

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/emflow demo --out demo-output

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# the dashboard end-to-end test: headless Debian chromium against a loopback Prefect server
e2e: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y chromium; }
	$(BIN)/python -m pytest tests/test_e2e_dashboard.py -m slow -rs

clean:
	rm -rf demo-output .pytest_cache .hypothesis
