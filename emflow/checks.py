"""The parameter checks every emflow estimator (and the command line) shares, and the
declarative rules the estimators' ``_param_rules`` tables are made of."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = ["MIN_PARTITION_BYTES", "MAX_SEED", "check_int", "check_real", "check_choice",
           "check_random_state", "check_partition_bytes", "check_execution", "rng_from",
           "Rule", "Int", "Real", "Choice", "Flag", "Letters", "check_rules"]


# -- parameter checks shared by every estimator (and the command line) --------------------
#
# scikit-learn's ``_parameter_constraints`` habits: a count is an int and never a bool; a
# tolerance is a real number (NaN is not one); ``random_state`` is None, an int in
# [0, 2**32 - 1] (what NumPy accepts as a seed), a ``RandomState`` or a ``Generator``. Every
# message names the parameter, the valid range and the value given.

MAX_SEED = 2**32 - 1
MIN_PARTITION_BYTES = 1024
"""Smallest ``partition_bytes`` accepted (1 KiB). A partition is always at least one whole
chunk (or one whole sequence / document), so a smaller target only multiplies per-task
overhead; a value below 1 KiB is nearly always a unit mistake (MiB meant for bytes)."""


def _config_error(name: str, message: str) -> ConfigError:
    exc = ConfigError(message)
    exc.param = name  # the command line maps it to its option's name
    return exc


def is_int(value: Any) -> bool:
    """An integer that is not a bool (``True`` is not a count)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """A real number that is not a bool and not NaN."""
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and not np.isnan(value))


def _range_text(low, high, kind: str, closed_low: bool = True) -> str:
    if low is not None and high is not None:
        return f"{kind} in [{low}, {high}]"
    if low is not None:
        if kind == "an integer" and low == 1:
            return "an integer >= 1"
        return f"{kind} {'>=' if closed_low else '>'} {low}"
    if high is not None:
        return f"{kind} <= {high}"
    return kind


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None, *,
              allow_none: bool = False) -> None:
    """``value`` is an int (not a bool) in ``[low, high]`` (or None with ``allow_none``)."""
    if value is None and allow_none:
        return
    if is_int(value) and (low is None or value >= low) and (high is None or value <= high):
        return
    text = _range_text(low, high, "an integer") + (" or None" if allow_none else "")
    raise _config_error(name, f"{name} must be {text}, got {value!r}.")


def check_real(name: str, value: Any, low: float | None = None, *, strict: bool = False, finite: bool = False,
               allow_none: bool = False, hint: str = "") -> None:
    """``value`` is a real number >= ``low`` (> with ``strict``), finite with ``finite``."""
    if value is None and allow_none:
        return
    ok = is_real(value) and (low is None or (value > low if strict else value >= low))
    if ok and finite and not np.isfinite(value):
        ok = False
    if ok:
        return
    kind = "a finite number" if finite else "a number"
    text = _range_text(low, None, kind, closed_low=not strict) + (" or None" if allow_none else "")
    raise _config_error(name, f"{name} must be {text}{hint}, got {value!r}.")


def check_choice(name: str, value: Any, choices) -> None:
    if not isinstance(value, (str, bool)) or value not in tuple(choices):
        raise _config_error(name, f"{name} must be one of {tuple(choices)}, got {value!r}.")


def check_random_state(value: Any, name: str = "random_state") -> None:
    """None, an int in [0, 2**32 - 1], a ``numpy.random.RandomState`` or a ``numpy.random.Generator``."""
    if value is None or isinstance(value, (np.random.RandomState, np.random.Generator)):
        return
    if is_int(value) and 0 <= value <= MAX_SEED:
        return
    raise _config_error(name, f"{name} must be None, an integer in [0, {MAX_SEED}], a numpy.random.RandomState "
                              f"or a numpy.random.Generator, got {value!r}.")


def check_partition_bytes(value: Any, *, allow_none: bool = True, name: str = "partition_bytes") -> None:
    """An int >= :data:`MIN_PARTITION_BYTES` (1 KiB), or None (the library default)."""
    if value is None and allow_none:
        return
    if is_int(value) and value >= MIN_PARTITION_BYTES:
        return
    raise _config_error(name, f"{name} must be an integer >= {MIN_PARTITION_BYTES} (1 KiB; it counts bytes, "
                              f"not MiB){' or None' if allow_none else ''}, got {value!r}.")


def check_execution(est, *, partition_bytes_none: bool = True) -> None:
    """The execution parameters every estimator shares: ``random_state``, ``split_every``,
    ``persist`` and (where it has one) ``partition_bytes`` (None allowed with
    ``partition_bytes_none``)."""
    check_random_state(est.random_state)
    check_int("split_every", est.split_every, 2)
    if not (est.persist == "auto" or isinstance(est.persist, (bool, np.bool_))):
        raise _config_error("persist", f"persist must be 'auto', True or False, got {est.persist!r}.")
    if hasattr(est, "partition_bytes"):
        check_partition_bytes(est.partition_bytes, allow_none=partition_bytes_none)


def rng_from(random_state) -> np.random.Generator:
    """A ``numpy.random.Generator`` from a checked ``random_state`` (a Generator is used as it is;
    a RandomState seeds a new one from its stream)."""
    check_random_state(random_state)
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, np.random.RandomState):
        return np.random.default_rng(random_state.randint(2**31 - 1))
    return np.random.default_rng(random_state)


# -- declarative constraints (scikit-learn's ``_parameter_constraints`` habit) ---------------
#
# An estimator declares ``_param_rules = {"n_components": Int(1), "tol": Real(0), ...}``;
# subclasses extend their parents' table, and :meth:`emflow.estimators.base.EMEstimator.
# _validate_params` checks every entry (then the execution parameters every estimator has,
# then the family's cross-parameter checks), before anything is opened or written.


class Rule:
    """One parameter's constraint; ``check(name, value)`` raises a ConfigError naming it."""

    def check(self, name: str, value: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class Int(Rule):
    """An int (not a bool) in ``[low, high]``, or None with ``allow_none``."""

    def __init__(self, low: int | None = None, high: int | None = None, *, allow_none: bool = False):
        self.low, self.high, self.allow_none = low, high, allow_none

    def check(self, name, value):
        check_int(name, value, self.low, self.high, allow_none=self.allow_none)


class Real(Rule):
    """A real number >= ``low`` (> with ``strict``), finite with ``finite``, or None with ``allow_none``."""

    def __init__(self, low: float | None = None, *, strict: bool = False, finite: bool = False,
                 allow_none: bool = False):
        self.low, self.strict, self.finite, self.allow_none = low, strict, finite, allow_none

    def check(self, name, value):
        check_real(name, value, self.low, strict=self.strict, finite=self.finite, allow_none=self.allow_none)


class Choice(Rule):
    """One of ``options``."""

    def __init__(self, *options):
        self.options = tuple(options)

    def check(self, name, value):
        check_choice(name, value, self.options)


class Flag(Rule):
    """True or False."""

    def check(self, name, value):
        if not isinstance(value, (bool, np.bool_)):
            raise _config_error(name, f"{name} must be True or False, got {value!r}.")


class Letters(Rule):
    """A string of letters from ``letters`` (hmmlearn's ``params`` / ``init_params``)."""

    def __init__(self, letters: str):
        self.letters = letters

    def check(self, name, value):
        if not isinstance(value, str) or set(value) - set(self.letters):
            raise _config_error(name, f"{name} must be a string of letters from {self.letters!r}, got {value!r}.")


def check_rules(est, rules: dict[str, Rule]) -> None:
    """Check every ``name: rule`` of ``rules`` against ``est``'s attribute of that name."""
    for name, rule in rules.items():
        rule.check(name, getattr(est, name))
