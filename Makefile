# Two commands on a fresh machine:  make demo  (the main job)  and  make test  (the tests).
# Both create .venv/ with the project and its pinned dependencies on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp

# Prefect runs offline here: a temporary local server, no analytics.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: demo test test-slow bench install clean e2e test-slurm test-deploy

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m flows.demo --out demo-output

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

# SLURM end to end (tests/test_slurm.py): the tests start a one-node SLURM cluster (munged, slurmctld,
# slurmd; deploy/slurm/local-cluster.sh), run the fit flow on dask-jobqueue workers that are SLURM
# jobs, and stop everything by pid. Installs slurm-wlm and munge with apt when missing; needs root
# (or sudo), as slurmd starts the jobs. EMFLOW_REQUIRE_SLURM=1: a missing piece fails, never skips.
SLURM_STAMP = $(VENV)/.slurm-stamp
$(SLURM_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,slurm]'
	touch $(SLURM_STAMP)

test-slurm: $(SLURM_STAMP)
	@PATH="$$PATH:/usr/sbin:/sbin"; command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y slurm-wlm munge; }
	SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO env "PATH=$$PATH:/usr/sbin:/sbin" EMFLOW_REQUIRE_SLURM=1 $(BIN)/python -m pytest tests/test_slurm.py -m slow -rs

# the Kubernetes recipe and the worker image, as far as no cluster and no Docker allow:
# the DaskCluster resource against the operator's schema, and the Dockerfile's environment built
# in a temporary virtualenv (slow: downloads and installs the image's packages)
K8S_STAMP = $(VENV)/.kubernetes-stamp
$(K8S_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,kubernetes]'
	touch $(K8S_STAMP)

test-deploy: $(K8S_STAMP)
	$(BIN)/python -m pytest tests/test_deploy_k8s.py -m 'slow or not slow' -rs

clean:
	rm -rf demo-output .pytest_cache .hypothesis
