"""The command line: ``emflow fit | predict | info | generate | demo | ingest``.

``app`` is the Typer application the ``emflow`` console script runs; the commands live in
:mod:`emflow.cli.main` and :mod:`emflow.cli.ingest`.
"""

from .main import app

__all__ = ["app"]
