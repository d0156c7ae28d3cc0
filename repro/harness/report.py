"""Markdown report of results, fit for a GitHub step summary (``$GITHUB_STEP_SUMMARY``)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # at run time only load_results needs it: the matrix merge (no psutil) reads JSON here
    from repro.harness.runner import Result


def read_json(path: str | Path) -> Any:
    """A JSON file's content; a file that is not JSON is a ValueError naming the file."""
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` (its folder made) through a temporary file and a rename: a
    reader, or a run stopped half-way, sees the old file or the new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_results(paths: Iterable[str | Path]) -> list[Result]:
    """Results from JSON files holding one result, a list, or ``{"results": [...]}``."""
    import dataclasses

    from repro.harness.runner import Result

    # what every result holds: the fields of Result without a default, outcome first
    required = ["outcome"] + [
        f.name for f in dataclasses.fields(Result)
        if f.name != "outcome" and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    out: list[Result] = []
    for path in paths:
        data = read_json(path)
        items = data.get("results", [data]) if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ValueError(f"{path}: not a splitrepro result file (no result, list or 'results' list)")
        for item in items:
            missing = [k for k in required if k not in item] if isinstance(item, dict) else ["outcome"]
            if missing:
                raise ValueError(f"{path}: not a splitrepro result file (no {', '.join(map(repr, missing))})")
            out.append(Result.from_dict(item))
    return out


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def key_metrics(r: Result, limit: int = 4) -> str:
    items = []
    for k, v in r.metrics.items():
        if k.endswith("pid") or isinstance(v, (list, dict)):
            continue  # pids are noise; series belong to the JSON
        if isinstance(v, float):
            v = f"{v:.4g}"
        items.append(f"{k}={v}")
        if len(items) == limit:
            break
    if r.evidence.get("hang"):
        items.append(f"hang decided at {r.evidence['hang'].get('detected_after_s')}s")
    return ", ".join(items)


def _fp_line(fp: dict[str, Any]) -> str:
    if not fp:
        return "(no fingerprint)"
    return (
        f"Python {fp.get('python')} · torch {fp.get('torch')} · transformers {fp.get('transformers')} · "
        f"backend {fp.get('torch_parallel_backend')} · OpenMP {', '.join(fp.get('openmp_runtimes') or []) or 'none'} · "
        f"intra-op threads {fp.get('torch_num_threads')} · CPUs {fp.get('cpu_count')} · {fp.get('system')} {fp.get('machine')} · "
        f"build {fp.get('build')} · CUDA {fp.get('cuda')}"
    )


def render(results: list[Result], title: str = "splitrepro results") -> str:
    skipped = [r for r in results if r.outcome == "SKIP"]
    ran = [r for r in results if r.outcome != "SKIP"]
    ok = sum(r.ok for r in ran)
    lines = [f"## {title}", ""]
    lines.append(
        f"**{ok}/{len(ran)} as expected**"
        + ("" if ok == len(ran) else f" — {len(ran) - ok} unexpected")
        + (f" · {len(skipped)} skipped on this build" if skipped else "")
    )
    lines.append("")
    fps = {json.dumps(r.fingerprint, sort_keys=True, default=str): r.fingerprint for r in results}
    for fp in fps.values():
        lines.append(f"- {_fp_line(fp)}")
        for w in fp.get("warnings") or []:
            lines.append(f"  - ⚠️ {w}")
    lines += [
        "",
        "| scenario | variant | kind | expected | observed | ok | seconds | key metrics |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ran:
        mark = "✅" if r.ok else "❌"
        lines.append(
            f"| {_cell(r.scenario)} | {_cell(r.variant)} | {r.kind} | {'/'.join(r.expected)} | **{r.outcome}** | {mark} | {r.seconds:.2f} | {_cell(key_metrics(r))} |"
        )
    if skipped:
        lines += ["", "<details><summary>Skipped on this build</summary>", ""]
        lines += [f"- `{_cell(r.id)}` ({r.kind}): {_cell(r.expected_reason)}" for r in skipped]
        lines += ["", "</details>"]
    bad = [r for r in ran if not r.ok]
    if bad:
        lines += ["", "### Unexpected outcomes", ""]
        for r in bad:
            lines.append(
                f"<details><summary><b>{_cell(r.id)}</b>: {r.outcome} (expected {'/'.join(r.expected)})</summary>"
            )
            lines.append("")
            lines.append("```text")
            lines.append(r.summary())
            stacks = r.evidence.get("stacks") or {}
            for pid, entry in list(stacks.items())[:4]:
                lines.append(f"--- stacks of pid {pid} ({entry.get('method')}) ---")
                lines.extend((entry.get("text") or "").splitlines()[:40])
            lines.append("```")
            lines.append("</details>")
            lines.append("")
    hazards = [r for r in ran if r.kind == "hazard" and r.ok and r.outcome != "PASS"]
    if hazards:
        lines += ["", "### Hazards reproduced where predicted", ""]
        seen = set()
        for r in hazards:
            if r.id in seen:
                continue
            seen.add(r.id)
            lines.append(
                f"- `{r.id}`: {r.outcome} — {r.expected_reason or 'as expected'}"
                + (f" — {r.where()}" if r.where() else "")
            )
    return "\n".join(lines) + "\n"
