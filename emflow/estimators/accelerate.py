"""SQUAREM: squared extrapolation of the EM map, for every family (``accelerate="squarem"``).

Varadhan & Roland (2008), step length S3, as the ``SQUAREM`` R package's ``squarem1``
applies it, on the family's flat unconstrained parameter vector
(:func:`emflow.models.family.to_vector`). One cycle, from accepted parameters ``p0``:

1. pass at ``p0``: its objective and ``p1 = EM(p0)``;
2. pass at ``p1``: its objective and ``p2 = EM(p1)``;
3. ``r = x1 - x0``, ``v = x2 - 2 x1 + x0`` (``x = to_vector(p)``), step
   ``a = ||r|| / ||v||`` clamped to ``[1, step_max]`` (the paper's ``alpha = -a``, clamped at
   ``-1``), and the extrapolated point ``x' = x0 + 2 a r + a^2 v`` (``a = 1`` gives ``p2``);
4. pass at ``p' = from_vector(x')`` (the stabilising EM step): its objective and ``EM(p')``;
   the next pass, at ``EM(p')``, starts the next cycle.

Safeguards:

* **monotonicity**: ``p'`` is accepted only if its objective is not below the last accepted
  one (``p1``'s) beyond rounding, *and* the objective of its EM step ``q = EM(p')`` (the
  next pass) is not below ``p'``'s (an M-step with a floor such as ``reg_covar`` is not a
  maximiser, so EM from a point off the EM iterates can fall). Then ``p'`` and ``q`` are
  both accepted and ``q`` starts the next cycle. If ``p'`` falls below ``p1``, the cycle falls
  back to the plain EM step ``p2`` (one pass spent, ``rejected``); if ``q`` falls below
  ``p'`` but not below ``p1``, ``q`` is accepted alone; below both, back to ``p2`` (two
  passes spent, ``rejected_after_em_step``). So ``history`` never falls beyond rounding
  except where plain EM's own steps would;
* **parameter space**: a point whose parameters cannot be formed (non-finite coordinates,
  an SPD field whose Cholesky factorisation fails, a simplex or positive entry that
  underflows to 0) is never evaluated: the step is halved toward 1 (``a = (a + 1) / 2``, as
  SQUAREM backtracks) until it is inside, and ``p2`` is used once ``a`` is within 0.01 of 1.
  A point the family's M-step cannot start from (a GMM-HMM state left without mass raises
  FitFailedError) is rejected like one whose objective fell (``m_step_failed``);
* **step bound**: ``step_max`` starts at 1 and is multiplied by 4 each time an accepted step
  reaches it, divided by 4 when a step at the bound is rejected (``mstep = 4``).

A cycle whose step is within 0.01 of 1 uses ``p2`` without the stabilising pass (as the R
package). Parameters with exact zeros (a structural zero of a transition matrix) have no
finite coordinates; such cycles are plain EM (no extrapolation, no pass spent).

What is counted: ``history`` holds the objective of every accepted parameter set (the EM
iterates and the accepted extrapolations), so ``n_iter_ = len(history_)`` counts accepted
EM-equivalent iterations, each one E-step pass; rejected extrapolations are counted in
``fit_info_["acceleration"]["rejected"]`` and in ``n_passes_``. The stop rule is applied
after the EM steps only (an extrapolated point's objective can be close to the previous one
far from the optimum). A run resumed from a checkpoint starts a new cycle at the
checkpointed parameters (an EM iterate): same optimum, not the same path.

LDA: the vector carries the topics (``lambda``, and ``alpha`` when it is learned); the
per-document variational parameters are not parameters of the map (each E-step starts them
afresh), so nothing else needs carrying. Its objective is the variational bound.
"""

from __future__ import annotations

import functools
import inspect
import math

import numpy as np

from ..checks import Choice
from ..errors import FitFailedError
from ..models import family as F
from .em import ACCELERATIONS, EMRun, IterationEvent, _State

__all__ = ["SquaremState", "AccelerateRule", "add_accelerate_parameter", "STEP_MAX0", "MSTEP", "ROUNDING"]

STEP_MAX0 = 1.0
MSTEP = 4.0
# the objective may fall by this much (relative) between accepted points: rounding
ROUNDING = 1e-12
# halvings of the step toward 1 before an outside point is given up for p2
MAX_BACKTRACK = 20
# what an M-step from an extrapolated point may raise: that point is rejected as outside
_MSTEP_FAILURES = (FitFailedError, np.linalg.LinAlgError, FloatingPointError, ValueError, ZeroDivisionError)


def _inside(params, spec: F.ParamSpec) -> bool:
    """Parameters that EM may be run from: finite, SPD fields factorisable, positive parts > 0."""
    for name in params._fields:
        value = getattr(params, name)
        if value is None or isinstance(value, str):
            continue
        a = np.asarray(value)
        if a.dtype.kind not in "fc":
            continue
        if not np.all(np.isfinite(a)):
            return False
        c = spec.constraint(name, params)
        if c in ("positive", "simplex", "stochastic") and np.any(a <= 0):
            return False
        if c == "diagonal" and np.any(np.diagonal(a, axis1=-2, axis2=-1) <= 0):
            return False
        if c == "spd":
            try:
                np.linalg.cholesky(a.reshape(-1, a.shape[-1], a.shape[-1]))
            except np.linalg.LinAlgError:
                return False
    return True


class SquaremState(_State):
    """A run of :func:`emflow.estimators.em.run_em_group` that takes SQUAREM cycles."""

    def __init__(self, run: EMRun):
        super().__init__(run)
        if run.spec is None:
            raise ValueError("accelerate='squarem' needs the family's ParamSpec (EMRun.spec)")
        self.spec = run.spec
        # the point the next pass evaluates: 0 p0, 1 p1, 2 the extrapolated p', 3 EM(p')
        self.phase = 0
        self.points: list = []  # p0, p1, p2 of the current cycle
        self.step = 1.0
        self.step_max = STEP_MAX0
        self.counts = {"cycles": 0, "extrapolations": 0, "accepted": 0, "rejected": 0, "rejected_after_em_step": 0,
                       "backtracks": 0, "outside": 0, "m_step_failed": 0, "non_finite_vector": 0}
        self.held = None  # (objective, EM step, report) of an extrapolated point awaiting its EM step
        self.steps: list[float] = []

    def _below(self, ll: float, ref: float) -> bool:
        return not math.isfinite(ll) or ll < ref - ROUNDING * max(1.0, abs(ref))

    def take(self, stats) -> list[IterationEvent]:
        point = self.params
        if self.phase in (2, 3):
            try:
                ll, new, report = self.evaluate(stats)
            except _MSTEP_FAILURES:  # the M-step cannot run from there (a state without mass...)
                self.counts["m_step_failed"] += 1
                return self._reject(extra_pass=self.phase == 3)
        else:
            ll, new, report = self.evaluate(stats)
        if self.phase == 2:  # p' evaluated: held until its own EM step is known not to fall below it
            if self._below(ll, self.history[-1]):
                return self._reject()
            self.held = (ll, new, report)
            self.params, self.phase = new, 3
            return []
        if self.phase == 3:  # EM(p') evaluated
            held_ll, held_new, held_report = self.held
            self.held = None
            events = []
            if not self._below(ll, held_ll):
                self.counts["accepted"] += 1
                self._grow()
                events.append(self.accept(held_ll, held_new, held_report, step="squarem", check_stop=False))
                if self.done:  # max_iter reached: the fit ends at EM(p'), as plain EM ends at an EM step
                    return events
            elif self._below(ll, self.history[-1]):
                return self._reject(extra_pass=True)
            else:  # EM(p') is an EM iterate above the last accepted one; p' itself is dropped
                self.counts["rejected"] += 1
                self.step = 1.0
            self.points, self.phase = [point], 1
            return events + [self.accept(ll, new, report)]
        if self.phase == 0:
            self.points = [point]
            self.phase = 1
            return [self.accept(ll, new, report)]
        # phase 1: p1 evaluated, p2 = EM(p1)
        self.points += [point, new]
        self.phase = 0
        event = self.accept(ll, new, report)
        if not self.done:
            self._extrapolate()
        return [event]

    def _reject(self, extra_pass: bool = False) -> list:
        """Back to the plain EM step p2 of the cycle (the next cycle starts there)."""
        self.counts["rejected"] += 1
        self.counts["rejected_after_em_step"] += extra_pass
        if self.step == self.step_max:
            self.step_max = max(1.0, self.step_max / MSTEP)
        self.params, self.phase = self.points[2], 0
        self.step = 1.0
        self._grow()
        return []

    def _grow(self) -> None:
        """squarem1: a cycle whose step reached the bound raises the bound."""
        if self.step == self.step_max:
            self.step_max *= MSTEP

    def _extrapolate(self) -> None:
        """Set the next point: the extrapolated p' (phase 2) or, failing that, p2 (a new cycle)."""
        self.counts["cycles"] += 1
        p0, p1, p2 = self.points
        x0, x1, x2 = (F.to_vector(p, self.spec) for p in (p0, p1, p2))
        if not (np.all(np.isfinite(x0)) and np.all(np.isfinite(x1)) and np.all(np.isfinite(x2))):
            self.counts["non_finite_vector"] += 1
            return
        r = x1 - x0
        v = (x2 - x1) - r
        sr, sv = float(np.linalg.norm(r)), float(np.linalg.norm(v))
        if not (sv > 0 and sr > 0):
            self.step = 1.0
            return
        step = max(1.0, min(self.step_max, sr / sv))
        backtracked = False
        for _ in range(MAX_BACKTRACK):
            if abs(step - 1.0) <= 0.01:
                break  # p2 without a stabilising pass
            try:
                cand = F.from_vector(x0 + 2.0 * step * r + step * step * v, p2, self.spec)
                ok = _inside(cand, self.spec)
            except (np.linalg.LinAlgError, ValueError, FloatingPointError, OverflowError):
                ok = False
            if ok:
                self.step = step
                self.steps.append(step)
                self.counts["extrapolations"] += 1
                self.params, self.phase = cand, 2
                return
            self.counts["backtracks"] += 1
            backtracked = True
            step = (step + 1.0) / 2.0
        self.counts["outside"] += backtracked  # no step inside was found: p2
        self.step = step if not backtracked else 1.0
        self._grow()

    def acceleration(self) -> dict:
        steps = self.steps
        return {"method": "squarem", **self.counts, "passes": self.evaluations - len(self.run.history or []),
                "median_step": float(np.median(steps)) if steps else None,
                "max_step": float(max(steps)) if steps else None}


def add_accelerate_parameter(cls) -> None:
    """Give the ``__init__`` ``cls`` defines a keyword-only ``accelerate=None`` parameter
    (stored as ``self.accelerate``, listed by ``get_params``), so every family has it
    without repeating it (called by ``EMEstimator.__init_subclass__``)."""
    add_keyword_parameter(cls, "accelerate")


def add_keyword_parameter(cls, name: str) -> None:
    """Give the ``__init__`` ``cls`` defines a keyword-only parameter ``name=None`` (stored
    as ``self.<name>``, listed by ``get_params``): a parameter every family shares."""
    init = cls.__dict__.get("__init__")
    if init is None:
        return
    sig = inspect.signature(init)
    if name in sig.parameters:
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        value = kwargs.pop(name, None)
        init(self, *args, **kwargs)
        setattr(self, name, value)

    params = list(sig.parameters.values())
    extra = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
    at = len(params) - 1 if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD else len(params)
    __init__.__signature__ = sig.replace(parameters=[*params[:at], extra, *params[at:]])
    cls.__init__ = __init__


class AccelerateRule(Choice):
    """``accelerate``: None, "none" or "squarem" (the ConfigError names them)."""

    help = ("None or 'none': plain EM; 'squarem': SQUAREM (Varadhan and Roland 2008), extrapolated "
            "steps kept only when they do not lower the objective (fewer passes over the data).")

    def __init__(self):
        super().__init__(None, "none", "squarem")

    def check(self, name, value):
        if value is not None and not (isinstance(value, str) and value in ACCELERATIONS):
            from ..errors import ConfigError

            raise ConfigError(f"{name} must be None, 'none' or 'squarem', got {value!r}.")
