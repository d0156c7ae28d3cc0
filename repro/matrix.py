"""Merge the results of the matrix cells into one report: ``report.md``, ``report.html``, ``report.json``.

    python -m repro.matrix results/cells -o results/report [--expect-cells py3.10-bundled,...]

Inputs are cell files (``results/cells/<cell>.json``, written by :mod:`repro.matrix_plugin`) or
directories of them. A plain list of run results (``python -m repro run ... --json F``) is read
too, with the file name as the cell name.

The report is a scenario-by-cell matrix: each variant's outcome in each cell, whether that is
what the build predicts, and the key figure of load scenarios; the cells' fingerprints; the
disagreements with predictions; and the holes -- variants skipped or not run in some cell, and
any that no cell exercised at all (a hole, not a pass); and the cells whose pytest run was
incomplete (stopped early, or scenario items that failed without a result). Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import re
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repro import figures as _figures
from repro.harness.report import read_json, write_atomic

BUILD_ORDER = ("bundled", "mkl")
# Fingerprint keys shown in the Markdown table, when present (all keys go to HTML and JSON).
FINGERPRINT_KEYS = (
    "build",
    "python",
    "torch",
    "transformers",
    "numpy",
    "torch_parallel_backend",
    "torch_num_threads",
    "openmp_runtimes",
    "blas",
    "mkl_pip",
    "mkl_threading_layer",
    "cpu_count",
    "system",
    "machine",
    "cuda",
)

RAN, SKIPPED, NOT_RUN = "ran", "skipped", "not run"


# -- reading ------------------------------------------------------------------------------


@dataclass
class Entry:
    """One scenario variant in one cell."""

    status: str  # ran / skipped / not run
    outcome: str | None = None
    expected: list[str] = field(default_factory=list)
    reason: str = ""
    ok: bool | None = None
    seconds: float | None = None
    figures: list[_figures.Figure] = field(default_factory=list)
    detail: str = ""  # skip reason, or the first line of evidence of a mismatch
    # a hazard's HANG whose place (hang_where) could not be confirmed: the patterns not sought
    # because a process's stack, or its native frames, could not be taken
    hang_unconfirmed: list[str] = field(default_factory=list)

    @property
    def key(self) -> _figures.Figure | None:
        return _figures.key_figure(self.figures)

    def to_json(self) -> dict[str, Any]:
        key = self.key
        return {
            "status": self.status,
            "outcome": self.outcome,
            "expected": self.expected,
            "expected_reason": self.reason,
            "ok": self.ok,
            "seconds": self.seconds,
            "key_figure": key.to_json() if key else None,
            "figures": [f.to_json() for f in self.figures],
            "detail": self.detail,
            "hang_unconfirmed": self.hang_unconfirmed,
        }


@dataclass
class Cell:
    name: str
    source: str
    fingerprint: dict[str, Any]
    meta: dict[str, Any]
    entries: dict[tuple[str, str], Entry]
    kinds: dict[tuple[str, str], str]
    claims: dict[str, list[str]]


def cell_sort_key(name: str) -> tuple:
    m = re.match(r"py(\d+)\.(\d+)-(.+)$", name)
    if not m:
        return (999, 999, 99, name)
    build = m.group(3)
    order = BUILD_ORDER.index(build) if build in BUILD_ORDER else len(BUILD_ORDER)
    return (int(m.group(1)), int(m.group(2)), order, build)


def normalise_expected(value: Any) -> tuple[list[str], str]:
    """Accept ["PASS"], "PASS", {"outcomes": [...], "reason": ".."} or [[...], reason]."""
    if value is None:
        return [], ""
    if isinstance(value, str):
        return [value], ""
    if isinstance(value, Mapping):
        outcomes = value.get("outcomes") or value.get("expected") or []
        return sorted(str(o) for o in outcomes), str(value.get("reason") or "")
    if isinstance(value, (list, tuple)):
        if len(value) == 2 and isinstance(value[0], (list, tuple)) and isinstance(value[1], str):
            return sorted(str(o) for o in value[0]), value[1]
        return sorted(str(o) for o in value), ""
    return [str(value)], ""


def _first_line(text: Any, limit: int = 160) -> str:
    for line in str(text or "").splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return ""


def _evidence_line(result: Mapping[str, Any]) -> str:
    evidence = result.get("evidence")
    if isinstance(evidence, Mapping):
        for key in ("summary", "reason", "signatures", "error", "stage", "stderr_tail"):
            value = evidence.get(key)
            if value:
                if isinstance(value, (list, tuple)):
                    value = "; ".join(str(v) for v in value)
                elif isinstance(value, Mapping):
                    value = value.get("message") or value.get("type") or json.dumps(value)[:160]
                return f"{key}: {_first_line(value)}"
    elif evidence:
        return _first_line(evidence if isinstance(evidence, str) else json.dumps(evidence))
    return ""


def entry_from_result(result: Mapping[str, Any]) -> Entry:
    outcome = str(result.get("outcome") or "")
    expected, reason = normalise_expected(result.get("expected"))
    reason = str(result.get("expected_reason") or reason or "")
    ok = result.get("ok")
    if ok is None and expected and outcome:
        ok = outcome in expected
    if outcome == "SKIP":
        detail = str(result.get("skip_reason") or reason or _evidence_line(result))
        return Entry(SKIPPED, outcome="SKIP", expected=expected, reason=reason, detail=_first_line(detail))
    return Entry(
        RAN,
        outcome=outcome,
        expected=expected,
        reason=reason,
        ok=bool(ok) if ok is not None else None,
        seconds=result.get("seconds"),
        figures=_figures.extract(
            result.get("metrics") or {}, scenario=str(result.get("scenario") or ""), kind=str(result.get("kind") or "")
        ),
        detail="" if ok else _evidence_line(result),
        hang_unconfirmed=_hang_unconfirmed(result) if outcome == "HANG" else [],
    )


def _hang_unconfirmed(result: Mapping[str, Any]) -> list[str]:
    evidence = result.get("evidence")
    where = evidence.get("hang_where") if isinstance(evidence, Mapping) else None
    if not isinstance(where, Mapping):
        return []
    return [str(p) for p in where.get("unchecked") or []]


def _own_results(results: list[Any], catalogued: set[tuple[str, str]]) -> list[Mapping[str, Any]]:
    """The results that belong to the cell: with a catalogue, only its variants, and for a variant
    that pytest ran under its own item (``nodeid`` ``...::<scenario>[...]``) only that item's run
    (other tests of the harness may have run the same variant for their own purposes)."""
    rows = [r for r in results if isinstance(r, Mapping) and "scenario" in r]
    if catalogued:
        rows = [r for r in rows if (str(r["scenario"]), str(r.get("variant") or "")) in catalogued]
    own = {
        (str(r["scenario"]), str(r.get("variant") or ""))
        for r in rows
        if f"::{r['scenario']}[" in str(r.get("nodeid", ""))
    }
    return [
        r
        for r in rows
        if (str(r["scenario"]), str(r.get("variant") or "")) not in own
        or f"::{r['scenario']}[" in str(r.get("nodeid", ""))
    ]


def _guess_cell_name(path: Path) -> str:
    return path.stem


def read_cell(path: Path) -> Cell:
    data = read_json(path)
    if isinstance(data, list):
        data = {"results": data}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: not a cell file (expected an object or a list of results)")
    results = data.get("results") or []
    if not isinstance(results, list):
        raise ValueError(f"{path}: 'results' is not a list")
    fingerprint = dict(data.get("fingerprint") or {})
    if not fingerprint:
        for r in results:
            if isinstance(r, Mapping) and r.get("fingerprint"):
                fingerprint = dict(r["fingerprint"])
                break
    entries: dict[tuple[str, str], Entry] = {}
    kinds: dict[tuple[str, str], str] = {}
    claims: dict[str, list[str]] = {}
    for item in data.get("catalogue") or []:
        key = (str(item["scenario"]), str(item["variant"]))
        kinds[key] = str(item.get("kind") or "")
        claims[key[0]] = list(item.get("claims") or [])
        entries[key] = Entry(NOT_RUN)
    catalogued = set(entries)
    for r in _own_results(results, catalogued):
        key = (str(r["scenario"]), str(r.get("variant") or ""))
        kinds.setdefault(key, str(r.get("kind") or ""))
        new = entry_from_result(r)
        old = entries.get(key)
        # Several results for one variant (--repeat): the cell keeps the first that disagrees.
        if old is None or old.status != RAN or (old.ok is not False and new.ok is False):
            entries[key] = new
    for s in data.get("skipped") or []:
        key = (str(s["scenario"]), str(s.get("variant") or ""))
        if key not in entries or entries[key].status == NOT_RUN:
            entries[key] = Entry(SKIPPED, outcome="SKIP", detail=_first_line(s.get("reason")))
    meta = {k: v for k, v in data.items() if k not in ("results", "catalogue", "skipped", "fingerprint")}
    later = _unfinished_run(path, meta.get("started"))
    if later:
        meta["unfinished_run"] = later
    return Cell(str(data.get("cell") or _guess_cell_name(path)), str(path), fingerprint, meta, entries, kinds, claims)


RUNNING_SUFFIX = ".running"


def _unfinished_run(path: Path, started: Any) -> dict[str, Any] | None:
    """The ``.running`` marker a later run of this cell left beside its file (see
    repro.matrix_plugin): that run was killed, or is still going. A marker older than the file is
    some other run's leftover and is ignored."""
    marker = path.with_name(path.name + RUNNING_SUFFIX)
    try:
        info = json.loads(marker.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, Mapping):
        return None
    if isinstance(started, str) and str(info.get("started", "")) <= started:
        return None
    return {k: info.get(k) for k in ("pid", "host", "started")}


def copy_cells(src: str | Path, dst: str | Path) -> list[Path]:
    """Copy the cell files of ``src`` (``*.json``) into ``dst`` with any ``.running`` marker
    beside them, so that a report merged from ``dst`` still sees a run that never finished; a
    marker in ``dst`` that ``src`` no longer has (that run finished since) is removed."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for marker in dst.glob("*.json" + RUNNING_SUFFIX):
        if not (src / marker.name).exists():
            marker.unlink()
    for path in sorted([*src.glob("*.json"), *src.glob("*.json" + RUNNING_SUFFIX)]):
        shutil.copy2(path, dst / path.name)
        copied.append(dst / path.name)
    return copied


_STOPPED = {2: "interrupted", 3: "internal error", 4: "usage error", 5: "no tests collected"}


def source_stamp(root: Path | None = None) -> dict[str, Any]:
    """The code a cell ran: git commit and whether the tree had uncommitted changes to tracked
    files (empty when git or the repository is not there)."""
    import subprocess

    root = root or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return {}
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10
        )
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {}


def stopped_early(run: Mapping[str, Any]) -> str:
    """Why a cell's pytest run (its file's ``pytest``) did not run every test it collected, or ''."""
    status, collected, tests = run.get("exitstatus"), run.get("collected"), run.get("tests")
    if status in _STOPPED:
        return f"pytest stopped: {_STOPPED[status]} (exit status {status})"
    ran = sum(tests.values()) if isinstance(tests, Mapping) else None
    if isinstance(collected, int) and isinstance(ran, int) and ran < collected:
        return f"pytest ran {ran} of {collected} tests"
    return ""


def incomplete(meta: Mapping[str, Any]) -> str:
    """Why a cell is incomplete (stopped early, or scenario items that failed without a result), or ''."""
    run = meta.get("pytest") or {}
    why = [stopped_early(run)]
    later = meta.get("unfinished_run")
    if isinstance(later, Mapping):
        why.append(
            f"a later run (started {later.get('started')}, pid {later.get('pid')} on {later.get('host')}) "
            "did not finish: killed, or still running; these results are from before it"
        )
    lost = run.get("unrecorded") or []
    if lost:
        why.append(f"{len(lost)} scenario item(s) failed without a result: {', '.join(lost[:5])}" + (", …" if len(lost) > 5 else ""))
    return "; ".join(w for w in why if w)


def collect_paths(inputs: Iterable[str | Path]) -> list[Path]:
    paths: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            paths.extend(sorted(q for q in p.glob("*.json") if not q.name.startswith(".")))
        elif p.exists():
            paths.append(p)
        else:
            raise FileNotFoundError(f"no such cell file or directory: {p}")
    return paths


# -- merging ------------------------------------------------------------------------------


def merge(cells: list[Cell], expect_cells: Iterable[str] = ()) -> dict[str, Any]:
    """The merged matrix as plain data (what report.json holds)."""
    by_name: dict[str, Cell] = {}
    for cell in cells:
        if cell.name in by_name:
            raise ValueError(f"two files for cell {cell.name}: {by_name[cell.name].source} and {cell.source}")
        by_name[cell.name] = cell
    names = sorted(by_name, key=cell_sort_key)
    missing_cells = sorted((set(expect_cells) - set(names)), key=cell_sort_key)

    keys: set[tuple[str, str]] = set()
    kinds: dict[tuple[str, str], str] = {}
    claims: dict[str, list[str]] = {}
    for cell in cells:
        keys.update(cell.entries)
        for k, v in cell.kinds.items():
            if v:
                kinds.setdefault(k, v)
        for k, v in cell.claims.items():
            claims.setdefault(k, v)

    rows = []
    for key in sorted(keys):
        per_cell = {}
        for name in names:
            entry = by_name[name].entries.get(key) or Entry(NOT_RUN)
            per_cell[name] = entry
        statuses = {e.status for e in per_cell.values()}
        ran_in = [n for n, e in per_cell.items() if e.status == RAN]
        flags = []
        if not ran_in:
            flags.append("hole: no cell ran it")
        elif statuses != {RAN} or missing_cells:
            not_in = [n for n, e in per_cell.items() if e.status != RAN] + missing_cells
            flags.append("not run in " + ", ".join(not_in))
        mismatches = [n for n, e in per_cell.items() if e.status == RAN and e.ok is False]
        outcomes = {e.outcome for e in per_cell.values() if e.status == RAN}
        rows.append(
            {
                "scenario": key[0],
                "variant": key[1],
                "kind": kinds.get(key, ""),
                "claims": claims.get(key[0], []),
                "cells": {n: e.to_json() for n, e in per_cell.items()},
                "flags": flags,
                "mismatches": mismatches,
                "differs_across_cells": len(outcomes) > 1,
            }
        )
    incomplete_cells = sum(1 for n in names if incomplete(by_name[n].meta))
    return {
        "schema": "splitrepro.matrix/1",
        "generated": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "cells": [
            {
                "name": n,
                "source": by_name[n].source,
                "fingerprint": by_name[n].fingerprint,
                "meta": by_name[n].meta,
                "counts": _counts(by_name[n]),
                "incomplete": incomplete(by_name[n].meta),
            }
            for n in names
        ],
        "missing_cells": missing_cells,
        "rows": rows,
        "summary": {
            "variants": len(rows),
            "mismatches": sum(1 for r in rows if r["mismatches"]),
            "holes": sum(1 for r in rows if any(f.startswith("hole") for f in r["flags"])),
            "partial": sum(1 for r in rows if any(f.startswith("not run") for f in r["flags"])),
            "incomplete": incomplete_cells,
        },
    }


def _counts(cell: Cell) -> dict[str, int]:
    counts = {"ran": 0, "as_predicted": 0, "disagree": 0, "skipped": 0, "not_run": 0}
    for e in cell.entries.values():
        if e.status == RAN:
            counts["ran"] += 1
            if e.ok is False:
                counts["disagree"] += 1
            elif e.ok:
                counts["as_predicted"] += 1
        elif e.status == SKIPPED:
            counts["skipped"] += 1
        else:
            counts["not_run"] += 1
    return counts


# -- rendering ------------------------------------------------------------------------------


def cell_text(entry: Mapping[str, Any], *, plain: bool = False) -> str:
    status = entry["status"]
    if status == NOT_RUN:
        return "—"
    if status == SKIPPED:
        return "SKIP" if plain else "⏭ SKIP"
    mark = "" if plain else ("✅ " if entry["ok"] else "❌ " if entry["ok"] is False else "")
    text = f"{mark}{entry['outcome']}"
    if entry["ok"] is False and entry["expected"]:
        text += f" (expected {'/'.join(entry['expected'])})"
    if entry.get("hang_unconfirmed"):
        text += " (place not confirmed)"
    key = entry.get("key_figure")
    if key:
        text += f" · {_figures.fmt_value(key['value'], key['unit'], key.get('target'))}"
        if key.get("target"):
            text += f" {key['target']}{' ✓' if key['ok'] else ' ✗'}"
        elif key.get("claim"):
            text += f" (claim {key['claim']}{' ✓' if key['claim_ok'] else ' ✗'})"
    return text


def _fp_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "–"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "–"
    return "–" if value in (None, "") else str(value)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(merged: Mapping[str, Any], title: str = "splitrepro matrix") -> str:
    cells = [c["name"] for c in merged["cells"]]
    s = merged["summary"]
    out = [f"# {title}", ""]
    out.append(
        f"Generated {merged['generated']} from {len(cells)} cell(s). "
        f"{s['variants']} scenario variants; {s['mismatches']} disagree with their prediction in some cell; "
        f"{s['partial']} not run in every cell; {s['holes']} run in no cell."
    )
    out.append("")
    if merged["missing_cells"]:
        out.append(
            f"**Cells not run:** {', '.join(merged['missing_cells'])} (interpreter missing, or the cell failed before writing results)."
        )
        out.append("")
    stopped = [f"{c['name']} ({c['incomplete']})" for c in merged["cells"] if c.get("incomplete")]
    if stopped:
        out.append(f"**Incomplete cells:** {'; '.join(stopped)}. Their — may be tests that never ran.")
        out.append("")
    out.append(
        "✅ outcome as predicted for that build · ❌ disagrees · ⏭ skipped (not applicable) · — not run · `· figure` key figure of a load scenario · "
        "HANG (place not confirmed): a stack the hang's place is sought in (hang_where) could not be taken"
    )
    out.append("")
    out.append("| scenario:variant | kind | " + " | ".join(cells) + " |")
    out.append("|---|---|" + "---|" * len(cells))
    for row in merged["rows"]:
        name = f"{row['scenario']}:{row['variant']}"
        values = [_md_escape(cell_text(row["cells"][c])) for c in cells]
        out.append(f"| `{name}` | {row['kind']} | " + " | ".join(values) + " |")
    out.append("")

    mism = [r for r in merged["rows"] if r["mismatches"]]
    out.append("## Disagreements with predictions")
    out.append("")
    if not mism:
        out.append("None: every variant that ran showed a predicted outcome.")
    for r in mism:
        for c in r["mismatches"]:
            e = r["cells"][c]
            why = f" — prediction: {e['expected_reason']}" if e["expected_reason"] else ""
            detail = f" — {e['detail']}" if e["detail"] else ""
            out.append(
                f"- `{r['scenario']}:{r['variant']}` in {c}: {e['outcome']}, expected {'/'.join(e['expected']) or '?'}{why}{detail}"
            )
    out.append("")

    flagged = [r for r in merged["rows"] if r["flags"]]
    out.append("## Skipped or not run everywhere")
    out.append("")
    if not flagged:
        out.append("Every variant ran in every cell.")
    groups: dict[tuple[str, str, str], list[str]] = {}
    for r in flagged:
        reasons = sorted(
            {r["cells"][c]["detail"] for c in cells if r["cells"][c]["status"] == SKIPPED and r["cells"][c]["detail"]}
        )
        extra = f" (skip reason: {'; '.join(reasons)})" if reasons else ""
        groups.setdefault((r["scenario"], "; ".join(r["flags"]), extra), []).append(r["variant"])
    for (scenario, flags, extra), variants in groups.items():
        names = ", ".join(f"`{v}`" for v in variants) if len(variants) <= 4 else f"{len(variants)} variants"
        out.append(f"- `{scenario}` {names}: {flags}{extra}")
    out.append("")

    out.append("## Cells")
    out.append("")
    keys = [k for k in FINGERPRINT_KEYS if any(k in c["fingerprint"] for c in merged["cells"])]
    out.append("| cell | ran | as predicted | disagree | skipped | not run | wall | code | " + " | ".join(keys) + " |")
    out.append("|---|---|---|---|---|---|---|---|" + "---|" * len(keys))
    for c in merged["cells"]:
        n = c["counts"]
        fp = [_md_escape(_fp_value(c["fingerprint"].get(k))) for k in keys]
        wall = c["meta"].get("wall_seconds")
        wall_text = f"{wall / 60:.1f} min" if isinstance(wall, (int, float)) else "–"
        out.append(
            f"| {c['name']} | {n['ran']} | {n['as_predicted']} | {n['disagree']} | {n['skipped']} | {n['not_run']} | "
            f"{wall_text} | {source_text(c['meta'].get('source'))} | " + " | ".join(fp) + " |"
        )
    out.append("")
    commits = sorted({source_text(c["meta"].get("source")) for c in merged["cells"]})
    if len(commits) > 1 or any(c.endswith("+") or c == "?" for c in commits):
        out.append(
            "**Cells ran different code** (commit; `+` = uncommitted changes, `?` = not recorded): "
            + ", ".join(f"{c['name']} {source_text(c['meta'].get('source'))}" for c in merged["cells"])
            + ". A disagreement may come from that, not from the build."
        )
        out.append("")
    machines = sorted({_machine_text(c["meta"].get("machine")) for c in merged["cells"]} - {""})
    if machines:
        out.append("Machine: " + "; ".join(machines) + ".")
        out.append("")
    partial = [c["name"] for c in merged["cells"] if _partial_args(c["meta"])]
    if partial:
        out.append(f"Partial runs (pytest selected a subset with -k/-m): {', '.join(partial)}.")
        out.append("")
    return "\n".join(out)


def source_text(source: Any) -> str:
    """'abc1234' for a cell's commit, 'abc1234+' with uncommitted changes, '?' when unknown."""
    if not isinstance(source, Mapping) or not source.get("commit"):
        return "?"
    return str(source["commit"])[:7] + ("+" if source.get("dirty") else "")


def _machine_text(machine: Any) -> str:
    if not isinstance(machine, Mapping) or "cpus" not in machine:
        return ""
    return f"{machine.get('cpu_model', '?')}, {machine.get('cpus')} CPUs, {machine.get('memory_gib', '?')} GiB"


def _partial_args(meta: Mapping[str, Any]) -> bool:
    args = (meta.get("pytest") or {}).get("args") or []
    return any(a in ("-k", "-m") or str(a).startswith(("-k", "-m")) for a in args)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3;position:sticky;top:0}
td.ok{background:#e7f6e7}td.bad{background:#fbdada;font-weight:bold}
td.skip{background:#f4f1e0;color:#666}td.none{background:#eee;color:#999}td.unknown{background:#fff}
code{font-size:12px}details{margin:.5em 0}pre{white-space:pre-wrap;font-size:12px}
"""


def _html_class(entry: Mapping[str, Any]) -> str:
    if entry["status"] == NOT_RUN:
        return "none"
    if entry["status"] == SKIPPED:
        return "skip"
    if entry["ok"] is None:  # ran, but with no prediction to hold it against: neither colour
        return "unknown"
    return "bad" if entry["ok"] is False else "ok"


def render_html(merged: Mapping[str, Any], title: str = "splitrepro matrix") -> str:
    esc = html.escape
    cells = [c["name"] for c in merged["cells"]]
    s = merged["summary"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>Generated {esc(merged['generated'])} from {len(cells)} cell(s): {s['variants']} variants, "
        f"{s['mismatches']} disagreeing, {s['partial']} not run in every cell, {s['holes']} run in no cell.</p>",
    ]
    if merged["missing_cells"]:
        parts.append(f"<p><b>Cells not run:</b> {esc(', '.join(merged['missing_cells']))}</p>")
    for c in merged["cells"]:
        if c.get("incomplete"):
            parts.append(f"<p><b>Incomplete cell:</b> {esc(c['name'])} ({esc(c['incomplete'])})</p>")
    parts.append("<table><tr><th>scenario:variant</th><th>kind</th><th>claims</th>")
    parts.extend(f"<th>{esc(c)}</th>" for c in cells)
    parts.append("<th>flags</th></tr>")
    for row in merged["rows"]:
        parts.append(
            f"<tr><td><code>{esc(row['scenario'])}:{esc(row['variant'])}</code></td><td>{esc(row['kind'])}</td>"
            f"<td>{esc(', '.join(row['claims']))}</td>"
        )
        for c in cells:
            e = row["cells"][c]
            tip = e["detail"] or e["expected_reason"]
            figs = "; ".join(
                _figures.fmt_figure(
                    _figures.Figure(f["name"], f["value"], f["unit"], f["target"], claim=f.get("claim"))
                )
                for f in e["figures"][:12]
            )
            title_attr = esc("\n".join(x for x in (tip, figs) if x))
            parts.append(f"<td class='{_html_class(e)}' title='{title_attr}'>{esc(cell_text(e, plain=True))}</td>")
        parts.append(f"<td>{esc('; '.join(row['flags']))}</td></tr>")
    parts.append("</table><h2>Cells</h2>")
    for c in merged["cells"]:
        parts.append(f"<details><summary>{esc(c['name'])} — {esc(json.dumps(c['counts']))}</summary><table>")
        for k, v in sorted(c["fingerprint"].items()):
            parts.append(
                f"<tr><th>{esc(str(k))}</th><td><pre>{esc(_fp_value(v) if not isinstance(v, str) else v)}</pre></td></tr>"
            )
        for k, v in sorted(c["meta"].items()):
            parts.append(f"<tr><th>{esc(str(k))}</th><td><pre>{esc(json.dumps(v, default=str))}</pre></td></tr>")
        parts.append("</table></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_reports(merged: Mapping[str, Any], prefix: Path, title: str) -> list[Path]:
    outputs = {
        prefix.with_suffix(".md"): render_markdown(merged, title),
        prefix.with_suffix(".html"): render_html(merged, title),
        prefix.with_suffix(".json"): json.dumps(merged, indent=1, sort_keys=True, default=str),
    }
    for path, text in outputs.items():
        write_atomic(path, text + "\n")
    return list(outputs)



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m repro.matrix", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="cell files or directories of them")
    ap.add_argument("-o", "--output", default="results/report", help="output prefix (.md/.html/.json added)")
    ap.add_argument("--expect-cells", default="", help="comma-separated cell names that should be there")
    ap.add_argument("--title", default="splitrepro matrix")
    ap.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 on a disagreement, a hole, a missing or an incomplete cell (default: report only)",
    )
    args = ap.parse_args(argv)
    expect = [c for c in args.expect_cells.split(",") if c]
    try:
        paths = collect_paths(args.inputs)
        if not paths:
            ap.error("no cell files found in " + ", ".join(args.inputs))
        cells = [read_cell(p) for p in paths]
        merged = merge(cells, expect)
    except (OSError, ValueError) as exc:  # a missing or unreadable input, not a cell file, a cell twice
        ap.error(str(exc))
    prefix = Path(args.output)
    if prefix.suffix in (".md", ".html", ".json"):
        prefix = prefix.with_suffix("")
    written = write_reports(merged, prefix, args.title)
    s = merged["summary"]
    print(
        f"{len(cells)} cell(s), {s['variants']} variants: {s['mismatches']} disagree, {s['partial']} partial, "
        f"{s['holes']} holes; missing cells: {', '.join(merged['missing_cells']) or 'none'}; "
        f"incomplete cells: {s['incomplete']}"
    )
    for p in written:
        print(f"wrote {p}")
    if args.strict and (s["mismatches"] or s["holes"] or merged["missing_cells"] or s["incomplete"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
