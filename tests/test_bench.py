"""The benchmark runner (repro.bench): selection, statistics, rendering, and one real run of a
tiny load scenario through the harness (fresh processes, warm-up discarded, round-robin)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from repro import bench
from repro.harness.spec import Scenario, fix, load


def _catalogue():
    return {
        "a": Scenario("a", "m:a", [load("x"), fix("y")]),
        "b": Scenario("b", "m:b", [fix("only")]),
    }


def test_select_defaults_to_load_variants(capsys):
    cat = _catalogue()
    assert [(s.name, v.name) for s, v in bench.select(cat, [])] == [("a", "x")]
    assert [(s.name, v.name) for s, v in bench.select(cat, ["b"])] == [("b", "only")]  # no load variant: all
    assert [(s.name, v.name) for s, v in bench.select(cat, ["a:y", "a", "a:y"])] == [("a", "y"), ("a", "x")]
    for name, says in (("nope", "unknown scenario 'nope'"), ("a:nope", "has no variant 'nope'")):
        with pytest.raises(SystemExit) as exc:
            bench.select(cat, [name])
        assert exc.value.code == 2  # a usage error
        assert says in capsys.readouterr().err


def test_variants_that_do_not_apply_are_skipped_with_the_reason():
    """A load variant that needs a GPU is left out on a machine without one, not run to FAIL."""
    cat = {"a": Scenario("a", "m:a", [load("cpu"), load("gpu", requires=lambda b: None if b.cuda else "needs a CUDA device")])}
    cases = bench.select(cat, [])
    kept, skipped = bench.applicable(cases, {"cuda": False})
    assert [v.name for _, v in kept] == ["cpu"]
    assert skipped == [{"scenario": "a", "variant": "gpu", "reason": "needs a CUDA device"}]
    kept, skipped = bench.applicable(cases, {"cuda": True})
    assert [v.name for _, v in kept] == ["cpu", "gpu"] and skipped == []


def test_bench_of_only_inapplicable_variants_runs_nothing(monkeypatch, capsys, tmp_path):
    from repro.harness import fingerprint

    monkeypatch.setattr(fingerprint, "get_fingerprint", lambda *a, **k: {"python": "3.11.7", "build": "bundled", "cuda": False})
    out = tmp_path / "bench.json"
    assert bench.main(["serving_batching:demo_cuda", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "skip serving_batching:demo_cuda: needs a CUDA device" in text
    assert "nothing to run" in text and not out.exists()


def test_summarise_counts_runs_that_ended_as_predicted():
    """A variant predicted to FAIL (a measured miss) still measures: its figures count."""
    runs = [{"outcome": "FAIL", "ok": True, "metrics": {"ratio": v}} for v in (0.9, 1.0, 1.1)]
    (ratio,) = bench.summarise(runs)
    assert (ratio["median"], ratio["n"]) == (1.0, 3)


def test_summarise_medians_and_targets_on_the_median():
    runs = [
        {"outcome": "PASS", "metrics": {"ratio": 1.0, "targets": {"ratio": "<=1.05"}}},
        {"outcome": "PASS", "metrics": {"ratio": 1.1}},
        {"outcome": "PASS", "metrics": {"ratio": 2.0, "rps": 10}},
        {"outcome": "TIMEOUT", "ok": False, "metrics": {"ratio": 0.1}},  # partial figures of a failed run do not count
        {"outcome": "FAIL", "ok": False, "metrics": {"ratio": 0.2}},
    ]
    (ratio, rps) = bench.summarise(runs)
    assert ratio["name"] == "ratio" and (ratio["median"], ratio["min"], ratio["max"], ratio["n"]) == (1.1, 1.0, 2.0, 3)
    assert ratio["target"] == "<=1.05" and ratio["ok"] is False  # one run met it; the median did not
    assert rps["n"] == 1 and rps["target"] is None and rps["ok"] is None


def _report(cases):
    return {
        "date": "2026-01-01T00:00:00+00:00",
        "command": "python -m repro bench",
        "repeat": 3,
        "warmup": 1,
        "machine": {"cpus": 2, "cpu_model": "CPU", "memory_gib": 24.0, "platform": "Linux"},
        "fingerprint": {"python": "3.11.7", "torch": "2.13.0"},
        "cases": cases,
        "suite": {"wall_seconds": 321.0, "exitstatus": 0, "source": "results/cells/py3.11-bundled.json", "date": "d"},
    }


def test_markdown_says_where_a_target_is_missed():
    runs = [
        {"outcome": "PASS", "metrics": {"overhead_ratio": v, "targets": {"overhead_ratio": "<=1.05"}}}
        for v in (1.2, 1.3)
    ]
    case = {
        "scenario": "srv",
        "variant": "one",
        "outcomes": ["PASS"],
        "all_ok": True,
        "figures": bench.summarise(runs),
        "run_seconds": {"median": 2.0},
    }
    report = _report([case])
    report["missed"] = bench.missed_targets(report)
    assert report["missed"] == ["srv:one overhead_ratio = 1.25x (target <=1.05)"]
    md = bench.render_markdown(report)
    assert "| `srv:one` | overhead_ratio | 1.25x | 1.2x – 1.3x | <=1.05 | **MISSED** |" in md
    assert "Wall time of the test suite: 321.0 s on 2 CPUs" in md


def test_rerender_reads_the_suite_time_from_the_cell_again(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    runs = [{"outcome": "PASS", "metrics": {"overhead_ratio": 1.0}, "seconds": 1.0}]
    case = {"scenario": "srv", "variant": "one", "outcomes": ["PASS"], "all_ok": True, "runs": runs, "run_seconds": {"median": 1.0}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_report([case])))
    assert bench.rerender(path, None) == 0  # no cell: the stored figure stays
    assert json.loads(path.read_text())["suite"]["wall_seconds"] == 321.0
    cells = tmp_path / "results" / "cells"
    cells.mkdir(parents=True)
    cell = {"wall_seconds": 560.0, "started": "2026-12-01T02:28:07+00:00", "pytest": {"args": [], "exitstatus": 0, "tests": 9}}
    (cells / "py3.11-bundled.json").write_text(json.dumps(cell))
    md = tmp_path / "BENCH.md"
    assert bench.rerender(path, str(md)) == 0
    assert json.loads(path.read_text())["suite"]["wall_seconds"] == 560.0
    assert "Wall time of `python -m pytest`: 560.0 s" in md.read_text()


SCENARIO = """
import os
from pathlib import Path
from repro.harness.spec import load, scenario

@scenario(name="bench_demo", timeout=60, variants=[load("count")])
def bench_demo(ctx):
    counter = Path(os.environ["BENCH_DEMO_DIR"]) / "runs.txt"
    with open(counter, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    n = len(counter.read_text().split())
    ctx.record(run_index=n, targets={"run_index": "<=3"}, pid=os.getpid())
"""


def test_run_in_fresh_processes_with_warmup(tmp_path, monkeypatch):
    (tmp_path / "bench_demo_mod.py").write_text(textwrap.dedent(SCENARIO))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the children import the scenario module too
    monkeypatch.setenv("BENCH_DEMO_DIR", str(tmp_path))
    from repro.harness import fingerprint

    monkeypatch.setattr(fingerprint, "get_fingerprint", lambda *a, **k: {"python": "3.11.7", "build": "bundled"})
    import bench_demo_mod  # noqa: F401 - registers the scenario

    from repro.harness.spec import REGISTRY

    sc = REGISTRY.pop("bench_demo")  # keep the real catalogue clean
    (rec,) = bench.run([(sc, sc.variants[0])], repeat=3, warmup=1, timeout=60, log=lambda *_: None)
    pids = (tmp_path / "runs.txt").read_text().split()
    assert len(pids) == 4 and len(set(pids)) == 4  # 1 warm-up + 3 runs, each its own interpreter
    assert len(rec["warmups"]) == 1 and len(rec["runs"]) == 3 and rec["all_ok"]
    fig = next(f for f in rec["figures"] if f["name"] == "run_index")
    assert (fig["median"], fig["min"], fig["max"]) == (3, 2, 4)  # the warm-up (index 1) is not measured
    assert fig["ok"] is True and fig["target"] == "<=3"


def test_list_the_real_catalogue(capsys):
    assert bench.main(["--list"]) == 0
    listed = capsys.readouterr().out.split()
    from repro.scenarios import load_catalogue

    loads = [f"{s.name}:{v.name}" for s in load_catalogue().values() for v in s.variants if v.kind == "load"]
    assert listed == loads


def test_suite_from_cell_ignores_partial_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    cells = tmp_path / "results" / "cells"
    cells.mkdir(parents=True)
    data = {"wall_seconds": 500.0, "started": "d", "pytest": {"exitstatus": 0, "args": ["-k", "fork"]}}
    (cells / "py3.11-bundled.json").write_text(json.dumps(data))
    assert bench.suite_from_cell("3.11", "bundled") is None
    data["pytest"]["args"] = []
    (cells / "py3.11-bundled.json").write_text(json.dumps(data))
    got = bench.suite_from_cell("3.11", "bundled")
    assert got["wall_seconds"] == 500.0 and Path(got["source"]) == Path("results/cells/py3.11-bundled.json")
    assert got["command"] == "python -m pytest"  # the cell's pytest runs without xdist: said so, not "-n 2"
    text = bench.render_markdown(
        {"machine": {"cpus": 2}, "fingerprint": {}, "date": "d", "command": "c", "repeat": 1, "warmup": 0,
         "missed": [], "cases": [], "suite": got}
    )
    assert "Wall time of `python -m pytest`: 500.0 s" in text
    data["pytest"].update(exitstatus=2, collected=600, tests={"passed": 40})  # interrupted: not the suite's time
    (cells / "py3.11-bundled.json").write_text(json.dumps(data))
    assert bench.suite_from_cell("3.11", "bundled") is None


@pytest.mark.parametrize(
    "value, target, text",
    [
        (1.0519, "<=1.05", "1.052x"),  # missed: three digits would read 1.05 and seem to meet it
        (1.0499, "<=1.05", "1.05x"),  # met, and reads as met
        (2.4996, ">=2.5", "2.4996x"),
        (2.5, ">=2.5", "2.5x"),
        (1.0519, None, "1.05x"),
        (1234.4, "<1234.5", "1,234x"),
    ],
)
def test_a_figure_reads_as_judged(value, target, text):
    from repro.figures import fmt_value, meets

    assert fmt_value(value, "x", target) == text
    if target:
        assert meets(float(text.rstrip("x").replace(",", "")), target) == meets(value, target)


def _fake_bench(monkeypatch, tmp_path):
    """bench.main without running anything: a fingerprint, no matrix cell, and a run() that
    records that it was called and hands back one passing record."""
    from repro.harness import fingerprint

    monkeypatch.setattr(fingerprint, "get_fingerprint", lambda *a, **k: {"python": "3.11.7", "build": "bundled", "cuda": False})
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    calls = []

    def fake_run(cases, **kw):
        calls.append(cases)
        runs = [{"outcome": "PASS", "ok": True, "seconds": 1.0, "metrics": {"overhead_ratio": 1.0}}]
        return [
            {"scenario": sc.name, "variant": v.name, "kind": v.kind, "warmups": [], "runs": runs, "outcomes": ["PASS"],
             "all_ok": True, "figures": bench.summarise(runs), "run_seconds": {"median": 1.0}}
            for sc, v in cases
        ]  # fmt: skip

    monkeypatch.setattr(bench, "run", fake_run)
    return calls


@pytest.mark.parametrize("option", ["--json", "--markdown"])
def test_output_that_cannot_be_written_is_refused_before_the_runs(option, tmp_path, monkeypatch, capsys):
    """--json or --markdown naming a directory is a usage error found before the benchmark runs,
    not a traceback once an hour of runs is over (with their figures lost)."""
    calls = _fake_bench(monkeypatch, tmp_path)
    (tmp_path / "out").mkdir()
    argv = ["ipc_transports:4k", "--json", str(tmp_path / "b.json"), option, str(tmp_path / "out")]
    try:
        rc = bench.main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and "is a directory" in err, err
    assert calls == [], "the runs went ahead"


def test_a_suite_that_overruns_its_time_limit_keeps_the_benchmark(tmp_path, monkeypatch, capsys):
    """--suite with a suite slower than --suite-timeout: the figures of the runs are still written,
    and the report says the suite did not finish within its limit (no wall time for it). The
    suite's whole process group is killed: a process it started (as xdist starts workers) does
    not outlive the timeout. The suite here is a stand-in that starts a sleeper and sleeps."""
    import psutil

    _fake_bench(monkeypatch, tmp_path)
    pidfile = tmp_path / "grandchild.pid"
    stand_in = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(120)\n"
    )
    real_popen = bench.subprocess.Popen

    def popen(cmd, *args, **kw):  # the suite's command only (platform calls Popen too)
        if list(cmd[1:3]) == ["-m", "pytest"]:
            cmd = [sys.executable, "-c", stand_in]
        return real_popen(cmd, *args, **kw)

    monkeypatch.setattr(bench.subprocess, "Popen", popen)
    out, md = tmp_path / "b.json", tmp_path / "B.md"
    assert bench.main(["ipc_transports:4k", "--suite", "--suite-timeout", "5", "--json", str(out), "--markdown", str(md)]) == 0
    report = json.loads(out.read_text())
    assert [c["variant"] for c in report["cases"]] == ["4k"]
    assert report["suite"]["exitstatus"] is None and report["suite"]["timed_out"] is True
    assert "did not finish within 5 s" in md.read_text()
    from repro.harness.evidence import wait_gone

    grandchild = int(pidfile.read_text())
    wait_gone([grandchild], timeout=20)  # killed, it dies within moments (at first it can still read 'running')
    try:
        status = psutil.Process(grandchild).status()
    except psutil.NoSuchProcess:
        status = None
    assert status in (None, psutil.STATUS_ZOMBIE), f"the suite's child {grandchild} outlived the timeout ({status})"


def test_an_interrupted_benchmark_keeps_what_it_measured(tmp_path, monkeypatch, capsys):
    """Ctrl-C after an hour of runs kept nothing: the JSON was written only at the end. Every run
    now updates <json>.partial, a bench JSON marked partial that --render reads; a finished
    benchmark removes it."""
    from repro.harness import fingerprint, runner

    monkeypatch.setattr(fingerprint, "get_fingerprint", lambda *a, **k: {"python": "3.11.7", "build": "bundled", "cuda": False})
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    calls = []

    class Done:
        outcome, ok, seconds = "PASS", True, 1.0

        def __init__(self, n):
            self.metrics = {"overhead_ratio": 1.0 + n / 100}

    def run_variant(sc, v, **kw):
        calls.append(v.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return Done(len(calls))

    monkeypatch.setattr(runner, "run_variant", run_variant)
    out = tmp_path / "b.json"
    partial = tmp_path / "b.json.partial"
    assert bench.main(["ipc_transports:4k", "--repeat", "2", "--warmup", "1", "--json", str(out)]) == 130
    assert "interrupted: what ran is in" in capsys.readouterr().err
    assert not out.exists() and partial.exists()
    kept = json.loads(partial.read_text())
    assert kept["partial"] == {"runs_done": 2, "runs_total": 3}
    [case] = kept["cases"]
    assert (len(case["warmups"]), len(case["runs"])) == (1, 1) and case["figures"]
    md = tmp_path / "partial.md"
    assert bench.main(["--render", str(partial), "--markdown", str(md)]) == 0
    assert "Interrupted: 2 of 3 runs" in md.read_text()
    # stopped by SIGTERM (the CLI raises repro.cli.Stopped) before its first run ended: 128 + 15,
    # and the earlier partial file is kept under its date, not claimed as this run's
    from repro.cli import Stopped

    def stopped(sc, v, **kw):
        raise Stopped(15)

    monkeypatch.setattr(runner, "run_variant", stopped)
    assert bench.main(["ipc_transports:4k", "--repeat", "2", "--warmup", "1", "--json", str(out)]) == 143
    captured = capsys.readouterr()
    assert "interrupted by SIGTERM" in captured.err and "what ran is in" not in captured.err, captured.err
    (older,) = tmp_path.glob("b.json.partial.*")
    assert json.loads(older.read_text()) == kept and str(older) in captured.out
    assert not partial.exists()
    monkeypatch.setattr(runner, "run_variant", lambda sc, v, **kw: Done(0))
    assert bench.main(["ipc_transports:4k", "--repeat", "2", "--warmup", "1", "--json", str(out)]) == 0
    assert out.exists() and not partial.exists()  # a run to its end leaves no partial file behind


def test_an_interrupted_suite_timing_keeps_every_run_of_the_benchmark(tmp_path, monkeypatch, capsys):
    """--suite times the test suite after the runs (up to --suite-timeout, an hour by default).
    The .partial file was written after every run but the last, so a Ctrl-C while the suite ran
    lost the last run, and with a single run (repeat 1, no warm-up) kept nothing at all."""
    from repro.harness import fingerprint, runner

    monkeypatch.setattr(fingerprint, "get_fingerprint", lambda *a, **k: {"python": "3.11.7", "build": "bundled", "cuda": False})
    monkeypatch.setattr(bench, "ROOT", tmp_path)

    class Done:
        outcome, ok, seconds, metrics = "PASS", True, 1.0, {"overhead_ratio": 1.0}

    def interrupted_suite(timeout):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_variant", lambda sc, v, **kw: Done())
    monkeypatch.setattr(bench, "time_suite", interrupted_suite)
    out = tmp_path / "b.json"
    partial = tmp_path / "b.json.partial"
    assert bench.main(["ipc_transports:4k", "--repeat", "1", "--warmup", "0", "--suite", "--json", str(out)]) == 130
    assert "what ran is in" in capsys.readouterr().err
    assert not out.exists() and partial.exists()
    kept = json.loads(partial.read_text())
    assert kept["partial"] == {"runs_done": 1, "runs_total": 1}
    [case] = kept["cases"]
    assert len(case["runs"]) == 1 and case["figures"]


@pytest.mark.parametrize("content", ["not json at all", '{"results": []}', '{"cases": 3}', "[1, 2]"])
def test_render_of_a_file_that_is_not_a_bench_json_is_a_usage_error(content, tmp_path, capsys):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--render", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    assert "--render:" in err and str(path) in err, err
    assert path.read_text() == content  # left as it was


@pytest.mark.parametrize(
    "name, unit",
    [
        ("results.same_cpu.4096.unix_connection.throughput_MB_per_s", "MB/s"),
        ("throughput_msgs_per_s", "/s"),
        ("throughput_rps", "req/s"),
        ("incremental_peak_rss_mb", "MB"),
    ],
)
def test_a_figures_unit_is_what_its_name_says(name, unit):
    from repro.figures import unit_from_name

    assert unit_from_name(name) == unit


def _bench_file(path, ratios, *, warmups=(), partial=None, fingerprint=None, date="2026-01-01T00:00:00+00:00"):
    runs = [{"outcome": "PASS", "ok": True, "seconds": 1.0, "metrics": {"overhead_ratio": v, "targets": {"overhead_ratio": "<=1.05"}}} for v in ratios]
    warm = [{"outcome": "PASS", "ok": True, "seconds": 1.0, "metrics": {"overhead_ratio": v}} for v in warmups]
    case = {"scenario": "srv", "variant": "one", "kind": "load", "runs": runs, "warmups": warm}
    rep = _report(bench.summarise_records([case]))
    rep["date"] = date
    if fingerprint:
        rep["fingerprint"] = {**rep["fingerprint"], **fingerprint}
    if partial:
        rep["partial"] = partial
    path.write_text(json.dumps(rep))
    return path


def test_combine_puts_a_cut_short_benchmark_and_its_rest_together(tmp_path, capsys):
    """A benchmark stopped at its limit (the .partial file, 2 runs) and a second one that measured
    the third: one report whose figures are the median over all three runs, warm-ups kept apart,
    each source named with its command and how far it got."""
    a = _bench_file(tmp_path / "a.json.partial", [1.2, 1.0], warmups=[5.0], partial={"runs_done": 3, "runs_total": 4})
    b = _bench_file(tmp_path / "b.json", [1.1], date="2026-01-02T00:00:00+00:00")
    out, md = tmp_path / "c.json", tmp_path / "c.md"
    assert bench.main(["--combine", str(a), str(b), "--json", str(out), "--markdown", str(md)]) == 0
    rep = json.loads(out.read_text())
    (case,) = rep["cases"]
    assert [r["metrics"]["overhead_ratio"] for r in case["runs"]] == [1.2, 1.0, 1.1]
    assert len(case["warmups"]) == 1
    (fig,) = [f for f in case["figures"] if f["name"] == "overhead_ratio"]
    assert (fig["median"], fig["min"], fig["max"], fig["n"]) == (1.1, 1.0, 1.2, 3)
    assert rep["date"] == "2026-01-02T00:00:00+00:00" and "partial" not in rep
    assert [s["path"] for s in rep["sources"]] == [str(a), str(b)]
    text = md.read_text()
    assert "Combined from 2 benchmark runs" in text
    assert "interrupted after 3 of 4 runs" in text
    assert "`srv:one` 3 measured, 1 warm-up" in text
    assert "| `srv:one` | overhead_ratio | 1.1x | 1x – 1.2x | <=1.05 | **MISSED** |" in text
    # what it wrote renders again the same way
    assert bench.main(["--render", str(out)]) == 0 and "Combined from 2 benchmark runs" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, says",
    [
        (["--combine", "A"], "needs two or more"),
        (["--combine", "A", "B"], "needs --json"),
        (["--combine", "A", "OTHER", "--json", "OUT"], "another build than"),
        (["--combine", "A", "B", "--render", "A", "--json", "OUT"], "no NAME and no --render"),
        (["--combine", "A", "MISSING", "--json", "OUT"], "MISSING"),
        (["--combine", "A", "A", "--json", "OUT"], "the same benchmark twice"),
        (["--combine", "A", "EARLIER", "--json", "OUT"], "the same benchmark twice, or two checkpoints of one"),
        (["--combine", "A", "COMBINED", "B", "--json", "OUT"], "already a combined report"),
        (["--combine", "A", "OTHERCODE", "--json", "OUT"], "ran other code than"),
        (["--combine", "A", "B", "--json", "OUT", "--repeat", "5"], "--combine runs nothing: --repeat"),
    ],
)
def test_combine_refuses_what_it_cannot_put_together(args, says, tmp_path, capsys):
    files = {
        "A": _bench_file(tmp_path / "a.json", [1.0]),
        "B": _bench_file(tmp_path / "b.json", [1.1]),
        "OTHER": _bench_file(tmp_path / "o.json", [1.1], fingerprint={"torch": "2.11.0"}),
        "MISSING": tmp_path / "missing.json",
        "OUT": tmp_path / "out.json",
    }
    # an earlier checkpoint of A's benchmark: its first run, written before A
    earlier = json.loads(files["A"].read_text())
    earlier["date"] = "2025-12-31T00:00:00+00:00"
    files["EARLIER"] = tmp_path / "earlier.json"
    files["EARLIER"].write_text(json.dumps(earlier))
    combined = json.loads(files["B"].read_text())
    combined["sources"] = [{"path": "x.json"}, {"path": "y.json"}]
    files["COMBINED"] = tmp_path / "combined.json"
    files["COMBINED"].write_text(json.dumps(combined))
    for name, commit in (("A", "a" * 40), ("OTHERCODE", "b" * 40)):
        rep = json.loads((files["A"] if name == "A" else files["B"]).read_text())
        rep["source"] = {"commit": commit, "dirty": False}
        files[name] = tmp_path / f"{name.lower()}-code.json"
        files[name].write_text(json.dumps(rep))
    argv = [str(files[a]) if a in files else a for a in args]
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    assert says.replace("MISSING", str(files["MISSING"])) in err, err
    assert not files["OUT"].exists()


def test_combine_exits_1_when_a_run_did_not_pass(tmp_path, capsys):
    a = _bench_file(tmp_path / "a.json", [1.0])
    b = tmp_path / "b.json"
    rep = json.loads(_bench_file(b, [1.1], date="2026-01-02T00:00:00+00:00").read_text())
    rep["cases"][0]["runs"][0].update(outcome="TIMEOUT", ok=False)
    b.write_text(json.dumps(rep))
    assert bench.main(["--combine", str(a), str(b), "--json", str(tmp_path / "c.json")]) == 1
    assert "did not pass every repetition" in capsys.readouterr().out


def test_rerender_keeps_the_suite_and_cell_figures_of_another_machine(tmp_path, monkeypatch):
    """A report from another machine (the GPU host's, 16 CPUs) rendered again here keeps what it
    had: this machine's matrix cell (2 CPUs) says nothing about it."""
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    cells = tmp_path / "results" / "cells"
    cells.mkdir(parents=True)
    cell = {"wall_seconds": 560.0, "started": "s", "machine": {"cpus": 2, "cpu_model": "CPU"},
            "pytest": {"args": [], "exitstatus": 0, "tests": {"passed": 9}}, "results": []}  # fmt: skip
    (cells / "py3.11-bundled.json").write_text(json.dumps(cell))
    path = _bench_file(tmp_path / "gpu.json", [1.0])
    rep = json.loads(path.read_text())
    rep.update(suite=None, cell_figures=None, machine={**rep["machine"], "cpus": 16, "cpu_model": "Xeon"})
    path.write_text(json.dumps(rep))
    assert bench.rerender(path, None) == 0
    again = json.loads(path.read_text())
    assert again["suite"] is None and again["cell_figures"] is None
    rep["machine"] = {**rep["machine"], "cpus": 2, "cpu_model": "CPU"}  # the same kind of machine: read from the cell
    path.write_text(json.dumps(rep))
    assert bench.rerender(path, None) == 0
    assert json.loads(path.read_text())["suite"]["wall_seconds"] == 560.0
