"""``python -m emflow.cli``: the ``emflow`` command."""

from . import app

app(prog_name="emflow")
