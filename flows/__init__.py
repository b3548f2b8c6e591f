"""Prefect 3 flows around the emflow library: fit (every family), model selection, scoring, the demo.

Every family's fit flow is the one checkpointed flow of ``flows/_family.py`` (coarse tasks:
a whole stage, or a checkpointed run of EM iterations) with a small adapter per family; the
per-partition work stays in Dask. Deployments point at ``flows/<file>.py:<flow>`` (see
deploy/prefect.yaml). This folder is run from the repository (or the worker image's working
directory), never installed: the emflow distribution holds the library only. No file here
may be named like a standard-library module (Prefect puts this folder first on ``sys.path``
when it loads an entrypoint).

Importing this package (any flow module) sets two Prefect settings for the process,
unless they are already set in the environment:

* ``PREFECT_SERVER_ANALYTICS_ENABLED=false``: a flow run as a plain function starts a
  temporary Prefect server, whose telemetry otherwise fails offline (or on a busy SQLite
  database) and prints an error traceback;
* ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120``: that temporary server may need
  more than Prefect's 20 s default to start on a loaded machine.

Set either variable yourself to override it. Each module is also runnable:
``python -m flows.fit --param data=train.zarr --param out=model.zarr`` (see
:mod:`flows._main`).
"""

import os as _os

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}
for _key, _value in PREFECT_DEFAULTS.items():
    _os.environ.setdefault(_key, _value)
