"""Entry point of every scenario child: ``python -m repro.harness.child ...``.

Runs one scenario function (``--func module:name``) or one user script (``--script PATH``)
and writes the result file atomically. Status values in the result file:
``pass``, ``fail`` (AssertionError / ScenarioFailure), ``error`` (any other exception),
``exit`` (the code called ``sys.exit(n)`` with n != 0: a deliberate exit, not a crash),
``running`` (partial, rewritten while the scenario runs).

Only the process that started here writes the result. A process the code forks without exec
(``os.fork``) runs on from the fork point with a copy of this frame: when it unwinds into
:func:`main` (``sys.exit``, an exception, the end of the code) it leaves as it would without
the harness, with its own exit status, and the result file keeps the root's state.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

# runpy and traceback are imported where used: the child's start-up stays light.


def _error_info(exc: BaseException) -> dict:
    import traceback

    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="repro.harness.child")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--func", help="module:function of a scenario")
    what.add_argument("--script", help="path of a user script to run as __main__")
    ap.add_argument("--scenario", default="")
    ap.add_argument("--variant", default="")
    ap.add_argument("--kind", default="fix")
    ap.add_argument("--params", default="{}", help="JSON object")
    ap.add_argument("--result", required=True)
    ap.add_argument("--workdir", default=".")
    ap.add_argument("--cwd", default=None, help="directory a script runs in (the caller's own)")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--deadline", type=float, default=None, help="absolute time.monotonic() deadline of the parent")
    ap.add_argument("script_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)

    from repro.harness.context import Context

    ctx = Context(
        scenario=args.scenario or (os.path.basename(args.script) if args.script else args.func),
        variant=args.variant,
        kind=args.kind,
        params=json.loads(args.params),
        workdir=args.workdir,
        result_path=args.result,
        timeout=args.timeout,
        deadline=args.deadline,
    )
    try:
        if args.func:
            module_name, _, func_name = args.func.partition(":")
            fn = getattr(importlib.import_module(module_name), func_name)
            fn(ctx)
        else:
            extra = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
            sys.argv = [args.script, *extra]
            sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
            if args.cwd:
                os.chdir(args.cwd)
            import runpy

            runpy.run_path(args.script, run_name="__main__")
    except BaseException as exc:  # noqa: BLE001 - every escape is evidence
        if not ctx.is_owner():
            # A forked child of the code: the interpreter ends it as it would anywhere else
            # (SystemExit keeps its code; an uncaught exception prints its traceback, status 1).
            raise
        return _report(ctx, exc)
    if ctx.is_owner():
        ctx._finish("pass")
    return 0


def _report(ctx, exc: BaseException) -> int:
    """Write the final result for an exception that ended the code; return the exit status."""
    from repro.harness.context import ScenarioFailure, Symptom

    if isinstance(exc, SystemExit):
        code = exc.code
        if code in (None, 0):
            ctx._finish("pass")
            return 0
        ctx._state["exit_code"] = code if isinstance(code, int) else 1
        ctx._finish("exit", {"type": "SystemExit", "message": str(code), "traceback": ""})
        return code if isinstance(code, int) else 1
    failed = isinstance(exc, (ScenarioFailure, AssertionError))
    info = _error_info(exc)
    if failed and ctx.symptoms_only and ctx.kind == "hazard" and not isinstance(exc, Symptom):
        failed = False  # ctx.only_symptoms_fail(): a check other than the symptom is no hazard reproduced
        info["message"] = f"a check other than the hazard's symptom failed: {info['message']}"
    ctx._finish("fail" if failed else "error", info)
    return 1


if __name__ == "__main__":
    # Leave through os._exit once the result is on disk only if the interpreter's own
    # shutdown could hang (it can: non-daemon threads); normal exit otherwise.
    sys.exit(main())
