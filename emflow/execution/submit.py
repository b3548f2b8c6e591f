"""How the engine hands one pass to a Dask cluster with the fewest messages and hops.

The fixed cost of a pass on a started cluster is latency, not computation: every message
between the client, the scheduler and the workers goes through a batched stream that
sends at most once per interval (client to scheduler: 10 ms; scheduler to a worker: 5 ms;
worker or scheduler back: 2 ms), and every level of reduction tasks costs a round of such
messages plus a transfer between workers. So a pass here:

* submits all its map tasks in one message (:func:`submit_map`, one ``Client.map``); the
  parameters go to every worker once beforehand (``Engine._broadcast``), not inside the
  tasks, whose unpickled copies would lie at any alignment and round 1 ulp apart;
* runs the reduction tree on the workers only down to its last node when the statistics
  are large; when they are small (:data:`CLIENT_COMBINE_BYTES`), the last node's inputs
  (at most ``split_every`` bundles) come back in one gather and are added on the client:
  the same node of the same tree, so the same bits;
* lowers the client's batching interval to :data:`CLIENT_BATCH_INTERVAL` while the pass
  runs (:func:`prompt_client`), restored afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Sequence

import numpy as np

from .tasks import _apply, _apply_indexed, _apply_reduce
from .watch import Probes

__all__ = ["CLIENT_BATCH_INTERVAL", "blas_controller", "CLIENT_COMBINE_BYTES", "nbytes", "submit_map",
           "prompt_client"]

# seconds between two sends of the client's stream to the scheduler while a pass runs
# (Dask's default, 10 ms, is the floor of a pass's time when a pass needs two sends)
CLIENT_BATCH_INTERVAL = 0.001
# statistics bundles at most this large are added on the client at the tree's last node
CLIENT_COMBINE_BYTES = 1 << 20

def nbytes(obj: Any, _depth: int = 0) -> int:
    """Bytes of the arrays in ``obj`` (tuples, lists, dicts, dataclasses and plain objects
    looked into, a few levels deep); other leaves count 64 bytes."""
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if _depth > 6:
        return 64
    if isinstance(obj, (tuple, list)):
        return sum(nbytes(v, _depth + 1) for v in obj)
    if isinstance(obj, dict):
        return sum(nbytes(v, _depth + 1) for v in obj.values())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(nbytes(getattr(obj, f.name, None), _depth + 1) for f in dataclasses.fields(obj))
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict) and not isinstance(obj, type):
        return 64 + sum(nbytes(v, _depth + 1) for v in attrs.values())
    return 64


def submit_map(client, fn: Callable, handles: Sequence, args, per_partition: Sequence | None,
               width: int, split_every: int) -> list:
    """Futures of ``fn`` over the partitions (``width`` consecutive ones per task, reduced
    inside it), in order, submitted in one message. ``args``: the parameters, or a future
    holding them."""
    n = len(handles)
    if width > 1:
        starts = range(0, n, width)
        batches = [list(handles[i:i + width]) for i in starts]
        extras = [None if per_partition is None else list(per_partition[i:i + width]) for i in starts]
        m = len(batches)
        return client.map(_apply_reduce, [fn] * m, batches, [args] * m, extras, [width] * m,
                          [split_every] * m, pure=False)
    if per_partition is None:
        return client.map(_apply, [fn] * n, list(handles), [args] * n, pure=False)
    return client.map(_apply_indexed, [fn] * n, list(handles), [args] * n, list(per_partition), pure=False)


def name(fn: Callable) -> str:
    """What a pass's function is called in the history of pass times."""
    return getattr(fn, "__qualname__", type(fn).__qualname__)


def probes(parts: list, threads: int) -> Probes:
    """A pass's first map tasks (one per thread at most): the first of them to finish
    gives the first pass of a function its usual time (``ClusterWatch._wait``)."""
    return Probes(list(parts[:max(1, threads)]), len(parts))


@contextlib.contextmanager
def prompt_client(client):
    """The client's stream to the scheduler sends at most every CLIENT_BATCH_INTERVAL
    seconds inside the block (its own setting again afterwards)."""
    comm = getattr(client, "scheduler_comm", None)
    before = getattr(comm, "interval", None)
    if not isinstance(before, (int, float)) or before <= CLIENT_BATCH_INTERVAL:
        yield
        return
    comm.interval = CLIENT_BATCH_INTERVAL
    try:
        yield
    finally:
        comm.interval = before


@functools.cache
def blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries, found once per process (scanning
    them costs 10-30 ms: once per in-process engine was once per fit)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()
