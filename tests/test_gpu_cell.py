"""tools/gpu_cell.py: a GPU run's results replace the same variants of the cell, each
benchmarked load variant gets its median run, the rest of the cell stays as it was."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_cell", ROOT / "tools" / "gpu_cell.py")
gpu_cell = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_cell)


def _entry(scenario, variant, outcome="PASS", **extra):
    return {"scenario": scenario, "variant": variant, "outcome": outcome, "ok": True, "kind": "fix", "expected": [outcome], **extra}


def _bench(path, ratios, oks=None):
    runs = [
        {"outcome": "PASS", "ok": ok, "seconds": float(i), "metrics": {"server_over_direct": r, "run": i}}
        for i, (r, ok) in enumerate(zip(ratios, oks or [True] * len(ratios), strict=True))
    ]
    path.write_text(json.dumps({"cases": [{"scenario": "serving_batching", "variant": "demo_cuda", "kind": "load", "runs": runs}]}))
    return path


def test_runs_and_median_bench_runs_replace_their_variants_only(tmp_path):
    cell = tmp_path / "cell.json"
    old_load = _entry("serving_batching", "demo_cuda", kind="load", expected_reason="why")
    cell.write_text(json.dumps({"cell": "c", "source": "old", "results": [
        _entry("fork_after_threads", "fork", "HANG"), _entry("serving_cuda", "spawn", "FAIL"), old_load,
    ]}))
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"results": [_entry("serving_cuda", "spawn", seconds=9.5)]}))
    # the failed run (ratio 0.5) is not a measurement; of the others 1.09 is the median
    bench = _bench(tmp_path / "b.json", [1.12, 1.04, 0.5, 1.09], oks=[True, True, False, True])
    assert gpu_cell.main(["--cell", str(cell), "--run", str(run), "--bench", str(bench), "--note", "new"]) == 0
    out = json.loads(cell.read_text())
    assert out["source"] == "new"
    assert [(r["scenario"], r["variant"]) for r in out["results"]] == [
        ("fork_after_threads", "fork"), ("serving_cuda", "spawn"), ("serving_batching", "demo_cuda"),
    ]  # the cell's order kept
    fork, spawn, load = out["results"]
    assert fork == _entry("fork_after_threads", "fork", "HANG")  # not named: untouched
    assert spawn["outcome"] == "PASS" and spawn["seconds"] == 9.5
    assert load["metrics"]["server_over_direct"] == 1.09 and load["expected_reason"] == "why"
    assert "median of its 3 measured runs by server_over_direct" in load["source"]


def test_even_count_takes_the_lower_middle_run_and_says_the_median_of_all(tmp_path):
    report = json.loads(_bench(tmp_path / "b.json", [0.97, 0.84]).read_text())
    run, how = gpu_cell.median_run(report["cases"][0])
    assert run["metrics"]["server_over_direct"] == 0.84
    assert "(0.84; median of all 0.905)" in how


def test_a_case_without_a_good_run_is_an_error(tmp_path):
    report = json.loads(_bench(tmp_path / "b.json", [1.0], oks=[False]).read_text())
    with pytest.raises(ValueError, match="no run ended as predicted"):
        gpu_cell.median_run(report["cases"][0])


def test_a_skipped_result_keeps_the_cells_and_repeats_are_refused(tmp_path, capsys):
    cell = tmp_path / "cell.json"
    cell.write_text(json.dumps({"cell": "c", "results": [_entry("serving_cuda", "spawn", "PASS")]}))
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"results": [_entry("serving_cuda", "spawn", "SKIP")]}))  # run where CUDA was not seen
    assert gpu_cell.main(["--cell", str(cell), "--run", str(run), "--note", "n"]) == 0
    assert json.loads(cell.read_text())["results"][0]["outcome"] == "PASS"
    run.write_text(json.dumps({"results": [_entry("serving_cuda", "spawn", "FAIL"), _entry("serving_cuda", "spawn", "PASS")]}))
    before = cell.read_text()
    assert gpu_cell.main(["--cell", str(cell), "--run", str(run), "--note", "n"]) == 2
    assert "several results for serving_cuda:spawn" in capsys.readouterr().err
    assert cell.read_text() == before


def test_runs_that_did_not_end_as_predicted_are_named_in_the_source(tmp_path):
    report = json.loads(_bench(tmp_path / "b.json", [1.0, 9.0], oks=[True, False]).read_text())
    _, how = gpu_cell.median_run(report["cases"][0])
    assert "1 of its 2 runs did not end as predicted and are not counted" in how
