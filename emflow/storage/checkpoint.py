"""Checkpoints of an EM fit: each iteration's parameters, written atomically, read back safely.

A checkpoint is one ``.npz`` file next to the model output (``MODEL.checkpoint.npz``). It
holds the parameters after the latest M-step, the log-likelihood history, the seconds per
iteration, and a JSON header with the dataset fingerprint, a hash of the configuration that
determines the EM trajectory, and a digest of every array. It is written to a temporary
name in the same directory and moved into place with :func:`os.replace`, so a crash leaves
the previous checkpoint or the new one, never half of one.

Every family can be checkpointed, with no table to keep: the header names the family's
parameter NamedTuple (``module:qualname``, only emflow's own modules are accepted on
reading), its array fields are stored as arrays and its other fields (strings, numbers,
None) in the header. Format-1 checkpoints (emflow before the estimator contract) still
resume. Resuming passes ``initial_params=ckpt.params, history=ckpt.history`` to the estimator's
``fit`` (for LDA ``ckpt.params.components``); because iteration ``i + 1`` depends only on the parameters after
iteration ``i`` (and the history for the convergence test), the resumed fit reaches the
same result as one that was never interrupted.

A checkpoint that is unreadable, truncated, altered, written for other data or another
configuration is ignored with a :class:`CheckpointWarning` (and the fit starts afresh);
it never makes a fit fail. Nothing here imports Prefect: the flows and the CLI share it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..errors import StorageError
from ..models.gmm import GMMParams
from ..models.hmm import CategoricalHMMParams, GaussianHMMParams
from ..models.lda import make_params as _lda_params
from ..models.lgssm import LGSSMParams

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "CheckpointWarning",
    "CheckpointWriter",
    "checkpoint_path",
    "config_hash",
    "data_fingerprint",
    "dataset_fingerprint",
    "gmm_trajectory_config",
    "restore_fitted",
    "read_checkpoint",
    "load_resumable",
    "write_checkpoint",
]

CHECKPOINT_FORMAT = 2
_READABLE_FORMATS = (1, 2)


def _rebuild(cls, arrays_fields):
    return lambda arrays, attrs: cls(**{f: arrays[f] for f in arrays_fields}, **attrs)


_GMM_FIELDS = ("weights", "means", "covariances", "precisions_cholesky")
# Format 1 (emflow before the estimator contract) named the family and kept a hand-written
# table of fields per parameter type. Frozen: only read, so that those checkpoints still resume.
_LEGACY_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], Any]] = {
    "gaussian_mixture": (_GMM_FIELDS, ("covariance_type",), _rebuild(GMMParams, _GMM_FIELDS)),
    "gaussian_hmm": (("startprob", "transmat", "means", "covars"), ("covariance_type",),
                     _rebuild(GaussianHMMParams, ("startprob", "transmat", "means", "covars"))),
    "categorical_hmm": (("startprob", "transmat", "emissionprob"), (),
                        _rebuild(CategoricalHMMParams, ("startprob", "transmat", "emissionprob"))),
    "linear_gaussian_ssm": (LGSSMParams._fields, (), _rebuild(LGSSMParams, LGSSMParams._fields)),
    "latent_dirichlet_allocation": (("components", "doc_topic_prior"), (),
                                    lambda arrays, attrs: _lda_params(arrays["components"],
                                                                      arrays.get("doc_topic_prior"))),
}


def _type_path(params) -> str:
    t = type(params)
    if not (hasattr(t, "_fields") and t.__module__.startswith("emflow.")):
        raise TypeError(f"cannot checkpoint parameters of type {t.__name__}: a checkpoint holds an emflow "
                        "family's parameter NamedTuple")
    return f"{t.__module__}:{t.__qualname__}"


def _resolve_type(path: str):
    """The parameter NamedTuple named in a checkpoint header (only emflow's own modules)."""
    import importlib

    module, _, name = str(path).partition(":")
    if not module.startswith("emflow.") or not name:
        raise ValueError(f"parameter type {path!r} is not an emflow family's")
    try:
        t = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"parameter type {path!r} is unknown to this emflow ({exc})") from None
    if not hasattr(t, "_fields"):
        raise ValueError(f"{path!r} is not a parameter NamedTuple")
    return t


def _encode_params(p) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Array fields to arrays, the other fields (strings, numbers, None) to the header."""
    arrays, attrs = {}, {}
    for name, value in zip(p._fields, p):
        if isinstance(value, np.ndarray):
            arrays[name] = np.asarray(value, dtype=np.float64)
        elif value is None or isinstance(value, (str, bool, int, float, np.generic)):
            attrs[name] = value.item() if isinstance(value, np.generic) else value
        else:
            raise TypeError(f"cannot checkpoint field {name!r} of type {type(value).__name__}")
    return arrays, attrs


class CheckpointWarning(UserWarning):
    """A checkpoint was found but cannot be used; the fit starts from the beginning."""


def checkpoint_path(model_path: str | os.PathLike, init: int = 0) -> str:
    """Where the checkpoint of a fit writing ``model_path`` lives (restart ``init`` > 0 gets its own)."""
    base = os.path.abspath(os.fspath(model_path)).rstrip("/")
    return f"{base}.checkpoint.npz" if init == 0 else f"{base}.init{init}.checkpoint.npz"


def config_hash(config: Mapping[str, Any]) -> str:
    """A stable digest of the settings that determine the EM trajectory.

    Pass only what changes the sequence of parameters (components, covariance type,
    reg_covar, initialisation and its seed, sample weights...). ``tol`` and ``max_iter``
    only decide where the sequence stops, so a fit may resume under new values of them.
    """

    def norm(v):
        if isinstance(v, Mapping):
            return {str(k): norm(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        if isinstance(v, np.ndarray):
            return {"ndarray": v.astype(np.float64).tolist(), "shape": list(v.shape)}
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, float):
            return repr(v)  # exact, and keeps inf/nan
        return v

    text = json.dumps(norm(dict(config)), sort_keys=True, default=repr)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _digest(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(repr(a.shape).encode())
        h.update(a.view(np.uint8).ravel())
    return h.hexdigest()


@dataclass
class Checkpoint:
    """The state of a fit after ``iteration`` EM iterations.

    Attributes
    ----------
    params : GMMParams, GaussianHMMParams, CategoricalHMMParams, LGSSMParams or LDAParams
        Parameters after the M-step of the last iteration done.
    history : list of float
        Mean log-likelihood of each iteration done (``len(history) == iteration``).
    seconds : list of float
        Wall time of each iteration done.
    converged : bool
        The last iteration met the tolerance the fit was run with.
    fingerprint : str
        Content fingerprint of the dataset (``fit_info_["fingerprint"]``).
    config_hash : str
        :func:`config_hash` of the trajectory-defining settings.
    init : int
        Restart index.
    extra : dict
        Free JSON-able facts (tol used, engine...).
    """

    params: Any
    history: list[float]
    seconds: list[float]
    converged: bool
    fingerprint: str
    config_hash: str
    init: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def iteration(self) -> int:
        return len(self.history)


def write_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> str:
    """Write ``ckpt`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    path = os.path.abspath(os.fspath(path))
    p = ckpt.params
    params_type = _type_path(p)
    arrays, attrs = _encode_params(p)
    arrays["history"] = np.asarray(ckpt.history, dtype=np.float64)
    arrays["seconds"] = np.asarray(ckpt.seconds, dtype=np.float64)
    header = {
        "format": CHECKPOINT_FORMAT,
        "params_type": params_type,
        "fields": attrs,
        "iteration": ckpt.iteration,
        "converged": bool(ckpt.converged),
        "fingerprint": ckpt.fingerprint,
        "config_hash": ckpt.config_hash,
        "init": int(ckpt.init),
        "extra": ckpt.extra,
        "digest": _digest(arrays),
    }
    buf = io.BytesIO()
    np.savez(buf, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from .store import _tag, clean_checkpoint_leftovers

    clean_checkpoint_leftovers(path)  # temporaries of crashed writers (never of one still running)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{_tag()}")
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise StorageError(
                f"Could not write the checkpoint {path!r}: {exc.strerror or exc}. The previous checkpoint "
                "there (if any) is intact. Free some space, or write the model to a writable location."
            ) from exc
        raise
    return path


class _Unusable(Exception):
    pass


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint; raises ``ValueError`` (with the reason) when it is not intact."""
    try:
        with np.load(os.fspath(path), allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode())
            if header.get("format") not in _READABLE_FORMATS:
                raise ValueError(f"format {header.get('format')!r}, this emflow reads {_READABLE_FORMATS}")
            if header["format"] == 1:
                kind = _LEGACY_KINDS.get(header.get("family", "gaussian_mixture"))
                if kind is None:
                    raise ValueError(f"unknown model family {header.get('family')!r}")
                names = kind[0]
            else:
                kind, names = None, [n for n in z.files if n not in ("header", "history", "seconds")]
            arrays = {name: np.array(z[name]) for name in (*names, "history", "seconds")
                      if not (name == "doc_topic_prior" and name not in z.files)}
    except (OSError, ValueError, KeyError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"unreadable or truncated ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # zipfile.BadZipFile and friends
        raise ValueError(f"unreadable or truncated ({type(exc).__name__}: {exc})") from exc
    if _digest(arrays) != header.get("digest"):
        raise ValueError("its arrays do not match their recorded digest (the file was altered or damaged)")
    history = [float(v) for v in arrays["history"]]
    if len(history) != header.get("iteration") or not all(math.isfinite(v) for v in history):
        raise ValueError("its iteration history is inconsistent")
    if kind is not None:
        params = kind[2](arrays, {a: str(header[a]) for a in kind[1]})
    else:
        t = _resolve_type(header.get("params_type"))
        given = {**{k: v for k, v in arrays.items() if k not in ("history", "seconds")}, **header.get("fields", {})}
        missing = [f for f in t._fields if f not in given]
        if missing:
            raise ValueError(f"it lacks the parameter field(s) {missing}")
        params = t(**{f: given[f] for f in t._fields})
    return Checkpoint(params, history, [float(s) for s in arrays["seconds"]], bool(header["converged"]),
                      str(header["fingerprint"]), str(header["config_hash"]), int(header.get("init", 0)),
                      dict(header.get("extra") or {}))


def load_resumable(path: str | os.PathLike, *, fingerprint: str, config_hash: str,
                   tol: float, max_iter: int, stop_rule=None) -> Checkpoint | None:
    """The checkpoint at ``path`` if a fit with these settings can continue from it, else None.

    ``None`` without a warning when there is no file. Otherwise every reason to refuse it
    (unreadable, altered, other data, other configuration, or a history that a fit with
    this ``tol`` / ``max_iter`` would not have produced) gives a :class:`CheckpointWarning`
    and ``None``. The returned checkpoint's ``converged`` is re-evaluated for ``tol``.

    ``stop_rule(history) -> bool``, when given, replaces the test "the last change is below
    ``tol``": it says whether an uninterrupted fit would stop after the iterations in
    ``history`` (LDA, for one, stops on perplexity checked every ``evaluate_every``
    iterations). ``tol`` is then only reported.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return None

    def refuse(reason: str) -> None:
        warnings.warn(f"Ignoring the checkpoint {path!r}: {reason}. The fit starts from the beginning "
                      "and will overwrite it.", CheckpointWarning, stacklevel=3)
        return None

    try:
        ckpt = read_checkpoint(path)
    except ValueError as exc:
        return refuse(str(exc))
    if ckpt.fingerprint != fingerprint:
        return refuse(f"it was written for other data (fingerprint {ckpt.fingerprint}, the data now "
                      f"have {fingerprint})")
    if ckpt.config_hash != config_hash:
        return refuse("it was written with other settings (components, covariance type, reg_covar, "
                      "initialisation or seed differ)")
    h = ckpt.history
    if len(h) > max_iter:
        return refuse(f"it has {len(h)} iterations, more than max_iter={max_iter}")
    if stop_rule is None:
        def stop_rule(prefix):
            return len(prefix) > 1 and abs(prefix[-1] - prefix[-2]) < tol
    # an uninterrupted fit with these settings would have stopped at the first iteration
    # meeting the rule
    if any(stop_rule(h[:i]) for i in range(1, len(h))):
        return refuse(f"a fit with tol={tol} would have stopped before its last iteration")
    ckpt.converged = bool(h and stop_rule(h))
    return ckpt


class CheckpointWriter:
    """An EM callback that checkpoints every ``every`` iterations (and the converged one).

    Parameters
    ----------
    path : str
        Checkpoint file (see :func:`checkpoint_path`).
    fingerprint, config_hash : str
        Written into each checkpoint, checked by :func:`load_resumable`.
    history, seconds : list of float, optional
        Iterations already done before this fit started (when resuming).
    every : int, default 1
    extra : dict, optional
    record : sequence of str, optional
        Keys of the M-step report to keep per iteration in ``extra["records"][key]``
        (for instance the HMM's total ``log_prob``, which ``monitor_`` shows), so a
        resumed fit can report every iteration, not only those it ran.

    The writer keeps the full history, so :attr:`last` is the newest checkpoint written.
    """

    def __init__(self, path, *, fingerprint: str, config_hash: str, history=(), seconds=(),
                 every: int = 1, init: int = 0, extra: dict | None = None, record=()):
        self.path = os.fspath(path)
        self.fingerprint = fingerprint
        self.config_hash = config_hash
        self.history = list(history)
        self.seconds = list(seconds)
        self.every = max(1, int(every))
        self.init = init
        self.extra = dict(extra or {})
        self.record = tuple(record)
        if self.record:
            old = dict(self.extra.get("records") or {})
            self.extra["records"] = {k: [float(v) for v in old.get(k, [])] for k in self.record}
        self.last: Checkpoint | None = None

    def __call__(self, event) -> None:
        # event: an emflow.estimators.em.IterationEvent (duck-typed: storage imports no estimator)
        self.history.append(float(event.log_likelihood))
        self.seconds.append(float(event.seconds))
        for k in self.record:
            self.extra["records"][k].append(float(event.report.get(k, math.nan)))
        if event.converged or event.iteration % self.every == 0:
            extra = json.loads(json.dumps(self.extra))  # a snapshot (records keep growing)
            self.last = Checkpoint(event.params, list(self.history), list(self.seconds), bool(event.converged),
                                   self.fingerprint, self.config_hash, self.init, extra)
            write_checkpoint(self.path, self.last)


def gmm_trajectory_config(model, sample_weight: Any = None) -> dict:
    """The settings of a ``GaussianMixture`` that decide its EM trajectory (for :func:`config_hash`).

    ``tol`` and ``max_iter`` are left out on purpose (see :func:`config_hash`); so are the
    scheduler and persistence, which must not change the result.
    """
    rs = model.random_state
    if isinstance(rs, (np.random.Generator, np.random.RandomState)):
        rs = "generator"  # not reproducible from settings; the checkpoint still resumes exactly
    inits = {k: (None if getattr(model, k) is None else np.asarray(getattr(model, k), dtype=np.float64))
             for k in ("weights_init", "means_init", "precisions_init")}
    if sample_weight is not None and not isinstance(sample_weight, (str, os.PathLike)):
        sw = np.asarray(sample_weight, dtype=np.float64)
        sample_weight = hashlib.blake2b(np.ascontiguousarray(sw).view(np.uint8).ravel(), digest_size=16).hexdigest()
    return {
        "family": "gaussian_mixture", "n_components": int(model.n_components),
        "covariance_type": model.covariance_type, "reg_covar": float(model.reg_covar),
        "init_params": model.init_params, "random_state": rs, "sample_weight":
        None if sample_weight is None else os.fspath(sample_weight), **inits,
    }


def data_fingerprint(data, sample_weight: Any = None, *, scheduler: Any = None, min_rows: int = 1) -> dict:
    """Open, validate and fingerprint a row dataset in one streaming pass.

    Every chunk is read once and checked (present in storage and decodable, finite values,
    valid weights; bad values are counted over the whole dataset); the content
    fingerprint is the one ``GaussianMixture.fit`` records in ``fit_info_["fingerprint"]``
    when run on the same scheduler. Returns a dict with ``fingerprint``, ``source``,
    ``n_samples``, ``n_features``, ``dtype``, ``nbytes``, ``partitions``, ``weight_sum``.
    """
    from ..execution.cluster import engine_for

    with engine_for(scheduler) as engine:
        loaded = engine.open(data, sample_weight, min_rows=min_rows, persist=False)
        try:
            rows = loaded.data
            return {
                "fingerprint": loaded.fingerprint, "source": rows.source, "n_samples": int(rows.n_rows),
                "n_features": int(rows.n_features), "dtype": str(rows.dtype), "nbytes": int(rows.nbytes),
                "partitions": int(rows.n_partitions), "weight_sum": float(loaded.weight_sum),
                "engine": engine.describe(),
            }
        finally:
            loaded.release()


def dataset_fingerprint(dataset, *, scheduler: Any = None) -> dict:
    """Validate and fingerprint an opened dataset (rows, sequences or a corpus) in one pass.

    ``dataset`` is what :func:`emflow.storage.sequences.open_sequences` or
    :func:`emflow.storage.corpus.open_corpus` returns. The fingerprint does not depend on the
    partitioning, so it equals ``fit_info_["fingerprint"]`` of an estimator fitted on the
    same data. Returns a dict with ``fingerprint``, ``source``, ``n_rows`` (steps, or
    documents), ``n_features`` (features, or terms), ``dtype``, ``partitions``, ``engine``,
    and ``n_sequences`` / ``nnz`` where they apply.
    """
    from ..execution.cluster import engine_for

    with engine_for(scheduler) as engine:
        loaded = engine.load(dataset, persist=False)
        try:
            d = loaded.data
            info = {"fingerprint": loaded.fingerprint, "source": d.source, "n_rows": int(d.n_rows),
                    "n_features": int(d.n_features), "dtype": str(d.dtype), "partitions": int(d.n_partitions),
                    "engine": engine.describe()}
            for name in ("n_sequences", "n_docs", "nnz"):
                if hasattr(d, name):
                    info[name] = int(getattr(d, name))
            return info
        finally:
            loaded.release()


def restore_fitted(model, ckpt: Checkpoint, fit_info: Mapping[str, Any] | None = None):
    """Give ``model`` (any emflow estimator) the fitted state recorded in a finished checkpoint.

    Used when a fit was killed after its last iteration but before the model was saved:
    nothing is recomputed, and the attributes are those the uninterrupted fit had.
    ``fit_info`` (the dataset facts) gives ``n_features_in_``.
    """
    model._set_parameters(ckpt.params)
    model.converged_, model.n_iter_ = bool(ckpt.converged), len(ckpt.history)
    model.lower_bound_ = float(ckpt.history[-1]) if ckpt.history else -math.inf
    model.history_ = list(ckpt.history)
    model.lower_bounds_ = list(ckpt.history)
    info = dict(fit_info or {})
    if "n_features" in info:
        model.n_features_in_ = int(info["n_features"])
    info.setdefault("fingerprint", ckpt.fingerprint)
    info["seconds_per_iteration"] = list(ckpt.seconds)
    info["resumed_from_checkpoint"] = True
    model.fit_info_ = info
    return model
