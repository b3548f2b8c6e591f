"""The family options of ``emflow fit``, generated from the registry, never written per family.

Every registered estimator (:data:`emflow.estimators.REGISTRY`) becomes ``--model NAME``
(its class's ``cli_name``); each constructor parameter becomes an option: its type from the
family's declared rule (``_param_rules``: Int, Real, Choice, Flag, Letters) or, without a
rule, from its default; its default from ``get_params()``; its help from the numpydoc
"Parameters" section of the class (or a parent's) docstring. A family or a parameter added
later shows up here with no edit.
"""

from __future__ import annotations

import inspect
import json
import re
from functools import lru_cache
from typing import Any, Optional

import typer
from enum import Enum

from ..checks import Choice, Flag, Int, Letters, Real

__all__ = ["EXECUTION", "families", "family_by_name", "family_options", "doc_params", "given"]

# parameters every estimator has, set by the command's own options (--seed, --persist,
# --partition-mib, --scheduler) or by the command line itself (it prints its own progress)
EXECUTION = ("random_state", "scheduler", "persist", "partition_bytes", "verbose")
# option names users know from `emflow fit` (and scikit-learn), for any family that has the parameter
ALIASES = {"n_components": ("--components", "-k"), "covariance_type": ("--covariance", "-c"),
           "init_params": ("--init",)}
PREFIX = "family__"  # the click name of a family option (no clash with the command's own)


def families() -> dict[str, type]:
    """``{cli name: estimator class}`` of every registered family, sorted by name."""
    from ..estimators import discover

    return {cls.cli_name: cls for cls in sorted(discover().values(), key=lambda c: c.cli_name)}


def family_by_name(name: str):
    """The class ``--model name`` means: its ``cli_name``, family name or class name (any case);
    None when no registered family has it."""
    fams = families()
    key = name.strip().lower()
    for cls in fams.values():
        if key in (cls.cli_name, cls.family, cls.family.replace("_", "-"), cls.__name__.lower()):
            return cls
    return None


# -- help text from numpydoc docstrings ----------------------------------------------------

_ENTRY = re.compile(r"^(\w[\w, ]*?)\s*(?::\s*(.*))?$")


def _parse_params_section(doc: str) -> dict[str, str]:
    lines = inspect.cleandoc(doc).splitlines()
    out: dict[str, str] = {}
    try:
        start = next(i for i, ln in enumerate(lines[:-1])
                     if ln.strip() == "Parameters" and set(lines[i + 1].strip()) == {"-"})
    except StopIteration:
        return out
    names: list[str] = []
    typ, desc = "", []

    def flush():
        text = " ".join(desc).strip() or _type_help(typ)
        for n in names:
            out.setdefault(n, " ".join(text.split()))

    body = lines[start + 2:]
    for i, ln in enumerate(body):
        if i + 1 < len(body) and body[i + 1].strip() and set(body[i + 1].strip()) == {"-"}:
            break  # the next section's title
        if ln and not ln[0].isspace():
            m = _ENTRY.match(ln.strip())
            if m is None:
                continue
            flush()
            names = [n.strip() for n in m.group(1).split(",") if n.strip()]
            typ, desc = (m.group(2) or "").strip(), []
        elif ln.strip():
            desc.append(ln.strip())
    flush()
    return out


_PLAIN_TYPES = {"int", "float", "bool", "str", "int or None", "float or None", "bool or None"}


def _type_help(typ: str) -> str:
    """A parameter's type line as help, when it has no description: without its default
    (shown beside it) and empty when it only names a type or the choices (shown too)."""
    typ = re.sub(r",?\s*default\b.*$", "", typ).strip()
    return "" if typ.startswith("{") or typ in _PLAIN_TYPES else typ


def _clean(text: str) -> str:
    return text.replace("``", "`")


def doc_params(cls) -> dict[str, str]:
    """``{parameter: one-line help}`` from the "Parameters" sections of ``cls`` and its parents."""
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        if klass.__dict__.get("__doc__"):
            for k, v in _parse_params_section(klass.__doc__).items():
                out.setdefault(k, _clean(v))
    return out


# -- the options ---------------------------------------------------------------------------

def _json(text: str):
    """A value read as JSON when it parses (``0.5``, ``[1, 2]``, ``null``), else as a string."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _text(value) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _kind(name: str, rule, default) -> tuple[Any, dict, Optional[dict], str]:
    """``(annotation, typer.Option keywords, {shown: value} of a choice, note)`` of one parameter."""
    if isinstance(rule, Flag) or (rule is None and isinstance(default, bool)):
        return bool, {}, None, ""
    if isinstance(rule, Int):
        return (Optional[int] if rule.allow_none else int), {}, None, ""
    if isinstance(rule, Real):
        return (Optional[float] if rule.allow_none else float), {}, None, ""
    if isinstance(rule, Choice):
        values = {_text(o): o for o in rule.options}
        return Enum(f"{name}_choices", {k: k for k in values}, type=str), {}, values, ""
    if isinstance(rule, Letters):
        return str, {}, None, f"letters from {rule.letters!r}"
    if rule is None and isinstance(default, int) and not isinstance(default, bool):
        return int, {}, None, ""
    if rule is None and isinstance(default, float):
        return float, {}, None, ""
    if rule is None and isinstance(default, str):
        return str, {}, None, ""
    return Any, {"parser": _json, "metavar": "VALUE"}, None, "JSON or text"


def _decls(name: str, taken: set[str]) -> list[str]:
    return [d for d in ALIASES.get(name, ()) if d not in taken] or ["--" + name.replace("_", "-")]


def label(decls: list[str]) -> str:
    """How an error names an option: ``--components (-k)``."""
    longs = [d for d in decls if d.startswith("--")]
    shorts = [d for d in decls if not d.startswith("--")]
    return longs[0] + (f" ({shorts[0]})" if shorts else "")


@lru_cache(maxsize=None)
def family_options(cls, taken: frozenset = frozenset()) -> tuple[list, dict[str, str], dict]:
    """``(options, {parameter: option label}, {option: {shown choice: value}})`` for ``cls``'s
    constructor parameters, built by typer from a generated signature (so they look and parse
    as every other option); ``taken`` are the option names the command has already."""
    rules = cls._rules()
    defaults = cls().get_params(deep=False)
    helps = doc_params(cls)
    sig_params, annotations, labels, convert = [], {}, {}, {}
    for name, default in defaults.items():
        if name in EXECUTION:
            continue
        annotation, extra, choices, note = _kind(name, rules.get(name), default)
        decls = _decls(name, set(taken))
        if any(d in taken for d in decls):
            continue
        if annotation is bool:
            decls = [f"{decls[0]}/--no-{decls[0][2:]}"] + [d for d in decls[1:] if not d.startswith("--")]
        help_text = helps.get(name) or getattr(rules.get(name), "help", "")  # a rule may carry its help
        if note and note not in help_text:
            help_text = f"{help_text} ({note})" if help_text else note.capitalize() + "."
        if choices is not None:
            shown = annotation(_text(default)) if _text(default) in choices else None
        elif extra and default is not None and not isinstance(default, str):
            shown = json.dumps(_jsonable(default))
        else:
            shown = default
        info = typer.Option(shown, *decls, help=help_text, show_default=default is not None, **extra)
        key = PREFIX + name
        sig_params.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation))
        annotations[key] = annotation
        labels[name] = label([d.split("/")[0] for d in decls])
        if choices is not None:
            convert[key] = choices

    def generated(**kwargs):  # pragma: no cover - never called: only its signature is read
        return kwargs

    generated.__signature__ = inspect.Signature(sig_params)
    generated.__annotations__ = annotations
    sub = typer.Typer()
    sub.command()(generated)
    command = typer.main.get_command(sub)
    params = [p for p in command.params if p.name and p.name.startswith(PREFIX)]
    return params, labels, convert


def _jsonable(v):
    return v.tolist() if hasattr(v, "tolist") else list(v) if isinstance(v, tuple) else v


def given(ctx, cls, taken: frozenset, values: dict) -> dict:
    """The family options the user gave (not left at their defaults), as constructor keywords."""
    params, _, convert = family_options(cls, taken)
    out = {}
    for p in params:
        source = ctx.get_parameter_source(p.name)
        if source is not None and source.name != "DEFAULT":  # given on the line (or by an env var)
            value = values[p.name]
            if p.name in convert:
                value = convert[p.name][value.value if isinstance(value, Enum) else value]
            out[p.name[len(PREFIX):]] = value
    return out
