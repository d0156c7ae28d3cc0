"""``python -m repro`` — list, run, script, env, report (plus subcommands other modules register).

The CLI process is a harness parent: it never imports torch, numpy or transformers.
Exit status of ``run`` and ``script``: 0 exactly when every observed outcome is the expected one,
1 when one was not; every command: 2 on a usage error (a bad argument, an unknown scenario or
variant, an interpreter that cannot be fingerprinted), named in one line.
Ctrl-C (SIGINT), SIGTERM (``timeout``, a CI cancel) and SIGHUP (a closed terminal) stop any
command the same way: the run in progress has its process tree killed and reaped (the tree runs
in a session of its own, out of reach of signals sent to the CLI's) and its temp dirs removed,
and the exit status is 128 + the signal's number (130, 143, 129).

Other modules add subcommands in one of two ways:

* :data:`DELEGATED`: ``name -> "module:main"``; ``python -m repro NAME ARGS...`` imports the
  module only then and calls ``main(ARGS)`` (its own argparse). ``bench``, ``matrix`` and ``hazards`` work so.
* :data:`SUBCOMMANDS`: ``name -> registrar`` (or ``"module:function"``), where
  ``registrar(sub)`` adds a parser to the argparse subparsers and sets ``handler=fn(args) -> int``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

DELEGATED: dict[str, tuple[str, str]] = {
    "bench": ("repro.bench:main", "timed load scenarios (see python -m repro bench --help)"),
    "matrix": (
        "repro.matrix:main",
        "merge per-cell results into one matrix report (see python -m repro matrix --help)",
    ),
    "hazards": ("repro.hazards_doc:main", "write docs/HAZARDS.md from the claims and matrix results (see --help)"),
}
SUBCOMMANDS: dict[str, Callable[[Any], None] | str] = {}


USAGE = 2  # exit status of a usage error, as argparse's


def usage_error(command: str, message: str) -> NoReturn:
    """A usage error found after parsing: one line on stderr, as argparse words its own, and
    exit status 2 (1 means an outcome was not the expected one)."""
    print(f"python -m repro {command}: error: {message}", file=sys.stderr)
    raise SystemExit(USAGE)


# -- argument types: a bad value is a usage error (exit 2) named by argparse, never a traceback
def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def interpreter(text: str) -> str:
    """An interpreter to run children with: a path, or a name found on PATH."""
    found = shutil.which(text)
    if found is None:
        raise argparse.ArgumentTypeError(f"no executable interpreter {text!r}")
    # absolute: a relative path is the caller's, but runs start their child in a work dir
    return os.path.abspath(found)


def output_file(text: str) -> str:
    """A file to write (its missing folders made on writing): not a directory, and not under a
    file or where this user cannot write, so that the run is not over before it is found out.
    Not ``-``: only :func:`output_or_stdout` options write to standard output."""
    if text == "-":
        raise argparse.ArgumentTypeError("'-' (standard output) is not taken here: name a file")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"is a directory: {text!r}")
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"not a directory: {str(folder)!r} (in {text!r})")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write in {str(folder)!r} (for {text!r})")
    return text


def output_or_stdout(text: str) -> str:
    """:func:`output_file`, or ``-`` for standard output."""
    return text if text == "-" else output_file(text)


def _catalogue():
    from repro.scenarios import load_catalogue

    return load_catalogue()


def _select(catalogue, names: list[str], all_: bool, kinds: list[str] | None) -> list[tuple[Any, Any]]:
    chosen = []
    if all_ or not names:
        if not all_:
            usage_error("run", "name a scenario (NAME or NAME:VARIANT) or pass --all")
        for sc in catalogue.values():
            chosen.extend((sc, v) for v in sc.variants)
    for name in names:
        sname, _, vname = name.partition(":")
        if sname not in catalogue:
            usage_error("run", f"unknown scenario {sname!r}; known: {', '.join(catalogue)}")
        sc = catalogue[sname]
        if vname:
            try:
                chosen.append((sc, sc.variant(vname)))
            except KeyError as exc:
                usage_error("run", str(exc.args[0]))
        else:
            chosen.extend((sc, v) for v in sc.variants)
    if kinds:
        chosen = [(s, v) for s, v in chosen if v.kind in kinds]
    # each variant once, in the order first named (--all with names, or a name given twice):
    # --repeat is how a variant runs more than once
    return list({(s.name, v.name): (s, v) for s, v in chosen}.values())


def cmd_list(args) -> int:
    cat = _catalogue()
    if args.json:
        rows = [
            {
                "scenario": s.name,
                "variant": v.name,
                "kind": v.kind,
                "seed": s.seed,
                "claims": list(s.claims),
                "timeout": s.timeout_for(v),
                "serial": s.serial_for(v),
                "env": dict(v.env),
                "params": dict(v.params),
                "doc": v.doc or s.doc.split("\n")[0],
            }
            for s in cat.values()
            for v in s.variants
        ]
        print(json.dumps(rows, indent=1, default=str))
        return 0
    for s in cat.values():
        head = s.doc.splitlines()[0] if s.doc else ""
        print(
            f"{s.name}  (seed {s.seed or '-'}; claims {', '.join(s.claims) or '-'}; timeout {s.timeout:g}s{'; serial' if s.serial else ''})"
        )
        if head:
            print(f"    {head}")
        for v in s.variants:
            extra = f"  env {dict(v.env)}" if v.env else ""
            alone = "  serial" if s.serial_for(v) and not s.serial else ""
            print(f"    {s.name}:{v.name:<28} {v.kind:<7}{extra}{alone}")
    return 0


def _line(r, i: int | None = None, n: int | None = None) -> str:
    prefix = f"[{i}/{n}] " if i is not None else ""
    mark = "ok " if r.ok else "BAD"
    where = r.where()
    text = f"{prefix}{mark} {r.id:<45} {r.kind:<7} {r.outcome:<8} expected {'/'.join(r.expected):<10} {r.seconds:7.2f}s"
    if where and r.outcome in ("HANG", "TIMEOUT", "CRASH", "ERROR", "FAIL"):
        text += f"  @ {where}"
    return text


def _write_results(path: str, results, fp) -> None:
    from repro.harness.report import write_atomic
    from repro.matrix import source_stamp

    # the code that ran (git commit, uncommitted changes), beside the build it ran on
    data = {"fingerprint": fp, "source": source_stamp(), "results": [r.to_dict() for r in results]}
    write_atomic(path, json.dumps(data, indent=1, default=str))


def _write_report(path: str, results) -> None:
    from repro.harness.report import render, write_atomic

    write_atomic(path, render(results))


def _fingerprint(command: str, python: str, **kw: Any) -> dict[str, Any]:
    """The build's fingerprint; an interpreter that cannot give one is a usage error."""
    from repro.harness.fingerprint import FingerprintError, get_fingerprint

    try:
        return get_fingerprint(python, **kw)
    except FingerprintError as exc:
        usage_error(command, str(exc))


def cmd_run(args) -> int:
    from repro.harness.runner import Result, run_variant
    from repro.harness.spec import Build

    cat = _catalogue()
    chosen = _select(cat, args.names, args.all, args.kind)
    if not chosen:
        usage_error("run", f"nothing selected: no variant named is of kind {' or '.join(args.kind or [])}")
    fp = _fingerprint("run", args.python)
    for w in fp.get("warnings") or []:
        print(f"warning: {w}", file=sys.stderr)
    total = len(chosen) * args.repeat
    results = []
    skipped = []  # not run on this build: listed in the JSON and the report, never "observed"
    i = 0
    t0 = time.monotonic()
    for sc, v in chosen:
        build = Build(fp, v.env)
        skip = v.skip_reason(build)
        for _ in range(args.repeat):
            i += 1
            if skip:
                print(f"[{i}/{total}] skip {sc.name}:{v.name}: {skip}", flush=True)
                skipped.append(
                    Result(
                        scenario=sc.name,
                        variant=v.name,
                        kind=v.kind,
                        outcome="SKIP",
                        expected=["SKIP"],
                        expected_reason=skip,
                        ok=True,
                        fingerprint=fp,
                        env=dict(v.env),
                        params=v.params_for(args.quick),
                    )
                )
                continue
            if total > 1 and sys.stderr.isatty():
                print(f"[{i}/{total}] running {sc.name}:{v.name} ...", end="\r", flush=True, file=sys.stderr)
            r = run_variant(sc, v, timeout=args.timeout, python=args.python, build=build, quick=args.quick)
            results.append(r)
            if total > 1 and sys.stderr.isatty():
                print("\r\033[K", end="", file=sys.stderr, flush=True)
            print(_line(r, i if total > 1 else None, total if total > 1 else None), flush=True)
            if args.verbose or not r.ok:
                print("\n".join("    " + ln for ln in r.summary().splitlines()[1:]), flush=True)
            if args.json:
                _write_results(args.json, results + skipped, fp)
    bad = [r for r in results if not r.ok]
    print(
        f"{len(results) - len(bad)}/{len(results)} as expected in {time.monotonic() - t0:.1f}s"
        + (f"; {len(skipped)} skipped" if skipped else "")
        + (f"; unexpected: {', '.join(r.id for r in bad)}" if bad else "")
    )
    if args.json:
        _write_results(args.json, results + skipped, fp)
    if args.report:
        _write_report(args.report, results + skipped)
    if not results:
        print(f"nothing ran: all {len(skipped)} selected variants are skipped on this build", file=sys.stderr)
    return 1 if bad else 0


def cmd_script(args) -> int:
    from repro.harness.runner import run_script

    if not Path(args.path).is_file():
        print(f"python -m repro script: error: not a file: {args.path}", file=sys.stderr)
        return 2
    if args.cwd is not None and not Path(args.cwd).is_dir():
        print(f"python -m repro script: error: --cwd: not a directory: {args.cwd}", file=sys.stderr)
        return 2
    extra = args.script_args
    r = run_script(
        args.path,
        timeout=args.timeout,
        args=extra,
        python=args.python,
        expect=args.expect,
        fingerprint=False if args.no_fingerprint else _fingerprint("script", args.python),
        cwd=args.cwd,
    )
    print(_line(r))
    print("\n".join("    " + ln for ln in r.summary().splitlines()[1:]))
    if args.json:  # one result, at the top level: outcome, seconds, evidence, fingerprint...
        from repro.harness.report import write_atomic

        write_atomic(args.json, r.to_json())
    return 0 if r.ok else 1


def cmd_env(args) -> int:
    if args.here:
        # This process is a child started for the purpose: it may import torch.
        from repro.harness.fingerprint import collect

        fp = collect()
    else:
        fp = _fingerprint("env", args.python, refresh=args.refresh)
    if args.json:
        print(json.dumps(fp, indent=1, sort_keys=True, default=str))
        return 0
    keys = [
        "python",
        "implementation",
        "executable",
        "platform",
        "cpu_count",
        "torch",
        "transformers",
        "numpy",
        "build",
        "torch_parallel_backend",
        "torch_num_threads",
        "torch_interop_threads",
        "openmp_runtimes",
        "mkl_threading_layer",
        "mkl_pip",
        "cuda",
        "cuda_devices",
    ]
    for k in keys:
        print(f"{k:>22}: {fp.get(k)}")
    for p in fp.get("threadpools") or []:
        print(
            f"{'threadpool':>22}: {p.get('internal_api')} {p.get('prefix')} {p.get('version')} threads={p.get('num_threads')} {p.get('filepath')}"
        )
    for w in fp.get("warnings") or []:
        print(f"WARNING: {w}")
    return 0


def cmd_report(args) -> int:
    from repro.harness.report import load_results, render

    try:
        results = load_results(args.results)
    except (OSError, ValueError) as exc:  # missing, unreadable, not JSON, not result files
        print(f"python -m repro report: error: {exc}", file=sys.stderr)
        return 2
    text = render(results, title=args.title)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        from repro.harness.report import write_atomic

        write_atomic(args.output, text)
        print(f"wrote {args.output} ({len(results)} results, {sum(not r.ok for r in results)} unexpected)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m repro", description="Run splitrepro scenarios in fresh interpreters and judge them."
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list scenarios and variants")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("run", help="run scenario variants (NAME or NAME:VARIANT)")
    p.add_argument("names", nargs="*", metavar="NAME[:VARIANT]")
    p.add_argument("--all", action="store_true", help="every variant of every scenario")
    p.add_argument(
        "--kind",
        action="append",
        choices=["hazard", "fix", "load", "probe"],
        help="only variants of this kind (repeatable)",
    )
    p.add_argument(
        "--timeout", type=positive_float, default=None, help="hard deadline per run, seconds (default: the scenario's)"
    )
    p.add_argument("--repeat", type=positive_int, default=1)
    p.add_argument(
        "--quick",
        action="store_true",
        help="load variants with their quick parameters, as the test suite runs them: the same checks on fewer "
        "samples (figures not fit to quote; the record's params say quick)",
    )
    p.add_argument("--json", metavar="FILE", type=output_file, help="write all results here (rewritten after each run)")
    p.add_argument("--report", metavar="FILE.md", type=output_file, help="write a Markdown report")
    p.add_argument("--python", type=interpreter, default=sys.executable, help="interpreter to run scenarios with")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("script", help="run any Python script with the same verdicts")
    p.add_argument("path", nargs="?", help="the script (or the first word after --, for a name that starts with -)")
    p.add_argument("--timeout", type=positive_float, default=60.0, help="hard deadline, seconds (default 60)")
    p.add_argument("--json", metavar="FILE", type=output_file)
    p.add_argument(
        "--expect",
        action="append",
        default=None,
        choices=["PASS", "FAIL", "ERROR", "CRASH", "HANG", "TIMEOUT"],
        help="expected outcome (repeatable; default PASS)",
    )
    p.add_argument(
        "--no-fingerprint", action="store_true", help="do not fingerprint the build (no torch import anywhere)"
    )
    p.add_argument("--python", type=interpreter, default=sys.executable)
    p.add_argument(
        "--cwd", metavar="DIR", default=None, help="directory to run the script in (default: the current one)"
    )
    p.add_argument("script_args", nargs="*", help="the script's arguments, after --")
    p.set_defaults(handler=cmd_script)

    p = sub.add_parser("env", help="the build fingerprint (runs in a clean child)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--refresh", action="store_true", help="ignore the cached fingerprint")
    p.add_argument("--python", type=interpreter, default=sys.executable)
    p.add_argument(
        "--here", action="store_true", help=argparse.SUPPRESS
    )  # collect in this process (used by the harness)
    p.set_defaults(handler=cmd_env)

    p = sub.add_parser("report", help="Markdown report from result JSON files")
    p.add_argument("results", nargs="+")
    p.add_argument("-o", "--output", default="-", type=output_or_stdout, help="the Markdown file (default -: standard output)")
    p.add_argument("--title", default="splitrepro results")
    p.set_defaults(handler=cmd_report)

    for name, (_target, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)  # listed in --help; dispatched in main()
    for registrar in SUBCOMMANDS.values():
        if isinstance(registrar, str):
            mod, _, fn = registrar.partition(":")
            try:
                registrar = getattr(importlib.import_module(mod), fn)
            except (ImportError, AttributeError):
                continue  # not written yet / not installed
        registrar(sub)
    return ap


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the signal finds the main thread: a KeyboardInterrupt, so
    that it takes the path of Ctrl-C through the harness (the run's tree killed and reaped, its
    temp dirs removed)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """While the command runs, SIGTERM and SIGHUP raise :class:`Stopped` (unless ignored, as
    under ``nohup``). After the first such signal SIGINT, SIGTERM and SIGHUP are ignored, so a
    repeat cannot cut the cleanup short. The previous handlers are restored on the way out
    (``main`` is also called inside other programs, pytest for one). Only the main thread can
    set handlers: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    watched = (signal.SIGINT, *STOP_SIGNALS)
    previous = {sig: signal.getsignal(sig) for sig in watched}

    def stop(signum: int, _frame: Any) -> None:
        for sig in watched:
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    try:
        for sig in STOP_SIGNALS:
            if previous[sig] is not signal.SIG_IGN:
                signal.signal(sig, stop)
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be put back from here
                signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with _stop_signals_interrupt():
        try:
            return _dispatch(argv)
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            name = signal.Signals(signum).name
            with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
                print("interrupted" + ("" if signum == signal.SIGINT else f" by {name}"), file=sys.stderr)
            return 128 + signum


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in DELEGATED:
        mod, _, fn = DELEGATED[argv[0]][0].partition(":")
        return int(getattr(importlib.import_module(mod), fn)(argv[1:]) or 0)
    passthrough: list[str] = []
    if argv and argv[0] == "script" and "--" in argv:  # everything after -- belongs to the script
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    if getattr(args, "handler", None) is cmd_script and args.path is None:
        if not passthrough:  # as argparse says it, with its exit status 2
            print("python -m repro script: error: the following arguments are required: path", file=sys.stderr)
            return 2
        args.path = passthrough.pop(0)  # `script -- -dash.py ARGS`: a name argparse would take for an option
    if passthrough:
        args.script_args = [*args.script_args, *passthrough]
    if getattr(args, "expect", "absent") is None:
        args.expect = ["PASS"]
    return int(args.handler(args) or 0)
