"""The matrix merge (repro.matrix), figure reading (repro.figures), the per-cell pytest plugin
(repro.matrix_plugin) and the HAZARDS.md generator (repro.hazards_doc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from repro import figures, hazards_doc, matrix

ROOT = Path(__file__).resolve().parents[1]


# -- figures ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value,target,ok",
    [
        (1.02, "<=1.05", True),
        (1.06, "<=1.05", False),
        (49.9, "<50", True),
        (50.0, "<50", False),
        (3.0, ">=3", True),
        (2.99, ">= 3", False),
        (2.6, "≥2.5", True),
        (1.0, "nonsense", None),
        (None, "<=1", None),
    ],
)
def test_meets(value, target, ok):
    assert figures.meets(value, target) is ok


def test_extract_shapes():
    metrics = {
        "figures": {"overhead": {"value": 1.02, "unit": "x", "target": "<=1.05"}, "rps": 250},
        "latency_ms": 3.5,
        "nested": {"p50_ms": 1.0, "label": "x", "flag": True},
        "targets": {"latency_ms": "<5"},
        "key": "rps",
        "runs": [1, 2, 3],
        "name": "text",
    }
    figs = {f.name: f for f in figures.extract(metrics)}
    assert set(figs) == {"overhead", "rps", "latency_ms", "nested.p50_ms"}  # no bools, strings or lists
    assert figs["overhead"].ok is True and figs["overhead"].unit == "x"
    assert figs["latency_ms"].target == "<5" and figs["latency_ms"].unit == "ms"
    assert figures.key_figure(list(figs.values())).name == "rps"


def test_dict_targets_as_scenarios_write_them():
    """The shapes the scenario modules record: named target dicts, ranges, and target_X bounds."""
    metrics = {
        "targets": {
            "server_over_direct_le_1.05": {"value": 1.08, "target": 1.05, "met": False},
            "4_clients_mean_batch_ge_3": {"value": 3.4, "target": 3, "met": True},
            "socket_vs_floor": {"value": 1.2, "target": 1.5, "met": True},  # direction from `met`
            "manager_over_socket_10_to_50x": {"value": 23.0, "claim": "10-50x"},
            "unknown": {"value": 2.0, "target": 2.0},  # no direction: no target
        },
        "overhead_ratio": 1.2,
        "target_ratio": 1.15,
    }
    figs = {f.name: f for f in figures.extract(metrics)}
    assert figs["server_over_direct_le_1.05"].target == "<=1.05" and figs["server_over_direct_le_1.05"].ok is False
    assert figs["4_clients_mean_batch_ge_3"].target == ">=3" and figs["4_clients_mean_batch_ge_3"].ok is True
    assert figs["socket_vs_floor"].target == "<=1.5"
    claim = figs["manager_over_socket_10_to_50x"]  # a seed's claim is compared, never a target of ours
    assert claim.target is None and claim.claim == "10..50" and claim.claim_ok is True
    assert figures.key_figure([claim]) is claim
    assert figs["unknown"].target is None
    assert figs["overhead_ratio"].target == "<=1.15" and figs["overhead_ratio"].ok is False
    assert "target_ratio" not in figs
    assert figures.key_figure(list(figs.values())).name == "server_over_direct_le_1.05"
    assert figures.meets(60.0, "10..50") is False


def test_default_targets_apply_and_hazards_drop_them():
    metrics = {"ratio": 0.7, "traditional_peak_rss_mb": 900.0}
    fig = figures.key_figure(figures.extract(metrics, scenario="loading_memory"))
    assert fig.name == "ratio" and fig.target == "<=0.5" and fig.ok is False
    own = figures.key_figure(figures.extract({**metrics, "targets": {"ratio": "<=0.8"}}, scenario="loading_memory"))
    assert own.target == "<=0.8" and own.ok is True  # the scenario's own target wins
    hazard = figures.extract({"heartbeat_max_gap_ms": 900.0}, scenario="manager_lock", kind="hazard")
    assert hazard[0].target is None and hazard[0].key


def test_fmt_value():
    assert figures.fmt_value(1.0234, "x") == "1.02x"
    assert figures.fmt_value(12.345, "ms") == "12.3 ms"
    assert figures.fmt_value(12345.6, "req/s") == "12,346 req/s"
    assert figures.fmt_value(None) == "–"


# -- merging ------------------------------------------------------------------------------------------
def _result(scenario, variant, kind, outcome, expected, **kw):
    return {
        "scenario": scenario,
        "variant": variant,
        "kind": kind,
        "outcome": outcome,
        "expected": expected,
        "expected_reason": kw.pop("reason", ""),
        "ok": outcome in expected,
        "seconds": 1.5,
        "metrics": kw.pop("metrics", {}),
        "evidence": kw.pop("evidence", {}),
    }


CATALOGUE = [
    {"scenario": "fork", "variant": "fork", "kind": "hazard", "claims": ["002-fork-deadlock"]},
    {"scenario": "fork", "variant": "spawn", "kind": "fix", "claims": ["002-fork-deadlock"]},
    {"scenario": "ipc", "variant": "bench", "kind": "load", "claims": ["002-manager-queue-cost"]},
    {"scenario": "cuda", "variant": "fork", "kind": "hazard", "claims": ["002-cuda-fork"]},
]


def _write_cell(path: Path, cell: str, results, skipped=(), fingerprint=None):
    data = {
        "schema": "splitrepro.cell/1",
        "cell": cell,
        "fingerprint": fingerprint or {"python": "3.11.7", "torch": "2.13.0", "build": cell.split("-")[1]},
        "catalogue": CATALOGUE,
        "results": list(results),
        "skipped": list(skipped),
        "pytest": {"exitstatus": 0},
    }
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def two_cells(tmp_path):
    cells = tmp_path / "cells"
    cells.mkdir()
    _write_cell(
        cells / "py3.11-bundled.json",
        "py3.11-bundled",
        [
            _result("fork", "fork", "hazard", "HANG", ["HANG"], reason="libgomp"),
            _result("fork", "spawn", "fix", "PASS", ["PASS"]),
            _result(
                "ipc",
                "bench",
                "load",
                "PASS",
                ["PASS"],
                metrics={"manager_ratio": 23.0, "targets": {"manager_ratio": ">=10"}, "key": "manager_ratio"},
            ),
        ],
        skipped=[{"scenario": "cuda", "variant": "fork", "reason": "no CUDA device"}],
    )
    _write_cell(
        cells / "py3.11-mkl.json",
        "py3.11-mkl",
        [
            _result(
                "fork",
                "fork",
                "hazard",
                "PASS",
                ["HANG"],
                reason="libgomp",
                evidence={"summary": "child finished <fine>"},
            ),
            _result("fork", "spawn", "fix", "PASS", ["PASS"]),
        ],
    )
    return cells


def test_merge_flags_mismatches_holes_and_missing_cells(two_cells):
    cells = [matrix.read_cell(p) for p in matrix.collect_paths([two_cells])]
    merged = matrix.merge(cells, ["py3.10-bundled", "py3.11-bundled", "py3.11-mkl"])
    assert [c["name"] for c in merged["cells"]] == ["py3.11-bundled", "py3.11-mkl"]
    assert merged["missing_cells"] == ["py3.10-bundled"]
    rows = {(r["scenario"], r["variant"]): r for r in merged["rows"]}
    assert rows[("fork", "fork")]["mismatches"] == ["py3.11-mkl"]
    assert rows[("fork", "fork")]["differs_across_cells"]
    assert rows[("cuda", "fork")]["flags"] == ["hole: no cell ran it"]
    assert rows[("cuda", "fork")]["cells"]["py3.11-bundled"]["status"] == "skipped"
    assert rows[("ipc", "bench")]["flags"][0].startswith("not run in py3.11-mkl")
    key = rows[("ipc", "bench")]["cells"]["py3.11-bundled"]["key_figure"]
    assert key["name"] == "manager_ratio" and key["ok"] is True
    # a missing expected cell means nothing ran everywhere, even a variant both present cells ran
    assert "py3.10-bundled" in rows[("fork", "spawn")]["flags"][0]
    assert merged["summary"] == {"variants": 4, "mismatches": 1, "holes": 1, "partial": 3, "incomplete": 0}


def test_reports_render_and_escape(two_cells, tmp_path):
    rc = matrix.main([str(two_cells), "-o", str(tmp_path / "out" / "report"), "--title", "T <b>"])
    assert rc == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| `fork:fork` | hazard | ✅ HANG | ❌ PASS (expected HANG) |" in md
    assert "`fork:fork` in py3.11-mkl: PASS, expected HANG — prediction: libgomp — summary: child finished <fine>" in md
    assert "- `cuda` `fork`: hole: no cell ran it (skip reason: no CUDA device)" in md
    assert "| `ipc:bench` | load | ✅ PASS · 23.0x >=10 ✓ | — |" in md
    html = (tmp_path / "out" / "report.html").read_text()
    assert "T &lt;b&gt;" in html and "<b>" not in html.split("<body>")[1].split("</h1>")[0]
    assert "class='bad'" in html
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["schema"] == "splitrepro.matrix/1" and len(data["rows"]) == 4
    assert matrix.main([str(two_cells), "-o", str(tmp_path / "strict"), "--strict"]) == 1


def test_cells_on_different_code_are_flagged(two_cells, tmp_path):
    for name, source in (("py3.11-bundled", {"commit": "a" * 40, "dirty": False}), ("py3.11-mkl", {"commit": "b" * 40, "dirty": True})):
        path = two_cells / f"{name}.json"
        data = json.loads(path.read_text())
        data["source"] = source
        path.write_text(json.dumps(data))
    cells = [matrix.read_cell(p) for p in matrix.collect_paths([two_cells])]
    md = matrix.render_markdown(matrix.merge(cells))
    assert "**Cells ran different code**" in md and "py3.11-bundled aaaaaaa, py3.11-mkl bbbbbbb+" in md
    # the same clean commit everywhere: no flag
    path = two_cells / "py3.11-mkl.json"
    data = json.loads(path.read_text())
    data["source"] = {"commit": "a" * 40, "dirty": False}
    path.write_text(json.dumps(data))
    cells = [matrix.read_cell(p) for p in matrix.collect_paths([two_cells])]
    md = matrix.render_markdown(matrix.merge(cells))
    assert "Cells ran different code" not in md and "| aaaaaaa |" in md
    assert matrix.source_text(None) == "?" and matrix.source_text({"commit": "c" * 40, "dirty": True}) == "ccccccc+"


def test_reads_plain_run_json(tmp_path):
    """`python -m repro run --all --json F` output is a cell too (named after the file)."""
    path = tmp_path / "adhoc.json"
    path.write_text(
        json.dumps(
            {"fingerprint": {"python": "3.12.1"}, "results": [_result("fork", "spawn", "fix", "CRASH", ["PASS"])]}
        )
    )
    cell = matrix.read_cell(path)
    assert cell.name == "adhoc" and cell.fingerprint["python"] == "3.12.1"
    entry = cell.entries[("fork", "spawn")]
    assert entry.status == "ran" and entry.ok is False


def test_duplicate_cell_rejected(two_cells, tmp_path):
    other = _write_cell(tmp_path / "copy.json", "py3.11-mkl", [])
    cells = [matrix.read_cell(p) for p in [*matrix.collect_paths([two_cells]), other]]
    with pytest.raises(ValueError, match="two files for cell py3.11-mkl"):
        matrix.merge(cells)


def test_cell_order():
    names = ["py3.13-mkl", "py3.10-bundled", "py3.11-mkl", "py3.11-bundled", "adhoc"]
    assert sorted(names, key=matrix.cell_sort_key) == [
        "py3.10-bundled",
        "py3.11-bundled",
        "py3.11-mkl",
        "py3.13-mkl",
        "adhoc",
    ]


# -- HAZARDS.md -----------------------------------------------------------------------------------------
def test_hazards_verdicts(two_cells, tmp_path, monkeypatch):
    monkeypatch.setitem(
        hazards_doc.CLAIMS["002-fork-deadlock"], "checks", [("fork:fork", "HANG", "for", "hangs"), ("fork:spawn", "PASS", "for", "fixed")]
    )
    merged = hazards_doc.load_merged([str(two_cells)])
    rows_fork = [r for r in merged["rows"] if r["scenario"] == "fork"]
    v, shown = hazards_doc.verdict(rows_fork, "py3.11-bundled")
    assert "hazard reproduces (HANG" in v and "fix holds" in v and "`fork:fork` HANG" in shown
    v, _ = hazards_doc.verdict(rows_fork, "py3.11-mkl")
    assert v.startswith("⚠ disagrees with prediction: fork:fork PASS (expected HANG)")
    v, _ = hazards_doc.verdict([r for r in merged["rows"] if r["scenario"] == "cuda"], "py3.11-bundled")
    assert v == "not tested (skipped: no CUDA device)"
    text = hazards_doc.render(merged, {"002-fork-deadlock": ["fork"], "002-cuda-fork": ["cuda"]})
    finding = hazards_doc.CLAIMS["002-fork-deadlock"]["verdict"]
    assert f"| 002-fork-deadlock | 002 | {finding} | `fork` | holds (2/2) | ⚠ mixed (1 for, 1 against) |" in text
    assert "| py3.11-mkl | mixed (1 for, 1 against) | ✘ against: `fork:fork` PASS — hangs (`HANG`)<br>✔ for: `fork:spawn` PASS" in text
    assert f"**Finding: {finding}.**" in text
    assert "No scenario names this claim: untested." in text  # e.g. 000-mutex-harmless here
    # a claim's history (the runs behind its finding) follows the finding, folded
    monkeypatch.setitem(hazards_doc.CLAIMS["002-fork-deadlock"], "history", "Run of 2026-11-23: 1.2 s.")
    text = hazards_doc.render(merged, {"002-fork-deadlock": ["fork"], "002-cuda-fork": ["cuda"]})
    after = text.split(f"**Finding: {finding}.**", 1)[1]
    assert after.index("<details><summary>") < after.index("Run of 2026-11-23: 1.2 s.") < after.index("</details>")
    assert after.index("</details>") < after.index("Scenarios: `fork`.")


def test_claim_checks_give_a_verdict_per_cell(two_cells):
    merged = hazards_doc.load_merged([str(two_cells)])
    rows = {f"{r['scenario']}:{r['variant']}": r for r in merged["rows"]}
    checks = [
        ("fork:fork", "HANG", "for", "a forked child hangs"),
        ("fork:spawn", "PASS", "for", "spawn fixes it"),
    ]
    assert hazards_doc.claim_verdict(checks, rows, "py3.11-bundled")[0] == "holds (2/2)"
    v, done = hazards_doc.claim_verdict(checks, rows, "py3.11-mkl")
    assert v == "mixed (1 for, 1 against)"
    assert [d["counts"] for d in done] == ["against", "for"] and done[0]["got"] == "PASS"
    # figures: compared as numbers; 'against' turns the sense round; a missing figure does not count
    figure_checks = [
        ("ipc:bench", "manager_ratio >= 10", "for", "at least 10x"),
        ("ipc:bench", "manager_ratio > 30", "against", "more than 30x"),
        ("ipc:bench", "no_such_figure < 1", "for", "absent"),
    ]
    v, done = hazards_doc.claim_verdict(figure_checks, rows, "py3.11-bundled")
    assert v == "holds (2/2)", done
    assert done[0]["got"] == "manager_ratio = 23.0x" and done[2]["counts"] is None and "no figure" in done[2]["got"]
    assert hazards_doc.claim_verdict(figure_checks[:1], rows, "py3.11-mkl")[0] == "not tested"  # not run there
    assert hazards_doc.claim_verdict([("cuda:fork", "FAIL", "for", "x")], rows, "py3.11-bundled")[0] == "not tested"
    v, _ = hazards_doc.claim_verdict([("fork:fork", "HANG", "observe", "hangs")], rows, "py3.11-bundled")
    assert v == "observed only (hangs: 1 of 1)"
    assert hazards_doc.claim_verdict([], rows, "py3.11-bundled")[0] == "no check"
    with pytest.raises(ValueError):
        hazards_doc.parse_test("HUNG")
    with pytest.raises(ValueError):
        hazards_doc.parse_test("x =< 3")


def test_every_claim_check_names_a_catalogued_variant_and_parses():
    from repro.claims import CLAIMS
    from repro.scenarios import load_catalogue

    known = {f"{sc.name}:{v.name}": sc for sc in load_catalogue().values() for v in sc.variants}
    for cid, info in CLAIMS.items():
        assert info.get("checks"), f"{cid} has no checks"
        for variant, test, means, what in info["checks"]:
            assert variant in known, f"{cid}: {variant} is not in the catalogue"
            assert cid in known[variant].claims, f"{cid}: {variant}'s scenario does not name this claim"
            hazards_doc.parse_test(test)
            assert means in hazards_doc.MEANS and what, (cid, variant)


# -- the pytest plugin, in a separate pytest process --------------------------------------------------------
PLUGIN_SCENARIOS = """
from repro.harness.spec import Outcome, fix, hazard, load, scenario

def _never(build):
    return "not on this build"

@scenario(name="mx_demo", claims=("002-fork-deadlock",), timeout=30, variants=[
    fix("ok"),
    hazard("fails", expect=Outcome.FAIL),
    load("figures"),
    fix("skipped", requires=_never),
])
def mx_demo(ctx):
    if ctx.variant == "fails":
        ctx.fail("broken as predicted")
    if ctx.variant == "figures":
        ctx.record(overhead_ratio=1.01, targets={"overhead_ratio": "<=1.05"})
"""

PLUGIN_TEST = """
import pytest
from repro.harness.runner import run_variant
from repro.harness.spec import Build
import mx_scenarios  # registers mx_demo
from repro.harness.spec import REGISTRY

SC = REGISTRY["mx_demo"]

@pytest.mark.parametrize("scenario,variant", [pytest.param(SC, v, id=v.name) for v in SC.variants])
def test_demo(scenario, variant):
    build = Build({"python": "3.11.7", "build": "bundled"}, variant.env)
    reason = variant.skip_reason(build)
    if reason:
        pytest.skip(reason)
    assert run_variant(scenario, variant, build=build).ok
"""


def _run_cell_pytest(tmp_path, out, test_file, monkeypatch, *args):
    """pytest with the cell plugin on ``test_file`` in ``tmp_path``, results to ``out``, cell 'demo'."""
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT}")
    monkeypatch.setenv("SPLITREPRO_CELL_FINGERPRINT", "0")  # no torch import for these tests
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "repro.matrix_plugin", f"--repro-results={out}/", "--repro-cell=demo",
         "-p", "no:cacheprovider", "-q", test_file, *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_plugin_writes_cell(tmp_path, monkeypatch):
    (tmp_path / "mx_scenarios.py").write_text(textwrap.dedent(PLUGIN_SCENARIOS))
    (tmp_path / "test_demo.py").write_text(textwrap.dedent(PLUGIN_TEST))
    out = tmp_path / "cells"
    proc = _run_cell_pytest(tmp_path, out, "test_demo.py", monkeypatch)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "demo.json").read_text())
    assert data["schema"] == "splitrepro.cell/1" and data["cell"] == "demo"
    assert data["pytest"]["tests"] == {"passed": 3, "skipped": 1}
    got = {r["variant"]: r for r in data["results"] if r["scenario"] == "mx_demo"}
    assert {v: r["outcome"] for v, r in got.items()} == {"ok": "PASS", "fails": "FAIL", "figures": "PASS"}
    assert got["figures"]["metrics"]["overhead_ratio"] == 1.01
    assert "fingerprint" not in got["ok"]  # once per cell
    assert len(data["source"]["commit"]) == 40 and isinstance(data["source"]["dirty"], bool)
    assert data["skipped"] == [
        {"scenario": "mx_demo", "variant": "skipped", "kind": "fix", "reason": "not on this build", "nodeid": "test_demo.py::test_demo[skipped]"}
    ]  # fmt: skip
    assert {
        "scenario": "mx_demo",
        "variant": "ok",
        "kind": "fix",
        "claims": ["002-fork-deadlock"],
        "seed": None,
    } in data["catalogue"]
    merged = matrix.merge([matrix.read_cell(out / "demo.json")])
    demo = {r["variant"]: r for r in merged["rows"] if r["scenario"] == "mx_demo"}
    assert demo["figures"]["cells"]["demo"]["key_figure"]["ok"] is True
    assert demo["skipped"]["cells"]["demo"]["status"] == "skipped"


@pytest.mark.parametrize(
    "args,mode",
    [
        ([], "quick"),
        (["--repro-load=full"], "full"),
        (["-p", "repro.matrix_plugin", "--repro-results={out}/", "--repro-cell=demo"], "full"),
        (["-p", "repro.matrix_plugin", "--repro-results={out}/", "--repro-cell=demo", "--repro-load=quick"], "quick"),
    ],
    ids=["default", "asked-full", "matrix-cell", "cell-asked-quick"],
)
def test_load_mode_of_the_suite(tmp_path, args, mode):
    """The test suite runs load variants quick by default; a matrix cell records the benchmark's
    figures, so it runs them in full unless told otherwise."""
    argv = [a.format(out=tmp_path) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--co", "-p", "no:cacheprovider", "-k", "no_such_test", *argv,
         str(ROOT / "tests" / "test_scenarios.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "SPLITREPRO_CELL_FINGERPRINT": "0"},
    )  # fmt: skip
    assert f"splitrepro: load variants run {mode} (--repro-load)" in proc.stdout, proc.stdout + proc.stderr


def test_interrupted_cell_run_keeps_the_finished_results(tmp_path, monkeypatch):
    (tmp_path / "test_stop.py").write_text("def test_stop():\n    raise KeyboardInterrupt\n")
    out = tmp_path / "cells"
    out.mkdir()
    (out / "demo.json").write_text('{"cell": "demo", "results": []}')
    proc = _run_cell_pytest(tmp_path, out, "test_stop.py", monkeypatch)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (out / "demo.json").read_text() == '{"cell": "demo", "results": []}'
    partial = json.loads((out / "demo.json.interrupted").read_text())
    assert partial["pytest"]["exitstatus"] == 2 and "earlier results are kept" in proc.stdout + proc.stderr
    assert [p.name for p in matrix.collect_paths([out])] == ["demo.json"]  # the report reads the finished one


@pytest.mark.parametrize("args", [["-k", "no_such_test"], ["-x"]], ids=["nothing-collected", "stopped-at-first-failure"])
def test_a_run_stopped_early_keeps_the_finished_results(tmp_path, monkeypatch, args):
    """Not only Ctrl-C: a run that collected nothing or stopped early (-x) goes beside the cell file."""
    (tmp_path / "test_stop.py").write_text("def test_a():\n    assert False\n\ndef test_b():\n    pass\n")
    out = tmp_path / "cells"
    out.mkdir()
    (out / "demo.json").write_text('{"cell": "demo", "results": []}')
    proc = _run_cell_pytest(tmp_path, out, "test_stop.py", monkeypatch, *args)
    assert proc.returncode in (1, 5), proc.stdout + proc.stderr
    assert (out / "demo.json").read_text() == '{"cell": "demo", "results": []}'
    (beside,) = [p for p in out.iterdir() if p.name != "demo.json"]
    assert matrix.incomplete(json.loads(beside.read_text())), beside.name
    assert "earlier results are kept" in proc.stdout + proc.stderr


def test_a_run_stopped_early_replaces_an_earlier_run_that_stopped_early(tmp_path, monkeypatch):
    """Beside a finished file a stopped run goes aside; an older file that is itself from a run
    that stopped early holds nothing finished to keep: the newer run replaces it (before, every
    later stopped run went beside it, and the oldest partial run stayed the cell's file)."""
    (tmp_path / "test_stop.py").write_text("def test_a():\n    assert False\n\ndef test_b():\n    pass\n")
    out = tmp_path / "cells"
    out.mkdir()
    older = {"cell": "demo", "results": [], "pytest": {"exitstatus": 2, "collected": 9, "tests": {"passed": 1}}}
    (out / "demo.json").write_text(json.dumps(older))
    proc = _run_cell_pytest(tmp_path, out, "test_stop.py", monkeypatch, "-x")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert [p.name for p in out.iterdir()] == ["demo.json"]
    data = json.loads((out / "demo.json").read_text())
    assert data["pytest"]["collected"] == 2 and matrix.incomplete(data)
    assert "replaces an earlier run that stopped early too" in proc.stdout + proc.stderr


def test_an_incomplete_cell_is_flagged_not_clean(tmp_path):
    """A cell whose pytest stopped midway, ran fewer tests than it collected, or lost a scenario
    item's result is named incomplete in the report, and --strict fails on it."""
    cells = tmp_path / "cells"
    cells.mkdir()
    results = [_result("fork", "fork", "hazard", "HANG", ["HANG"]), _result("fork", "spawn", "fix", "PASS", ["PASS"])]
    for name, run in (
        ("py3.11-bundled", {"exitstatus": 0, "collected": 4, "tests": {"passed": 4}}),
        ("py3.11-mkl", {"exitstatus": 2, "collected": 4, "tests": {"passed": 2}}),
        ("py3.12-bundled", {"exitstatus": 1, "collected": 4, "tests": {"passed": 1, "failed": 1}}),
        ("py3.12-mkl", {"exitstatus": 1, "collected": 4, "tests": {"passed": 3, "error": 1}, "unrecorded": ["t.py::ipc[load-bench]"]}),
    ):
        path = _write_cell(cells / f"{name}.json", name, results)
        data = json.loads(path.read_text())
        data["pytest"] = run
        path.write_text(json.dumps(data))
    merged = matrix.merge([matrix.read_cell(p) for p in matrix.collect_paths([cells])])
    why = {c["name"]: c["incomplete"] for c in merged["cells"]}
    assert why["py3.11-bundled"] == ""
    assert "interrupted" in why["py3.11-mkl"] and "2 of 4 tests" in why["py3.12-bundled"]
    assert "t.py::ipc[load-bench]" in why["py3.12-mkl"] and merged["summary"]["incomplete"] == 3
    md = matrix.render_markdown(merged)
    assert "**Incomplete cells:**" in md and "py3.11-mkl (pytest stopped: interrupted" in md
    assert "Incomplete cells" in hazards_doc.render(merged, {})
    assert matrix.main([str(cells), "-o", str(tmp_path / "strict"), "--strict"]) == 1


def test_plugin_names_scenario_items_that_failed_without_a_result(tmp_path, monkeypatch):
    (tmp_path / "mx_scenarios.py").write_text(textwrap.dedent(PLUGIN_SCENARIOS))
    test = PLUGIN_TEST.replace("    assert run_variant(", "    assert variant.name != 'figures', 'setup broke'\n    assert run_variant(")
    (tmp_path / "test_demo.py").write_text(textwrap.dedent(test))
    out = tmp_path / "cells"
    proc = _run_cell_pytest(tmp_path, out, "test_demo.py", monkeypatch)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = json.loads((out / "demo.json").read_text())
    assert data["pytest"]["collected"] == 4 and data["pytest"]["unrecorded"] == ["test_demo.py::test_demo[figures]"]
    assert "test_demo.py::test_demo[figures]" in matrix.incomplete(data)


def test_claim_checks_do_not_count_a_run_that_broke():
    """An ERROR (an exception escaped the scenario) is no evidence for or against a claim, unless
    the check names ERROR; its partial figures are not counted either."""
    rows = {"s:v": {"cells": {"c": {"status": "ran", "outcome": "ERROR", "figures": [{"name": "r", "value": 2.0, "unit": ""}]}}}}
    for check in (("s:v", "FAIL", "against", "x"), ("s:v", "PASS", "for", "x"), ("s:v", "r > 1", "for", "x")):
        (d,) = hazards_doc.claim_verdict([check], rows, "c")[1]
        assert d["counts"] is None and "ERROR" in d["got"], d
    assert hazards_doc.claim_verdict([("s:v", "FAIL", "against", "x")], rows, "c")[0] == "not tested"
    assert hazards_doc.claim_verdict([("s:v", "FAIL|ERROR", "for", "x")], rows, "c")[0] == "holds (1/1)"


def test_an_interrupted_first_run_is_an_incomplete_cell(tmp_path, monkeypatch):
    (tmp_path / "test_stop.py").write_text("def test_a():\n    pass\n\ndef test_stop():\n    raise KeyboardInterrupt\n\ndef test_c():\n    pass\n")
    out = tmp_path / "cells"
    proc = _run_cell_pytest(tmp_path, out, "test_stop.py", monkeypatch)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    merged = matrix.merge([matrix.read_cell(out / "demo.json")])
    assert merged["cells"][0]["incomplete"] == "pytest stopped: interrupted (exit status 2)"
    assert merged["summary"]["incomplete"] == 1


def test_merge_needs_nothing_beyond_the_standard_library():
    """The report steps (nox -s docs, tox -e report, the workflow's report job) install the project
    without its dependencies: the merge and HAZARDS.md must import with no site-packages at all."""
    code = "import sys, repro.matrix, repro.hazards_doc; sys.exit(' '.join(sorted({'psutil', 'torch'} & set(sys.modules))) or None)"
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_killed_run_leaves_the_older_cell_flagged(tmp_path, monkeypatch):
    """pytest killed outright (SIGKILL: no hook runs) cannot write its cell file; the
    ``.running`` marker it left makes the report call the older file it finds incomplete. The next
    run that finishes writes the file and takes the marker away."""
    (tmp_path / "test_kill.py").write_text(
        "import os, signal\n\ndef test_a():\n    pass\n\n"
        "def test_killed():\n    if os.environ.get('KILL_ME'):\n        os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = tmp_path / "cells"
    proc = _run_cell_pytest(tmp_path, out, "test_kill.py", monkeypatch)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [p.name for p in out.iterdir()] == ["demo.json"]  # no marker left by a finished run
    finished = (out / "demo.json").read_text()
    assert matrix.merge([matrix.read_cell(out / "demo.json")])["cells"][0]["incomplete"] == ""

    data = json.loads(finished)  # the finished run is older than the one to be killed
    data["started"] = "2000-01-01T00:00:00+00:00"
    (out / "demo.json").write_text(json.dumps(data))
    monkeypatch.setenv("KILL_ME", "1")
    proc = _run_cell_pytest(tmp_path, out, "test_kill.py", monkeypatch)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    assert json.loads((out / "demo.json").read_text())["started"] == "2000-01-01T00:00:00+00:00"
    (cell,) = matrix.merge([matrix.read_cell(out / "demo.json")])["cells"]
    assert "a later run (started" in cell["incomplete"] and "did not finish" in cell["incomplete"], cell
    assert matrix.main([str(out), "-o", str(tmp_path / "strict"), "--strict"]) == 1

    monkeypatch.delenv("KILL_ME")
    proc = _run_cell_pytest(tmp_path, out, "test_kill.py", monkeypatch)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [p.name for p in out.iterdir()] == ["demo.json"]
    assert matrix.merge([matrix.read_cell(out / "demo.json")])["cells"][0]["incomplete"] == ""


def test_help_leaves_no_marker_and_a_failed_write_keeps_it(tmp_path, monkeypatch):
    """``pytest --help`` starts no session: no ``.running`` marker. A run whose cell file cannot
    be written keeps its marker (the older file is then reported incomplete) and leaves no
    temporary file."""
    (tmp_path / "test_ok.py").write_text("def test_a():\n    pass\n")
    out = tmp_path / "cells"
    out.mkdir()
    for extra in (["--help"], ["--markers"]):
        proc = _run_cell_pytest(tmp_path, out, "test_ok.py", monkeypatch, *extra)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert list(out.iterdir()) == [], extra
    (out / "demo.json").mkdir()  # the cell file cannot be replaced
    proc = _run_cell_pytest(tmp_path, out, "test_ok.py", monkeypatch)
    assert proc.returncode != 0
    assert sorted(p.name for p in out.iterdir()) == ["demo.json", "demo.json.running"], proc.stdout + proc.stderr


def test_copy_cells_takes_the_markers_along(tmp_path):
    """docs/matrix is merged from a copy of the cells: a killed run's marker must go with its
    cell file, and a copied marker whose run has finished since must go."""
    src, dst = tmp_path / "results", tmp_path / "docs"
    src.mkdir()
    _write_cell(src / "py3.11-bundled.json", "py3.11-bundled", [])
    _write_cell(src / "py3.11-mkl.json", "py3.11-mkl", [])
    later = {"pid": 7, "host": "h", "started": "2999-01-01T00:00:00+00:00"}
    (src / "py3.11-mkl.json.running").write_text(json.dumps(later))
    (src / "notes.txt").write_text("not a cell")
    dst.mkdir()
    (dst / "py3.11-bundled.json.running").write_text(json.dumps(later))  # that run finished since
    (dst / "py3.12-mkl.json").write_text("{}")  # a cell only the copy has stays
    matrix.copy_cells(src, dst)
    assert sorted(p.name for p in dst.iterdir()) == [
        "py3.11-bundled.json",
        "py3.11-mkl.json",
        "py3.11-mkl.json.running",
        "py3.12-mkl.json",
    ]
    assert "did not finish" in matrix.incomplete(matrix.read_cell(dst / "py3.11-mkl.json").meta)
    assert matrix.incomplete(matrix.read_cell(dst / "py3.11-bundled.json").meta) == ""


def test_a_hazard_that_timed_out_is_not_a_reproduction():
    """A TIMEOUT (not deadlocked) or a CRASH where the prediction says HANG is a disagreement,
    not the hazard; a FAIL or HANG counts even against the prediction (they come only from the
    symptom and from where the variant hangs)."""

    def row(outcome, expected, variant="fork"):
        cell = {"status": "ran", "outcome": outcome, "ok": outcome in expected, "expected": expected, "figures": []}
        return {"scenario": "fork", "variant": variant, "kind": "hazard", "cells": {"c": cell}}

    v, _ = hazards_doc.verdict([row("TIMEOUT", ["HANG"])], "c")
    assert v.startswith("⚠ disagrees with prediction: fork:fork TIMEOUT") and "hazard reproduces" not in v, v
    assert "hazard not shown (0 of 1 hazard variants PASS" in v, v
    v, _ = hazards_doc.verdict([row("CRASH", ["HANG"]), row("PASS", ["HANG"], "other")], "c")
    assert "hazard reproduces" not in v and "does not reproduce" not in v, v
    v, _ = hazards_doc.verdict([row("TIMEOUT", ["HANG", "TIMEOUT"])], "c")
    assert "hazard reproduces (TIMEOUT, 1 of 1" in v, v
    v, _ = hazards_doc.verdict([row("HANG", ["PASS"])], "c")
    assert "⚠ disagrees" in v and "hazard reproduces (HANG, 1 of 1" in v, v


def test_an_unconfirmed_hang_is_reported_as_such():
    """A HANG whose place could not be confirmed (hang_where patterns unchecked: a stack or
    native frames not taken) still counts, and the report and HAZARDS.md say it was not confirmed."""
    result = {
        "scenario": "fork",
        "variant": "fork",
        "kind": "hazard",
        "outcome": "HANG",
        "expected": ["HANG"],
        "ok": True,
        "evidence": {"hang_where": {"checked": True, "missing": [], "unchecked": ["native:libgomp"]}},
    }
    entry = matrix.entry_from_result(result).to_json()
    assert entry["hang_unconfirmed"] == ["native:libgomp"]
    assert matrix.cell_text(entry) == "✅ HANG (place not confirmed)"
    confirmed = matrix.entry_from_result({**result, "evidence": {"hang_where": {"unchecked": []}}}).to_json()
    assert confirmed["hang_unconfirmed"] == [] and matrix.cell_text(confirmed) == "✅ HANG"
    row = {"scenario": "fork", "variant": "fork", "kind": "hazard", "cells": {"c": {"status": "ran", **entry}}}
    v, shown = hazards_doc.verdict([row], "c")
    assert "hazard reproduces (HANG, 1 of 1 hazard variants; 1 HANG(s) whose place could not be confirmed" in v, v
    assert "`fork:fork` HANG (place not confirmed: native:libgomp)" in shown


def test_a_stale_marker_older_than_the_cell_is_ignored(tmp_path):
    cells = tmp_path / "cells"
    cells.mkdir()
    path = _write_cell(cells / "py3.11-bundled.json", "py3.11-bundled", [])
    data = json.loads(path.read_text())
    data["started"] = "2026-12-03T10:00:00+00:00"
    path.write_text(json.dumps(data))
    marker = cells / "py3.11-bundled.json.running"
    marker.write_text(json.dumps({"pid": 1, "host": "h", "started": "2026-12-03T09:00:00+00:00"}))
    assert matrix.read_cell(path).meta.get("unfinished_run") is None
    marker.write_text(json.dumps({"pid": 1, "host": "h", "started": "2026-12-03T11:00:00+00:00"}))
    assert "pid 1 on h" in matrix.incomplete(matrix.read_cell(path).meta)
    marker.write_text("not json")
    assert matrix.read_cell(path).meta.get("unfinished_run") is None
    assert [p.name for p in matrix.collect_paths([cells])] == ["py3.11-bundled.json"]


def test_html_leaves_a_run_without_a_prediction_uncoloured(two_cells):
    merged = matrix.merge([matrix.read_cell(p) for p in matrix.collect_paths([two_cells])])
    row = next(r for r in merged["rows"] if (r["scenario"], r["variant"]) == ("fork", "spawn"))
    entry = dict(row["cells"]["py3.11-bundled"], ok=None)
    assert matrix._html_class(entry) == "unknown"
    assert matrix._html_class(dict(entry, ok=True)) == "ok" and matrix._html_class(dict(entry, ok=False)) == "bad"


def test_reports_are_replaced_whole(two_cells, tmp_path, monkeypatch):
    """A report write that fails half-way leaves the previous report, not a truncated one."""
    from repro.harness import report

    target = tmp_path / "out" / "report.md"
    report.write_atomic(target, "old\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        report.write_atomic(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in target.parent.iterdir()] == ["report.md"]  # no temporary file left


def test_a_hazard_that_broke_is_not_counted_as_reproduced():
    """An ERROR of a hazard variant (a check other than its symptom, a hang elsewhere) is no
    reproduction: the scenario line says it broke."""
    row = {
        "scenario": "fork",
        "variant": "fork",
        "kind": "hazard",
        "cells": {"c": {"status": "ran", "outcome": "ERROR", "ok": False, "expected": ["HANG"], "figures": []}},
    }
    v, shown = hazards_doc.verdict([row], "c")
    assert "hazard reproduces" not in v and "1 hazard variant(s) broke (ERROR" in v, v
    assert "`fork:fork` ERROR" in shown


@pytest.mark.parametrize(
    "args, says",
    [
        ([], []),
        (["."], []),  # what a bare pytest runs, named
        (["test_ok.py"], ["paths: test_ok.py"]),
        (["test_ok.py::test_a"], ["paths: test_ok.py::test_a"]),
        (["-k", "a"], ["-k a"]),
        (["-m", "not slow", "--deselect", "test_ok.py::test_b"], ["-m not slow", "--deselect test_ok.py::test_b"]),
    ],
)
def test_the_cell_says_what_narrowed_its_run(tmp_path, monkeypatch, args, says):
    """A cell run on some paths or with -k, -m, --deselect records it ('narrowed'), so that what it
    timed is not taken for the whole suite (repro.bench.suite_from_cell); a full run records none."""
    from repro import bench

    (tmp_path / "test_ok.py").write_text("def test_a():\n    pass\n\ndef test_b():\n    pass\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT}")
    monkeypatch.setenv("SPLITREPRO_CELL_FINGERPRINT", "0")
    out = tmp_path / "results" / "cells"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "repro.matrix_plugin", f"--repro-results={out}/", "--repro-cell=py3.99-demo",
         "-p", "no:cacheprovider", "-q", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "py3.99-demo.json").read_text())
    assert data["pytest"]["narrowed"] == says
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    suite = bench.suite_from_cell("3.99", "demo")
    assert (suite is None) == bool(says), suite
