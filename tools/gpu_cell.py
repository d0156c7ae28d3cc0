"""Update the GPU machine's matrix cell (docs/matrix/cells/py3.12-cuda.json) from a run of
tools/gpu_check.sh: the results of ``repro run`` JSON files replace the cell's results of the
same variants, and for each case of a bench JSON the cell gets its median measured run (by the
figure named in ``BY``, else the variant's key figure), marked with where it came from. The
variants not named keep their earlier results, and ``source`` says what came from where.

    python tools/gpu_cell.py --cell docs/matrix/cells/py3.12-cuda.json \\
        --run docs/gpu/2026-12-04/cuda.json --bench docs/gpu/bench-h200-cuda.json \\
        --bench docs/gpu/bench-h200-cpu.json --note "..."

Then ``python -m repro matrix docs/matrix/cells -o docs/matrix/report`` and
``python -m repro hazards`` (or ``nox -s docs``) render it again. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repro import figures  # noqa: E402
from repro.bench import read_bench  # noqa: E402
from repro.harness.report import read_json, write_atomic  # noqa: E402
from repro.matrix_plugin import slim_result  # noqa: E402

# the figure whose median run stands for a load variant in the cell
BY = {"serving_batching": "server_over_direct", "ipc_transports": "manager_over_socket_10_to_50x"}


def _value(run: dict[str, Any], scenario: str) -> float | None:
    """The run's figure named in BY (a top-level metric, else a figure of that name), or its key figure."""
    metrics = run.get("metrics") or {}
    name = BY.get(scenario)
    if name is not None and isinstance(metrics.get(name), (int, float)):
        return float(metrics[name])
    figs = figures.extract(metrics, scenario=scenario, kind="load")
    if name is None:
        key = figures.key_figure(figs)
        return None if key is None else key.value
    return next((f.value for f in figs if f.name == name), None)


def median_run(case: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The measured run whose figure is the median (the lower middle of an even count)."""
    runs = [r for r in case["runs"] if r.get("ok")]
    if not runs:
        raise ValueError(f"{case['scenario']}:{case['variant']}: no run ended as predicted")
    dropped = len(case["runs"]) - len(runs)
    scored = [(v, i, r) for i, r in enumerate(runs) if (v := _value(r, case["scenario"])) is not None]
    if not scored:
        raise ValueError(f"{case['scenario']}:{case['variant']}: no run has the figure {BY.get(case['scenario'], 'key')!r}")
    scored.sort(key=lambda t: (t[0], t[1]))
    value, _, run = scored[(len(scored) - 1) // 2]
    med = statistics.median(v for v, _, _ in scored)
    return run, (
        f"the median of its {len(scored)} measured runs by {BY.get(case['scenario'], 'its key figure')} "
        f"({value:g}; median of all {med:g})"
        + (f"; {dropped} of its {len(case['runs'])} runs did not end as predicted and are not counted" if dropped else "")
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", required=True, type=Path)
    ap.add_argument("--run", action="append", default=[], type=Path, help="a repro run --json file")
    ap.add_argument("--bench", action="append", default=[], type=Path, help="a bench JSON")
    ap.add_argument("--note", required=True, help="the cell's new 'source': what ran where and when")
    args = ap.parse_args(argv)
    try:
        return update(args)
    except (OSError, ValueError, KeyError) as exc:
        print(f"gpu_cell: {exc}", file=sys.stderr)
        return 2


def update(args: argparse.Namespace) -> int:
    cell = read_json(args.cell)
    by_key = {(r["scenario"], r["variant"]): r for r in cell["results"]}
    replaced = []
    for path in args.run:
        results = read_json(path)["results"]
        keys = [(r["scenario"], r["variant"]) for r in results]
        twice = sorted({f"{s}:{v}" for s, v in keys if keys.count((s, v)) > 1})
        if twice:  # which of them stands for the variant is the matrix's rule, not this tool's
            raise ValueError(f"{path}: several results for {', '.join(twice)} (repro run --repeat): give one run each")
        for r in results:
            key = (r["scenario"], r["variant"])
            if r.get("outcome") == "SKIP" and key in by_key:
                replaced.append(f"{r['scenario']}:{r['variant']} kept: skipped in {path}")
                continue  # a machine that could not run it says nothing against the result there
            by_key[key] = slim_result(r)
            replaced.append(f"{r['scenario']}:{r['variant']} {r['outcome']} ({path})")
    for path in args.bench:
        report = read_bench(path)
        for case in report["cases"]:
            run, how = median_run(case)
            old = by_key.get((case["scenario"], case["variant"]), {})
            by_key[(case["scenario"], case["variant"])] = {
                "scenario": case["scenario"],
                "variant": case["variant"],
                "kind": case.get("kind") or old.get("kind", "load"),
                "expected": old.get("expected", ["PASS"]),
                "expected_reason": old.get("expected_reason", ""),
                "outcome": run["outcome"],
                "ok": run["ok"],
                "seconds": run["seconds"],
                "metrics": run["metrics"],
                "source": f"{path}: {how}",
            }
            replaced.append(f"{case['scenario']}:{case['variant']} {run['outcome']} ({path}: {how})")
    cell["results"] = list(by_key.values())  # the cell's order; new variants at the end
    cell["source"] = args.note
    write_atomic(args.cell, json.dumps(cell, indent=1, sort_keys=True, default=str) + "\n")
    print("\n".join(replaced))
    return 0


if __name__ == "__main__":
    sys.exit(main())
