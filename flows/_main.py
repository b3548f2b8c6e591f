"""Run a flow module from the shell: ``python -m flows.<module> [--param] KEY=VALUE ...``.

    python -m flows.fit --param data=train.zarr --param out=model.zarr --param n_components=4
    python -m flows.model_selection data=train.zarr out=best.zarr 'n_components=[2, 3, 4]'
    python -m flows.score --params '{"model": "m.zarr", "data": "new.zarr", "out_dir": "scores"}'

Each VALUE is read as JSON when it parses (``4``, ``[2, 3]``, ``null``, ``true``), else
taken as a string, as ``prefect deployment run --param`` does. The flow runs as a plain
function (a temporary local Prefect server unless ``PREFECT_API_URL`` is set); its result
is printed as JSON. Exit status: 0 done, 1 the flow failed (its error is printed), 2 bad
usage (the usage, with the flow's parameters, is printed).
"""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any, Sequence

__all__ = ["main", "parse_params", "usage"]


class UsageError(Exception):
    pass


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_params(args: Sequence[str]) -> dict[str, Any]:
    """``["--param", "k=v", "k2=v2", "--params", "{json}"]`` -> ``{"k": v, ...}`` (later wins)."""
    params: dict[str, Any] = {}
    it = iter(args)
    for arg in it:
        if arg in ("--param", "-p"):
            arg = next(it, None)
            if arg is None:
                raise UsageError("--param needs KEY=VALUE after it")
        elif arg.startswith("--param="):
            arg = arg.split("=", 1)[1]
        elif arg == "--params" or arg.startswith("--params="):
            text = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            if text is None:
                raise UsageError("--params needs a JSON object after it")
            try:
                obj = json.loads(text)
            except ValueError as exc:
                raise UsageError(f"--params is not valid JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise UsageError("--params must be a JSON object: '{\"data\": \"train.zarr\", ...}'")
            params.update(obj)
            continue
        elif arg.startswith("-"):
            raise UsageError(f"unknown option {arg!r}")
        key, sep, text = arg.partition("=")
        if not sep or not key:
            raise UsageError(f"{arg!r} is not KEY=VALUE")
        params[key.strip().replace("-", "_")] = _value(text)
    return params


def usage(flow, module: str) -> str:
    sig = inspect.signature(flow.fn)
    lines = [f"usage: python -m {module} [--param] KEY=VALUE ... [--params JSON]", "",
             f"Runs the Prefect flow {flow.name!r}: {(flow.description or '').strip().splitlines()[0]}", "",
             "parameters (VALUE is JSON when it parses, else a string):"]
    for name, p in sig.parameters.items():
        if p.default is inspect.Parameter.empty:
            lines.append(f"  {name}  (required)")
        else:
            lines.append(f"  {name}  (default {json.dumps(p.default, default=str)})")
    return "\n".join(lines)


def main(flow, argv: Sequence[str] | None = None, module: str | None = None) -> int:
    """Parse ``argv``, run ``flow`` with those parameters, print its result; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    module = module or flow.fn.__module__
    if module == "__main__":
        module = "flows." + flow.fn.__code__.co_filename.rsplit("/", 1)[-1].removesuffix(".py")
    if any(a in ("-h", "--help") for a in argv):
        print(usage(flow, module))
        return 0
    sig = inspect.signature(flow.fn)
    try:
        params = parse_params(argv)
        unknown = sorted(set(params) - set(sig.parameters))
        if unknown:
            raise UsageError(f"{flow.name!r} has no parameter {', '.join(unknown)}")
        missing = [n for n, p in sig.parameters.items() if p.default is inspect.Parameter.empty and n not in params]
        if missing:
            raise UsageError(f"missing required parameter(s): {', '.join(missing)}")
    except UsageError as exc:
        print(f"error: {exc}\n\n{usage(flow, module)}", file=sys.stderr)
        return 2
    try:
        state = flow(**params, return_state=True)
    except Exception as exc:  # parameters the flow's own validation rejects
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if not state.is_completed():
        try:
            state.result()
            err = state.message
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
        print(f"error: the flow run ended {state.name}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(state.result(), indent=1, default=str))
    return 0
