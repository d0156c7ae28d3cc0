"""Benchmarks: the load scenarios, serially, with warm-ups and repetitions, in fresh processes.

    python -m repro bench [NAME[:VARIANT] ...] [--repeat N] [--warmup N] [--json F] [--markdown F]
    python -m repro bench --render F [--markdown F]
    python -m repro bench --combine F1 F2 ... --json F [--markdown F]

Without names it runs every variant of kind ``load`` in the catalogue. Each run is one fresh
interpreter started by the harness (:func:`repro.harness.runner.run_variant`), one at a time.
Repetitions go round-robin over the selected variants (warm-ups first), so slow drift of the
machine touches every variant alike; the ratios a scenario reports are measured inside one run,
side by side, and the table gives their median with min and max over the repetitions.

Figures are read from each run's metrics (see :mod:`repro.figures` for the shapes understood);
a target is judged on the median. ``--suite`` also times the whole test suite once, as CI runs it
(``python -m pytest -n 2``); otherwise the suite's wall time is taken from a matrix cell file
(``results/cells/py<X.Y>-<build>.json``) when one is there, ran the whole suite to its end and
ran on this kind of machine, with its date and the command it ran. The report names the command
either way.

Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from repro import figures as _figures
from repro.cli import output_file, positive_float, usage_error
from repro.harness.report import read_json, write_atomic
from repro.matrix import source_stamp, stopped_early

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "splitrepro.bench/1"
DEFAULT_JSON = "results/bench.json"


# -- selection ----------------------------------------------------------------------------------
def select(catalogue: dict[str, Any], names: list[str]) -> list[tuple[Any, Any]]:
    """(scenario, variant) pairs: every load variant, or those named (NAME or NAME:VARIANT)."""
    if not names:
        return [(sc, v) for sc in catalogue.values() for v in sc.variants if v.kind == "load"]
    chosen: list[tuple[Any, Any]] = []
    for name in names:
        scen, _, var = name.partition(":")
        if scen not in catalogue:
            usage_error("bench", f"unknown scenario {scen!r}; known: {', '.join(catalogue)}")
        sc = catalogue[scen]
        if var:
            try:
                chosen.append((sc, sc.variant(var)))
            except KeyError as exc:
                usage_error("bench", str(exc.args[0]))
        else:
            loads = [v for v in sc.variants if v.kind == "load"]
            chosen.extend((sc, v) for v in (loads or sc.variants))
    seen, unique = set(), []
    for sc, v in chosen:
        if (sc.name, v.name) not in seen:
            seen.add((sc.name, v.name))
            unique.append((sc, v))
    return unique


def applicable(cases: list[tuple[Any, Any]], fp: dict[str, Any]) -> tuple[list[tuple[Any, Any]], list[dict[str, str]]]:
    """The cases that apply to this build, and the others with the reason (no CUDA device...)."""
    from repro.harness.spec import Build

    kept, skipped = [], []
    for sc, v in cases:
        why = v.skip_reason(Build(fp, v.env))
        if why:
            skipped.append({"scenario": sc.name, "variant": v.name, "reason": why})
        else:
            kept.append((sc, v))
    return kept, skipped


# -- statistics -------------------------------------------------------------------------------------
def summarise(runs: list[dict[str, Any]], scenario: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
    """Per figure over the repetitions: median, min, max, n, and the target judged on the median."""
    values: dict[str, list[float]] = {}
    meta: dict[str, _figures.Figure] = {}
    for run in runs:
        if not run.get("ok", run.get("outcome") == "PASS"):
            continue  # a run that did not end as predicted: its partial figures are not a measurement
        for fig in _figures.extract(run.get("metrics") or {}, scenario=scenario, kind=kind):
            values.setdefault(fig.name, []).append(fig.value)
            meta.setdefault(fig.name, fig)
            if fig.target and not meta[fig.name].target:
                meta[fig.name].target = fig.target
            if fig.claim and not meta[fig.name].claim:
                meta[fig.name].claim = fig.claim
            if fig.key:
                meta[fig.name].key = True
    out = []
    for name, vals in values.items():
        fig = meta[name]
        median = statistics.median(vals)
        out.append(
            {
                "name": name,
                "unit": fig.unit,
                "median": median,
                "min": min(vals),
                "max": max(vals),
                "n": len(vals),
                "target": fig.target,
                "ok": _figures.meets(median, fig.target),
                "claim": fig.claim,
                "claim_ok": _figures.meets(median, fig.claim),
                "key": fig.key,
            }
        )
    out.sort(key=lambda f: (not f["key"], f["target"] is None, f["name"]))
    return out


# -- the machine ----------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    except OSError:
        pass
    return info


def same_machine(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two ``machine_info()`` records describe the same kind of machine (CPU count and
    model; a record that lacks one says nothing against it)."""
    a, b = a or {}, b or {}
    return all(a.get(k) is None or b.get(k) is None or a.get(k) == b.get(k) for k in ("cpus", "cpu_model"))


def suite_from_cell(python: str, build: str, machine: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The test suite's wall time from this build's matrix cell, where the cell ran the whole
    suite to its end (on ``machine``'s kind of machine, when given), else None."""
    path = ROOT / "results" / "cells" / f"py{python}-{build}.json"
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if machine is not None and not same_machine(data.get("machine"), machine):
        return None  # another machine's time, not this report's
    run = data.get("pytest") or {}
    args = run.get("args") or []
    # a partial or interrupted run says nothing about the full suite: the plugin records what
    # narrowed the selection ("narrowed"); a cell written before it did is judged by -k / -m
    if run.get("narrowed") or any(a in ("-k", "-m") or a.startswith(("-k", "-m")) for a in args) or stopped_early(run):
        return None
    return {
        "wall_seconds": data.get("wall_seconds"),
        "command": " ".join(["python -m pytest", *args]),
        "exitstatus": data.get("pytest", {}).get("exitstatus"),
        "tests": data.get("pytest", {}).get("tests"),
        "source": str(path.relative_to(ROOT)),
        "date": data.get("started"),
    }


def cell_key_figures(python: str, build: str, machine: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Key figures of the hazard/fix variants in this build's matrix cell (one run each), e.g. the
    manager's heartbeat gap with the lock held against the placeholder fix; None without such a
    cell, or where it ran on another kind of machine than ``machine``."""
    path = ROOT / "results" / "cells" / f"py{python}-{build}.json"
    try:
        from repro import matrix

        cell = matrix.read_cell(path)
    except (OSError, ValueError):
        return None
    if machine is not None and not same_machine(cell.meta.get("machine"), machine):
        return None
    rows = []
    for (scenario, variant), entry in sorted(cell.entries.items()):
        key = entry.key
        if entry.status == matrix.RAN and key is not None and cell.kinds.get((scenario, variant)) in ("hazard", "fix"):
            rows.append(
                {
                    "scenario": scenario,
                    "variant": variant,
                    "kind": cell.kinds[(scenario, variant)],
                    "outcome": entry.outcome,
                    "ok": entry.ok,
                    "figure": key.to_json(),
                }
            )
    return {"source": str(path.relative_to(ROOT)), "date": cell.meta.get("started"), "rows": rows}


def time_suite(timeout: float) -> dict[str, Any]:
    """The whole suite once as CI runs it (README: ``python -m pytest -n 2``), timed from outside."""
    args = ["-n", "2", "-q", "-p", "no:cacheprovider"]
    t0 = time.monotonic()
    # a session of its own, killed whole: pytest's xdist workers (and the scenarios they run)
    # must not outlive a timeout or an interruption of the benchmark
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    timed_out = False
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.returncode is None:  # timed out, or interrupted (KeyboardInterrupt goes on up)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    record = {
        "wall_seconds": round(time.monotonic() - t0, 1),
        "command": " ".join(["python -m pytest", *args]),
        "source": "measured by this run",
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    if timed_out:  # no wall time to give; the benchmark's own runs are kept all the same
        return {
            **record,
            "exitstatus": None,
            "summary": f"stopped after {timeout:g} s",
            "timed_out": True,
            "timeout": timeout,
        }
    tail = [line for line in stdout.splitlines() if line.strip()][-1:]
    return {**record, "exitstatus": proc.returncode, "summary": tail[0] if tail else ""}


# -- running -------------------------------------------------------------------------------------------
def run(
    cases: list[tuple[Any, Any]],
    *,
    repeat: int,
    warmup: int,
    timeout: float | None,
    log=print,
    checkpoint: Callable[[list[dict[str, Any]], int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Every case ``warmup + repeat`` times, round-robin. ``checkpoint(records, done, total)``
    is called after each run with the records so far (summarised), so that an interrupted
    benchmark keeps what it measured."""
    from repro.harness.fingerprint import get_fingerprint
    from repro.harness.runner import run_variant
    from repro.harness.spec import Build

    fp = get_fingerprint(sys.executable)
    records: list[dict[str, Any]] = [{"scenario": sc.name, "variant": v.name, "kind": v.kind, "warmups": [], "runs": []} for sc, v in cases]
    total = (warmup + repeat) * len(cases)
    done = 0
    for rep in range(warmup + repeat):
        phase = "warmup" if rep < warmup else f"rep {rep - warmup + 1}/{repeat}"
        for (sc, v), rec in zip(cases, records, strict=True):
            res = run_variant(sc, v, timeout=timeout, build=Build(fp, v.env))
            done += 1
            entry = {
                "outcome": res.outcome,
                "ok": res.ok,
                "seconds": res.seconds,
                "metrics": res.metrics,
            }
            if not res.ok:
                entry["summary"] = res.summary()
            (rec["warmups"] if rep < warmup else rec["runs"]).append(entry)
            log(f"[{done}/{total}] {sc.name}:{v.name} {phase}: {res.outcome} in {res.seconds:.1f}s")
            if checkpoint is not None:  # the last run too: --suite may still be interrupted
                checkpoint(summarise_records(records), done, total)
    return summarise_records(records)


def summarise_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each record's outcomes, figures and median run time from its runs (in place)."""
    for rec in records:
        rec["outcomes"] = sorted({r["outcome"] for r in rec["runs"]})
        rec["all_ok"] = all(r["ok"] for r in rec["runs"])
        rec["figures"] = summarise(rec["runs"], rec["scenario"], rec["kind"])
        rec["run_seconds"] = {
            "median": round(statistics.median([r["seconds"] for r in rec["runs"]]), 3) if rec["runs"] else None,
        }
    return records


def missed_targets(report: dict[str, Any]) -> list[str]:
    out = []
    for rec in report["cases"]:
        for f in rec["figures"]:
            if f["ok"] is False:
                out.append(
                    f"{rec['scenario']}:{rec['variant']} {f['name']} = "
                    f"{_figures.fmt_value(f['median'], f['unit'], f['target'])} (target {f['target']})"
                )
        if not rec["all_ok"]:
            out.append(
                f"{rec['scenario']}:{rec['variant']} did not pass every repetition ({', '.join(rec['outcomes'])})"
            )
    return out


# -- rendering -----------------------------------------------------------------------------------------
def _count(n: Any, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def render_markdown(report: dict[str, Any]) -> str:
    m, fp = report["machine"], report["fingerprint"]
    out = ["# Benchmarks", ""]
    partial = report.get("partial")
    if partial:
        out.append(
            f"**Interrupted: {partial.get('runs_done')} of {partial.get('runs_total')} runs** "
            "(warm-ups included); a figure below stands on the repetitions it got."
        )
        out.append("")
    sources = report.get("sources")
    if sources:
        out.append(
            f"Combined from {len(sources)} benchmark runs on one machine and build (`python -m repro bench --combine`); "
            "each ran its variants round-robin, one fresh interpreter per run, one run at a time (the harness's serial lock). "
            "Figures are medians with min–max over all their repetitions; ratios were measured side by side inside each run."
        )
        out.append("")
        for src in sources:
            cut = f", interrupted after {src['partial'].get('runs_done')} of {src['partial'].get('runs_total')} runs" if src.get("partial") else ""
            code = src.get("source") or {}
            cut += (
                f", code {code['commit'][:10]}{' with uncommitted changes' if code.get('dirty') else ''}"
                if code.get("commit")
                else ", code not recorded"
            )
            out.append(
                f"- {src['date']}: `{src['command']}` ({_count(src['repeat'], 'repetition')} after {_count(src['warmup'], 'warm-up')} per variant{cut}; `{src['path']}`)"
            )
        out.append(
            "- Runs per variant: "
            + "; ".join(f"`{rec['scenario']}:{rec['variant']}` {len(rec['runs'])} measured, {len(rec.get('warmups') or [])} warm-up" for rec in report["cases"])
        )
    else:
        out.append(
            f"Measured {report['date']} with `{report['command']}`: {_count(report['repeat'], 'repetition')} after "
            f"{_count(report['warmup'], 'warm-up')} per variant, round-robin, one fresh interpreter per run, one run at a time (the harness's serial lock). "
            "Figures are medians with min–max over the repetitions; ratios were measured side by side inside each run."
        )
    out.append("")
    out.append(
        f"- Machine: {m.get('cpu_model', '?')}, {m.get('cpus')} CPUs, {m.get('memory_gib', '?')} GiB, {m.get('platform')}"
    )
    if m.get("loadavg_1m_before") is not None:
        out.append(
            f"- Load average (1 min) before/after: {m.get('loadavg_1m_before')} / {m.get('loadavg_1m')} "
            f"on {m.get('cpus')} CPUs: anything above {m.get('cpus')} means other work shared the machine"
        )
    out.append(
        f"- Versions: Python {fp.get('python')}, torch {fp.get('torch')}, transformers {fp.get('transformers')}, "
        f"numpy {fp.get('numpy')}; build `{fp.get('build')}`, parallel backend {fp.get('torch_parallel_backend')}, "
        f"OpenMP {', '.join(fp.get('openmp_runtimes') or []) or '–'}, {fp.get('torch_num_threads')} intra-op threads"
    )
    skipped = report.get("skipped") or []
    if skipped:
        out.append(
            "- Skipped on this build: "
            + "; ".join(f"`{x['scenario']}:{x['variant']}` ({x['reason']})" for x in skipped)
        )
    out.append("")
    missed = report["missed"]
    out.append("## Targets")
    out.append("")
    rows = [(rec, f) for rec in report["cases"] for f in rec["figures"] if f["target"]]
    if rows:
        out.append("| scenario:variant | figure | median | min – max | target | met |")
        out.append("|---|---|---|---|---|---|")
        for rec, f in rows:
            out.append(
                f"| `{rec['scenario']}:{rec['variant']}` | {f['name']} | {_figures.fmt_value(f['median'], f['unit'], f['target'])} | "
                f"{_figures.fmt_value(f['min'], f['unit'], f['target'])} – {_figures.fmt_value(f['max'], f['unit'], f['target'])} | {f['target']} | "
                f"{'yes' if f['ok'] else '**MISSED**'} |"
            )
    else:
        out.append("No figure in these runs carries a target.")
    out.append("")
    if missed:
        out.append("**Targets missed or runs that did not pass:**")
        out.append("")
        out.extend(f"- {line}" for line in missed)
    else:
        out.append("Every target met; every repetition passed.")
    out.append("")
    claims = [(rec, f) for rec in report["cases"] for f in rec["figures"] if f.get("claim")]
    if claims:
        out.append("## The seeds' claims")
        out.append("")
        out.append("| scenario:variant | figure | median | min – max | claimed | within |")
        out.append("|---|---|---|---|---|---|")
        for rec, f in claims:
            out.append(
                f"| `{rec['scenario']}:{rec['variant']}` | {f['name']} | {_figures.fmt_value(f['median'], f['unit'])} | "
                f"{_figures.fmt_value(f['min'], f['unit'])} – {_figures.fmt_value(f['max'], f['unit'])} | {f['claim']} | "
                f"{'yes' if f['claim_ok'] else 'no'} |"
            )
        out.append("")
    suite = report.get("suite")
    if suite:
        out.append("## The test suite")
        out.append("")
        command = f"`{suite['command']}`" if suite.get("command") else "the test suite"
        if suite.get("timed_out"):
            out.append(
                f"{command} did not finish within {suite.get('timeout'):g} s on {m.get('cpus')} CPUs "
                f"(stopped there; {suite.get('source')}, {suite.get('date')}): no wall time."
            )
        else:
            out.append(
                f"Wall time of {command}: {suite.get('wall_seconds')} s on {m.get('cpus')} CPUs "
                f"(exit status {suite.get('exitstatus')}; {suite.get('source')}, {suite.get('date')})."
            )
        out.append("")
    cellfig = report.get("cell_figures")
    if cellfig and cellfig.get("rows"):
        out.append("## Hazard against fix (single runs from the matrix cell)")
        out.append("")
        out.append(f"One run each, from {cellfig['source']} ({cellfig.get('date')}): not medians.")
        out.append("")
        out.append("| scenario:variant | kind | outcome | figure | value | target |")
        out.append("|---|---|---|---|---|---|")
        for r in cellfig["rows"]:
            f = r["figure"]
            out.append(
                f"| `{r['scenario']}:{r['variant']}` | {r['kind']} | {r['outcome']}{'' if r['ok'] else ' (unpredicted)'} | "
                f"{f['name']} | {_figures.fmt_value(f['value'], f['unit'], f['target'])} | {f['target'] or ''} |"
            )
        out.append("")
    out.append("## All figures")
    for rec in report["cases"]:
        out.append("")
        out.append(
            f"### `{rec['scenario']}:{rec['variant']}` — {', '.join(rec['outcomes']) or 'no run'}, "
            f"median run {rec['run_seconds']['median']} s"
        )
        out.append("")
        if not rec["figures"]:
            out.append("No figures recorded.")
            continue
        out.append("| figure | median | min | max | n | target |")
        out.append("|---|---|---|---|---|---|")
        for f in rec["figures"]:
            out.append(
                f"| {f['name']} | {_figures.fmt_value(f['median'], f['unit'], f['target'])} | {_figures.fmt_value(f['min'], f['unit'], f['target'])} | "
                f"{_figures.fmt_value(f['max'], f['unit'], f['target'])} | {f['n']} | {f['target'] or ''} |"
            )
    out.append("")
    return "\n".join(out)


def read_bench(path: Path) -> dict[str, Any]:
    """A bench JSON written by :func:`main`; anything else is a ValueError naming the file."""
    report = read_json(path)
    cases = report.get("cases") if isinstance(report, dict) else None
    if not isinstance(cases, list) or not all(
        isinstance(rec, dict) and isinstance(rec.get("runs"), list) and "scenario" in rec and "variant" in rec
        for rec in cases
    ):
        raise ValueError(f"{path}: not a bench JSON (no 'cases' with their 'runs')")
    return report


def rerender(path: Path, markdown: str | None) -> int:
    """Summarise the stored runs of a bench JSON again (current figure rules) and re-render."""
    report = read_bench(path)
    for rec in report["cases"]:
        rec["figures"] = summarise(rec["runs"], rec["scenario"], rec.get("kind"))
    report["missed"] = missed_targets(report)
    fp = report.get("fingerprint") or {}
    pyver = ".".join(str(fp.get("python", "")).split(".")[:2])
    build = str(fp.get("build") or "bundled")
    machine = report.get("machine") or {}
    # the matrix cell's figures and suite time are read again, from a cell of this build on this
    # report's kind of machine only (a report from a GPU host re-rendered here keeps its own)
    report["cell_figures"] = cell_key_figures(pyver, build, machine) or report.get("cell_figures")
    suite = report.get("suite")
    if suite is None or str(suite.get("source", "")).startswith("results/cells/"):
        report["suite"] = suite_from_cell(pyver, build, machine) or suite
    write_atomic(path, json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    text = render_markdown(report)
    if markdown:
        write_atomic(markdown, text)
    print(text)
    return 0


# the build and machine a combined report must share (fingerprint keys; machine keys)
_SAME_BUILD = ("python", "implementation", "torch", "transformers", "numpy", "build", "cuda", "cuda_devices", "openmp_runtimes", "torch_num_threads")
_SAME_MACHINE = ("cpus", "cpu_model", "memory_gib", "platform")


def combine(paths: list[Path]) -> dict[str, Any]:
    """One report from several bench JSONs of the same build on the same machine.

    For a benchmark cut short (its ``.partial`` file) and the run that measured the rest: the
    runs and warm-ups of each variant are put together in the order the reports were written
    (their dates), and the
    figures are summarised again over all of them. The sources (date, command, repetitions,
    whether interrupted) are kept in ``sources``. Reports of another build or machine (see
    ``_SAME_BUILD``, ``_SAME_MACHINE``) are a ValueError naming the first difference.
    """
    if len(paths) < 2:
        raise ValueError("--combine needs two or more bench JSONs")
    loaded = sorted(((read_bench(p), p) for p in paths), key=lambda rp: str(rp[0].get("date")))  # in the order they ran
    reports, paths = [rp[0] for rp in loaded], [rp[1] for rp in loaded]
    seen: dict[str, Path] = {}
    for path, rep in zip(paths, reports, strict=True):
        if rep.get("sources"):
            raise ValueError(f"{path}: already a combined report: combine its sources instead ({', '.join(s['path'] for s in rep['sources'])})")
        # a run given twice (the same file, or an earlier checkpoint of the same benchmark) would count twice
        for rec in rep["cases"]:
            for run in [*rec["runs"], *(rec.get("warmups") or [])]:
                key = json.dumps([rec["scenario"], rec["variant"], run], sort_keys=True, default=str)
                if key in seen:
                    raise ValueError(
                        f"{path}: a run of {rec['scenario']}:{rec['variant']} that {seen[key]} holds too "
                        "(the same benchmark twice, or two checkpoints of one)"
                    )
                seen[key] = path
    commits = {str(rep.get("source", {}).get("commit")): p for p, rep in zip(paths, reports, strict=True) if (rep.get("source") or {}).get("commit")}
    if len(commits) > 1:
        (c1, p1), (c2, p2) = list(commits.items())[:2]
        raise ValueError(f"{p2}: ran other code than {p1} (commit {c2[:10]} against {c1[:10]})")
    first = reports[0]
    for path, rep in zip(paths[1:], reports[1:], strict=True):
        for section, keys in (("fingerprint", _SAME_BUILD), ("machine", _SAME_MACHINE)):
            a, b = first.get(section) or {}, rep.get(section) or {}
            for k in keys:
                if a.get(k) != b.get(k):
                    raise ValueError(
                        f"{path}: another {'build' if section == 'fingerprint' else 'machine'} than {paths[0]} "
                        f"({section} {k}: {b.get(k)!r} against {a.get(k)!r})"
                    )
    cases: dict[tuple[str, str], dict[str, Any]] = {}
    for rep in reports:
        for rec in rep["cases"]:
            key = (rec["scenario"], rec["variant"])
            into = cases.setdefault(
                key, {"scenario": rec["scenario"], "variant": rec["variant"], "kind": rec.get("kind"), "runs": [], "warmups": []}
            )
            into["runs"].extend(rec["runs"])
            into["warmups"].extend(rec.get("warmups") or [])
    records = summarise_records(list(cases.values()))
    ran = set(cases)
    skipped: dict[tuple[str, str], dict[str, Any]] = {}
    for rep in reports:
        for item in rep.get("skipped") or []:
            if (item["scenario"], item["variant"]) not in ran:
                skipped.setdefault((item["scenario"], item["variant"]), item)
    last = reports[-1]
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "date": max(str(rep.get("date")) for rep in reports),
        "command": "python -m repro bench --combine " + " ".join(str(p) for p in paths),
        "sources": [
            {
                "path": str(p),
                "date": rep.get("date"),
                "command": rep.get("command"),
                "repeat": rep.get("repeat"),
                "warmup": rep.get("warmup"),
                "partial": rep.get("partial"),
                "source": rep.get("source"),
            }
            for p, rep in zip(paths, reports, strict=True)
        ],
        "repeat": None,
        "warmup": None,
        "wall_seconds": round(sum(float(rep.get("wall_seconds") or 0) for rep in reports), 1),
        "machine": {**(last.get("machine") or {}), "loadavg_1m_before": (first.get("machine") or {}).get("loadavg_1m_before")},
        "fingerprint": first.get("fingerprint") or {},
        "source": next((rep["source"] for rep in reports if rep.get("source")), None),
        "cases": records,
        "skipped": list(skipped.values()),
        "suite": next((rep["suite"] for rep in reports if rep.get("suite")), None),
        "cell_figures": last.get("cell_figures"),
    }
    report["missed"] = missed_targets(report)
    return report


def _output(text: str) -> str:
    """A file to write, checked before any run (:func:`repro.cli.output_file`); '' writes none."""
    return output_file(text) if text else text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m repro bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", metavar="NAME[:VARIANT]", help="scenarios (default: every load variant)")
    ap.add_argument("--repeat", type=int, default=3, help="measured repetitions per variant (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded warm-up runs per variant (default 1)")
    ap.add_argument("--timeout", type=positive_float, default=None, help="per-run deadline (default: the scenario's)")
    ap.add_argument(
        "--json", dest="json_out", type=_output, default=None, help=f"write the runs here (default {DEFAULT_JSON})"
    )
    ap.add_argument("--markdown", type=_output, default=None, help="write the table here too (e.g. docs/BENCHMARKS.md)")
    ap.add_argument("--suite", action="store_true", help="also time the test suite as CI runs it (python -m pytest -n 2)")
    ap.add_argument("--suite-timeout", type=positive_float, default=3600.0)
    ap.add_argument("--list", action="store_true", help="list what would run and exit")
    ap.add_argument(
        "--render",
        metavar="BENCH_JSON",
        help="re-read the runs of an earlier bench JSON and rewrite its tables (no runs)",
    )
    ap.add_argument(
        "--combine",
        nargs="+",
        metavar="BENCH_JSON",
        help="put the runs of several bench JSONs of one build and machine together (a benchmark cut short "
        "and the run that measured the rest) and write them as one report to --json (no runs)",
    )
    args = ap.parse_args(argv)
    if args.combine:
        if args.render or args.names:
            ap.error("--combine takes bench JSONs only: no NAME and no --render")
        if len(args.combine) < 2:
            ap.error("--combine needs two or more bench JSONs")
        given = [flag for flag, on in (("--suite", args.suite), ("--list", args.list), ("--timeout", args.timeout is not None)) if on]
        given += [f"--{n}" for n, default in (("repeat", 3), ("warmup", 1)) if getattr(args, n) != default]
        if given:
            ap.error(f"--combine runs nothing: {', '.join(given)} would do nothing")
        if args.json_out is None:
            ap.error("--combine needs --json: where to write the combined report")
        try:
            report = combine([Path(p) for p in args.combine])
        except (OSError, ValueError) as exc:
            ap.error(f"--combine: {exc}")
        text = render_markdown(report)
        write_atomic(args.json_out, json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
        if args.markdown:
            write_atomic(args.markdown, text)
        print(text)
        return 1 if any(not rec["all_ok"] for rec in report["cases"]) else 0  # as a run's exit status
    if args.render:
        if not Path(args.render).is_file():
            ap.error(f"--render: not a file: {args.render}")
        try:
            read_bench(Path(args.render))
        except ValueError as exc:
            ap.error(f"--render: {exc}")
        return rerender(Path(args.render), args.markdown)
    if args.repeat < 1 or args.warmup < 0:
        ap.error("--repeat must be >= 1 and --warmup >= 0")

    from repro.harness.fingerprint import FingerprintError, get_fingerprint
    from repro.scenarios import load_catalogue

    cases = select(load_catalogue(), args.names)
    if args.list:
        for sc, v in cases:
            print(f"{sc.name}:{v.name}")
        return 0
    if args.json_out is None:  # the default, checked only where it will be written
        try:
            args.json_out = output_file(DEFAULT_JSON)
        except argparse.ArgumentTypeError as exc:
            ap.error(f"argument --json: {exc}")
    if not cases:
        print("no load scenarios in the catalogue", file=sys.stderr)
        return 2
    try:
        fp = get_fingerprint(sys.executable)
    except FingerprintError as exc:  # this interpreter has no torch, say: one line, exit 2
        ap.error(str(exc))
    cases, skipped = applicable(cases, fp)
    for item in skipped:
        print(f"skip {item['scenario']}:{item['variant']}: {item['reason']}")
    if not cases:
        print("nothing to run: every selected variant is skipped on this build")
        return 0
    load_before = machine_info().get("loadavg_1m")
    t0 = time.monotonic()
    pyver = ".".join(str(fp.get("python", "")).split(".")[:2])
    build = str(fp.get("build") or "bundled")
    here = machine_info()
    cell_figures = cell_key_figures(pyver, build, here)  # read once: every checkpoint writes it again
    stamp = source_stamp()  # the code this benchmark ran

    def report_of(records: list[dict[str, Any]], suite: dict[str, Any] | None, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        report: dict[str, Any] = {
            "schema": SCHEMA,
            "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "command": "python -m repro bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "repeat": args.repeat,
            "warmup": args.warmup,
            "wall_seconds": round(time.monotonic() - t0, 1),
            "machine": {**machine_info(), "loadavg_1m_before": load_before},
            "fingerprint": {k: v for k, v in fp.items() if k not in ("parallel_info", "threadpools", "executable")},
            "source": stamp,
            "cases": records,
            "skipped": skipped,
            "suite": suite,
            "cell_figures": cell_figures,
        }
        if partial is not None:
            report["partial"] = partial
        report["missed"] = missed_targets(report)
        return report

    # while it runs, what it measured so far is kept beside the JSON (``--render`` reads it)
    partial_path = Path((args.json_out or DEFAULT_JSON) + ".partial")
    if partial_path.exists():  # an earlier interrupted benchmark's: kept under its own date
        stamp = _dt.datetime.fromtimestamp(partial_path.stat().st_mtime).strftime("%Y%m%dT%H%M%S")
        older = partial_path.with_name(f"{partial_path.name}.{stamp}")
        partial_path.replace(older)
        print(f"an earlier interrupted benchmark's runs: {older}")
    checkpointed = []

    def checkpoint(records: list[dict[str, Any]], done: int, total: int) -> None:
        state = {"runs_done": done, "runs_total": total}
        write_atomic(partial_path, json.dumps(report_of(records, None, state), indent=1, sort_keys=True, default=str) + "\n")
        checkpointed.append(done)

    try:
        records = run(cases, repeat=args.repeat, warmup=args.warmup, timeout=args.timeout, checkpoint=checkpoint)
        suite = time_suite(args.suite_timeout) if args.suite else suite_from_cell(pyver, build, here)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP through the CLI (repro.cli.Stopped)
        signum = getattr(exc, "signum", signal.SIGINT)
        by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        kept = f": what ran is in {partial_path} (python -m repro bench --render {partial_path})" if checkpointed else ""
        print(f"\npython -m repro bench: interrupted{by}{kept}", file=sys.stderr)
        return 128 + signum
    report = report_of(records, suite)
    text = render_markdown(report)
    if args.json_out:
        write_atomic(args.json_out, json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    if args.markdown:
        write_atomic(args.markdown, text)
    partial_path.unlink(missing_ok=True)
    print(text)
    return 1 if any(not rec["all_ok"] for rec in records) else 0


if __name__ == "__main__":
    sys.exit(main())
