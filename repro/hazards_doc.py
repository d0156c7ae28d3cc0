"""Generate docs/HAZARDS.md: every claim of the seeds, with a verdict per build and the scenario that shows it.

    python -m repro.hazards_doc results/report.json -o docs/HAZARDS.md
    python -m repro.hazards_doc results/cells -o docs/HAZARDS.md      # cell files merged on the fly

The claims come from :mod:`repro.claims`, the scenarios that bear on each claim from the catalogue
(``@scenario(claims=...)``), the outcomes from a merged matrix report (:mod:`repro.matrix`) or
cell files. The verdict of a claim in a cell is read off its scenarios' variants there:

* a *hazard* variant that ran and did not PASS reproduces the hazard (an ERROR excepted: the run
  broke, see ``ctx.only_symptoms_fail`` and ``hang_where``; a TIMEOUT or CRASH only where the
  build's prediction allows it); one that passed did not;
* a *fix* variant holds when it passes;
* *load* and *probe* variants contribute their key figure;
* any outcome that disagrees with the build's prediction is called out first;
* a claim with no scenario, or none run in a cell, is "not tested" there -- never a pass.

On top of that, each claim's ``checks`` (see :mod:`repro.claims`) give a verdict on the claim
itself per cell: holds, refuted, mixed, not tested, or observed only where its checks only observe
(:func:`claim_verdict`); that is what the
summary table shows.

Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import operator
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from repro import figures as _figures
from repro import matrix as _matrix
from repro.claims import CLAIMS
from repro.harness.report import read_json, write_atomic


def load_merged(inputs: list[str]) -> dict[str, Any]:
    if len(inputs) == 1 and Path(inputs[0]).is_file():
        data = read_json(inputs[0])
        if isinstance(data, Mapping) and str(data.get("schema", "")).startswith("splitrepro.matrix"):
            return dict(data)
    cells = [_matrix.read_cell(p) for p in _matrix.collect_paths(inputs)]
    return _matrix.merge(cells)


def claim_scenarios() -> dict[str, list[str]]:
    """claim id -> scenario names that name it, from the catalogue."""
    from repro.scenarios import load_catalogue

    out: dict[str, list[str]] = {cid: [] for cid in CLAIMS}
    for sc in load_catalogue().values():
        for cid in sc.claims:
            out.setdefault(cid, []).append(sc.name)
    return out


def _label(row: Mapping[str, Any], entry: Mapping[str, Any]) -> str:
    text = f"`{row['scenario']}:{row['variant']}` {entry['outcome']}"
    if entry.get("hang_unconfirmed"):
        text += f" (place not confirmed: {', '.join(entry['hang_unconfirmed'])})"
    key = entry.get("key_figure")
    if key:
        text += f" ({key['name']} {_figures.fmt_value(key['value'], key['unit'], key.get('target'))}"
        if key.get("target"):
            text += f", target {key['target']}{' met' if key['ok'] else ' missed'}"
        if key.get("claim"):
            text += f", seed's claim {key['claim']}{' confirmed' if key['claim_ok'] else ' not confirmed'}"
        text += ")"
    return text


def verdict(rows: list[Mapping[str, Any]], cell: str) -> tuple[str, str]:
    """(verdict, shown by) of one claim in one cell, from the rows of its scenarios."""
    ran = [(r, r["cells"][cell]) for r in rows if cell in r["cells"] and r["cells"][cell]["status"] == _matrix.RAN]
    if not ran:
        skipped = [
            r["cells"][cell]["detail"]
            for r in rows
            if cell in r["cells"] and r["cells"][cell]["status"] == _matrix.SKIPPED and r["cells"][cell]["detail"]
        ]
        reason = f" (skipped: {'; '.join(sorted(set(skipped)))})" if skipped else ""
        return "not tested" + reason, ""
    parts: list[str] = []
    shown: list[str] = []
    wrong = [(r, e) for r, e in ran if e["ok"] is False]
    if wrong:
        parts.append(
            "⚠ disagrees with prediction: "
            + ", ".join(
                f"{r['scenario']}:{r['variant']} {e['outcome']} (expected {'/'.join(e['expected'])})" for r, e in wrong
            )
        )
        shown.extend(_label(r, e) for r, e in wrong)
    # an ERROR is a run that broke (a check other than the symptom, a hang elsewhere): no evidence
    broke = [(r, e) for r, e in ran if r["kind"] == "hazard" and e["outcome"] == "ERROR"]
    hazards = [(r, e) for r, e in ran if r["kind"] == "hazard" and e["outcome"] != "ERROR"]
    if broke:
        parts.append(f"{len(broke)} hazard variant(s) broke (ERROR: no evidence either way)")
        shown.extend(_label(r, e) for r, e in broke if (r, e) not in wrong)
    if hazards:
        # a FAIL comes only from the checked symptom (ctx.only_symptoms_fail) and a HANG only
        # where the variant hangs (hang_where): each counts even where the build's prediction
        # said otherwise (a finding). A TIMEOUT or a CRASH says less: it counts only where
        # predicted, and is otherwise listed above as a disagreement
        repro = [
            (r, e)
            for r, e in hazards
            if e["outcome"] != "PASS" and (e["ok"] is not False or e["outcome"] in ("FAIL", "HANG"))
        ]
        passed = [(r, e) for r, e in hazards if e["outcome"] == "PASS"]
        if repro:
            outcomes = "/".join(sorted({e["outcome"] for _, e in repro}))
            unconfirmed = [e for _, e in repro if e.get("hang_unconfirmed")]
            tail = (
                f"; {len(unconfirmed)} HANG(s) whose place could not be confirmed (a stack or native frames not taken)"
                if unconfirmed
                else ""
            )
            parts.append(f"hazard reproduces ({outcomes}, {len(repro)} of {len(hazards)} hazard variants{tail})")
            shown.extend(_label(r, e) for r, e in repro if (r, e) not in wrong)
        elif len(passed) == len(hazards):
            parts.append(f"hazard does not reproduce ({len(hazards)} hazard variants PASS)")
            shown.extend(_label(r, e) for r, e in hazards[:2] if (r, e) not in wrong)
        else:
            parts.append(
                f"hazard not shown ({len(passed)} of {len(hazards)} hazard variants PASS, the others ended otherwise than predicted)"
            )
    fixes = [(r, e) for r, e in ran if r["kind"] == "fix"]
    if fixes:
        broken = [(r, e) for r, e in fixes if e["outcome"] != "PASS"]
        if broken:
            parts.append(f"fix fails ({len(broken)} of {len(fixes)})")
            shown.extend(_label(r, e) for r, e in broken if (r, e) not in wrong)
        else:
            parts.append(f"fix holds ({len(fixes)} fix variants PASS)")
            shown.extend(_label(r, e) for r, e in fixes[:2])
    measured = [(r, e) for r, e in ran if r["kind"] in ("load", "probe")]
    for r, e in measured:
        if e.get("key_figure") or r["kind"] == "probe":
            shown.append(_label(r, e))
    claims = [(r, f) for r, e in ran for f in e.get("figures") or [] if f.get("claim")]
    for r, f in claims:
        verdict_word = "within" if f.get("claim_ok") else "outside"
        parts.append(
            f"seed's figure {verdict_word} its claim: {f['name']} = {_figures.fmt_value(f['value'], f['unit'])} "
            f"(claimed {f['claim']}, `{r['scenario']}:{r['variant']}`)"
        )
    if measured and not hazards and not fixes:
        outcomes = "/".join(sorted({e["outcome"] for _, e in measured}))
        missed = [e for _, e in measured if e.get("key_figure") and e["key_figure"].get("ok") is False]
        parts.append(f"measured ({outcomes})" + (f"; {len(missed)} target(s) missed" if missed else ""))
    seen: set[str] = set()
    shown = [s for s in shown if not (s in seen or seen.add(s))]
    return "; ".join(parts), "<br>".join(shown[:6])


OUTCOMES = {"PASS", "FAIL", "ERROR", "CRASH", "HANG", "TIMEOUT"}
_CMP = re.compile(r"^\s*([\w.\-]+)\s*(<=|>=|==|!=|<|>)\s*(-?\d+(?:\.\d+)?)\s*$")
_OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<": operator.lt, ">": operator.gt}
MEANS = ("for", "against", "observe")


def parse_test(test: str) -> tuple[str, Any]:
    """('outcome', {outcomes}) or ('figure', (name, op, number)); ValueError when neither."""
    m = _CMP.match(test)
    if m:
        return "figure", (m.group(1), m.group(2), float(m.group(3)))
    outcomes = {o.strip() for o in test.split("|")}
    if outcomes and outcomes <= OUTCOMES:
        return "outcome", outcomes
    raise ValueError(f"check test {test!r}: neither outcomes ({'|'.join(sorted(OUTCOMES))}) nor 'figure <op> number'")


def evaluate_check(check: tuple, rows_by_key: Mapping[str, Mapping[str, Any]], cell: str) -> dict[str, Any]:
    """One check of a claim in one cell: did its test hold, and what that means for the claim.

    ``counts``: ``for`` / ``against`` (the claim gained or lost support), ``observed`` /
    ``not observed`` (an ``observe`` check), or ``None`` when the variant did not run there, lacks
    the figure, or ended in an ERROR that the test does not name (the run broke: no evidence)."""
    variant, test, means, what = check
    kind, arg = parse_test(test)
    row = rows_by_key.get(variant)
    entry = (row or {}).get("cells", {}).get(cell)
    out: dict[str, Any] = {"variant": variant, "test": test, "means": means, "what": what, "holds": None, "counts": None}
    if entry is None or entry.get("status") != _matrix.RAN:
        out["got"] = "skipped" if entry and entry.get("status") == _matrix.SKIPPED else "not run"
        return out
    if entry["outcome"] == "ERROR" and not (kind == "outcome" and "ERROR" in arg):
        out["got"] = "ERROR (an exception escaped: not evidence)"
        return out
    if kind == "outcome":
        out["holds"] = entry["outcome"] in arg
        out["got"] = entry["outcome"]
    else:
        name, op, number = arg
        fig = next((f for f in entry.get("figures") or [] if f.get("name") == name), None)
        if fig is None or not isinstance(fig.get("value"), (int, float)):
            out["got"] = f"{entry['outcome']}, no figure {name}"
            return out
        out["holds"] = bool(_OPS[op](float(fig["value"]), number))
        out["got"] = f"{name} = {_figures.fmt_value(fig['value'], fig.get('unit', ''))}"
    if means == "observe":
        out["counts"] = "observed" if out["holds"] else "not observed"
    else:
        out["counts"] = "for" if out["holds"] == (means == "for") else "against"
    return out


def claim_verdict(checks: list[tuple], rows_by_key: Mapping[str, Mapping[str, Any]], cell: str) -> tuple[str, list[dict]]:
    """(short verdict, evaluated checks) of one claim in one cell."""
    done = [evaluate_check(c, rows_by_key, cell) for c in checks]
    pro = sum(1 for d in done if d["counts"] == "for")
    con = sum(1 for d in done if d["counts"] == "against")
    if not checks:
        return "no check", done
    if pro + con == 0:
        seen = [d for d in done if d["counts"] in ("observed", "not observed")]
        if seen:
            by_what: dict[str, list[bool]] = {}
            for d in seen:
                by_what.setdefault(d["what"], []).append(bool(d["holds"]))
            return "observed only (" + "; ".join(f"{w}: {sum(v)} of {len(v)}" for w, v in by_what.items()) + ")", done
        return "not tested", done
    if con == 0:
        return f"holds ({pro}/{pro})", done
    if pro == 0:
        return f"refuted ({con}/{con})", done
    return f"mixed ({pro} for, {con} against)", done


_MARK = {"for": "✔ for", "against": "✘ against", "observed": "• observed", "not observed": "• not observed", None: "– not counted"}


def _check_line(d: Mapping[str, Any]) -> str:
    return f"{_MARK[d['counts']]}: `{d['variant']}` {d['got']} — {d['what']} (`{d['test']}`)"


def render(merged: Mapping[str, Any], scenarios_by_claim: Mapping[str, list[str]]) -> str:
    cells = [c["name"] for c in merged["cells"]]
    out = ["# Hazards: the seeds' claims, tested per build", ""]
    out.append(
        "Generated by `python -m repro.hazards_doc` from `repro/claims.py`, the scenario catalogue and the matrix "
        f"results of {merged.get('generated', '?')} ({len(cells)} cell(s): {', '.join(cells) or 'none'}). "
        "Each claim is one of the seeds' hypotheses. Its *checks* (`repro/claims.py`) name the variants that "
        "bear on it and what their outcome or figure means for it; a build's column says whether the claim "
        "*holds* there (every check supports it), is *refuted* (every check counts against it), is *mixed*, "
        "or was *not tested*; *observed only* where its checks only record what happened (no check for or "
        "against). ⚠ marks an outcome of the claim's scenarios that the build's prediction did not "
        "allow. Below each claim, every check's result per build, then the scenarios' own outcomes (a hazard "
        "*reproduces* when its hazard variant showed its symptom: a FAIL only from the checked symptom, a HANG "
        "only where the variant says it hangs, else the run is an ERROR, which counts for nothing; a TIMEOUT or a "
        "CRASH only where the build's prediction names it; a *fix holds* "
        "when its fix variants passed). "
        "The *finding* column is this suite's reading of the claim, in words; the per-build columns are "
        "generated from the results and show where it would stop holding. Details of every variant: docs/matrix/."
    )
    out.append("")
    if merged.get("missing_cells"):
        out.append(f"Cells with no results: {', '.join(merged['missing_cells'])}.")
        out.append("")
    stopped = [f"{c['name']} ({c['incomplete']})" for c in merged["cells"] if c.get("incomplete")]
    if stopped:
        out.append(f"Incomplete cells, whose checks may not all have run: {'; '.join(stopped)}.")
        out.append("")
    out.append("## Summary")
    out.append("")
    out.append("| claim | seed | finding | scenarios | " + " | ".join(cells) + " |")
    out.append("|---|---|---|---|" + "---|" * len(cells))
    details = []
    rows_by_key = {f"{r['scenario']}:{r['variant']}": r for r in merged["rows"]}
    for cid, info in CLAIMS.items():
        names = scenarios_by_claim.get(cid, [])
        rows = [r for r in merged["rows"] if r["scenario"] in names]
        per_cell = {c: verdict(rows, c) for c in cells}
        checks = info.get("checks") or []
        per_cell_claim = {c: claim_verdict(checks, rows_by_key, c) for c in cells}
        short = [
            ("⚠ " if per_cell[c][0].startswith("⚠") else "") + per_cell_claim[c][0] if checks else _short(per_cell[c][0])
            for c in cells
        ]
        out.append(
            f"| {cid} | {info['seed']} | {info.get('verdict', '–')} | {', '.join(f'`{n}`' for n in names) or '**none**'} | "
            + " | ".join(short)
            + " |"
        )
        details.append((cid, info, names, per_cell, per_cell_claim))
    out.append("")
    for cid, info, names, per_cell, per_cell_claim in details:
        out.append(f"## {cid}")
        out.append("")
        out.append(f"> {info['claim']}")
        out.append("")
        if info.get("finding"):
            out.append(f"**Finding: {info.get('verdict', '')}.** {info['finding']}")
            out.append("")
        if info.get("history"):
            # the runs and experiments behind the finding: kept, but folded away
            out.append("<details><summary>The measurements behind it, run by run</summary>")
            out.append("")
            out.append(info["history"])
            out.append("")
            out.append("</details>")
            out.append("")
        if not names:
            out.append("No scenario names this claim: untested.")
            out.append("")
            continue
        out.append(f"Scenarios: {', '.join(f'`{n}`' for n in names)}.")
        out.append("")
        out.append("| build | claim | its checks | scenario outcomes | shown by |")
        out.append("|---|---|---|---|---|")
        for c in cells:
            v, shown = per_cell[c]
            cv, done = per_cell_claim[c]
            lines = "<br>".join(_check_line(d) for d in done) or "–"
            out.append(
                f"| {c} | {cv.replace('|', '/')} | {lines.replace('|', '/')} | {v.replace('|', '/')} | {shown.replace('|', '/')} |"
            )
        out.append("")
    return "\n".join(out)


def _short(text: str) -> str:
    if not text:
        return "–"
    if text.startswith("⚠"):
        return "⚠ unpredicted"
    if text.startswith("not tested"):
        return "not tested"
    bits = []
    if "hazard reproduces" in text:
        bits.append("reproduces")
    if "does not reproduce" in text:
        bits.append("no repro")
    if "fix holds" in text:
        bits.append("fix holds")
    if "fix fails" in text:
        bits.append("fix FAILS")
    if "measured" in text:
        bits.append("missed target" if "missed" in text else "measured")
    if "outside its claim" in text:
        bits.append("claim not confirmed")
    elif "within its claim" in text:
        bits.append("claim confirmed")
    return ", ".join(bits) or text[:40]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m repro.hazards_doc", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="a merged report.json, or cell files / directories")
    ap.add_argument("-o", "--output", default="docs/HAZARDS.md")
    args = ap.parse_args(argv)
    try:
        merged = load_merged(args.inputs)
    except (OSError, ValueError) as exc:  # a missing or unreadable input, not a report or cell file
        ap.error(str(exc))
    text = render(merged, claim_scenarios())
    write_atomic(args.output, text + "\n")
    print(f"wrote {args.output} ({len(CLAIMS)} claims, {len(merged['cells'])} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
