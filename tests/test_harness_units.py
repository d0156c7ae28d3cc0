"""Units of the harness that need no child process: syscall classification, /proc parsing,
expectations, fingerprint parsing, signatures, the report."""

from __future__ import annotations

import json
import os
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from repro.harness import evidence as ev
from repro.harness import predict
from repro.harness.fingerprint import parse_parallel_info
from repro.harness.report import render
from repro.harness.runner import Result
from repro.harness.spec import Build, Outcome, hazard
from repro.harness.verdict import classify_syscall, parse_stat

PID = os.getpid()


@pytest.mark.parametrize(
    "name,args,wait",
    [
        ("futex", [0, 0x80, 1, 0, 0, 0], "untimed"),  # FUTEX_WAIT_PRIVATE, NULL timeout
        ("futex", [0, 0x89, 1, 0, 0, 0xFFFFFFFF], "untimed"),  # WAIT_BITSET_PRIVATE, NULL timeout
        ("futex", [0, 0x86, 0, 0, 0, 0], "untimed"),  # LOCK_PI_PRIVATE
        ("futex", [0, 0x81, 1, 0, 0, 0], "other"),  # WAKE is not a wait
        ("poll", [0, 1, 0xFFFFFFFF, 0, 0, 0], "untimed"),  # timeout -1
        ("poll", [0, 1, 250, 0, 0, 0], "timed"),
        ("epoll_wait", [3, 0, 8, 0xFFFFFFFF, 0, 0], "untimed"),
        ("epoll_wait", [3, 0, 8, 10, 0, 0], "timed"),
        ("ppoll", [0, 1, 0, 0, 0, 0], "untimed"),
        ("pselect6", [1, 0, 0, 0, 0, 0], "untimed"),
        ("select", [1, 0, 0, 0, 0, 0], "untimed"),
        ("select", [0, 0, 0, 0, 0, 0], "untimed"),  # no descriptors, no timeout: waits for a signal
        ("poll", [0, 0, 250, 0, 0, 0], "sleep"),  # no descriptors: a sleep
        ("read", [0, 0, 1, 0, 0, 0], "untimed"),
        ("wait4", [-1 & 0xFFFFFFFF, 0, 0, 0, 0, 0], "untimed"),
        ("accept4", [3, 0, 0, 0, 0, 0], "untimed"),
        ("rt_sigsuspend", [0, 8, 0, 0, 0, 0], "untimed"),
        ("getpid", [0] * 6, "other"),
    ],
)
def test_classify_syscall(name, args, wait):
    assert classify_syscall(PID, name, args).wait == wait


def test_timespec_pointers_are_read_from_memory():
    import ctypes

    class Timespec(ctypes.Structure):
        _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]

    ts = Timespec(2, 500_000_000)
    addr = ctypes.addressof(ts)
    c = classify_syscall(PID, "futex", [0, 0x80, 1, addr, 0, 0])
    assert c.wait == "timed" and c.relative == pytest.approx(2.5)
    c = classify_syscall(PID, "clock_nanosleep", [1, 0, addr, 0, 0, 0])
    assert c.wait == "sleep" and c.relative == pytest.approx(2.5)
    # CPython 3.10's time.sleep: select/pselect6 of no descriptors is a sleep; with some it is a timed wait
    for name in ("pselect6", "ppoll"):
        c = classify_syscall(PID, name, [0, 0, addr, 0, addr, 0])
        assert c.wait == "sleep" and c.relative == pytest.approx(2.5), name
        c = classify_syscall(PID, name, [4, 1, addr, 0, addr, 0])
        assert c.wait == "timed" and c.relative == pytest.approx(2.5), name


def test_timeval_pointer_of_select():
    import ctypes

    class Timeval(ctypes.Structure):
        _fields_ = [("sec", ctypes.c_long), ("usec", ctypes.c_long)]

    tv = Timeval(1000, 0)
    addr = ctypes.addressof(tv)
    assert classify_syscall(PID, "select", [0, 0, 0, 0, addr, 0]).wait == "sleep"
    c = classify_syscall(PID, "select", [5, 0, 0, 0, addr, 0])
    assert c.wait == "timed" and c.relative == pytest.approx(1000)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0\n"), max_size=15))
def test_parse_stat_survives_any_comm(comm):
    fields = ["S", "1", "2", "3"] + ["0"] * 7 + ["11", "4"] + ["0"] * 6 + ["999"] + ["0"] * 20
    line = f"123 ({comm}) " + " ".join(fields)
    name, state, ticks, extra = parse_stat(line)
    assert (name, state, ticks) == (comm, "S", 15)
    assert extra == {"ppid": 1, "pgrp": 2, "session": 3, "starttime": 999}


FP = {"system": "Linux", "torch_parallel_backend": "OpenMP", "openmp_runtimes": ["libgomp"], "torch_num_threads": 2, "cpu_count": 2}


@pytest.mark.parametrize(
    "fp,env,outcome",
    [
        (FP, {}, Outcome.HANG),
        (FP, {"OMP_NUM_THREADS": "1"}, Outcome.PASS),
        ({**FP, "torch_num_threads": 1}, {}, Outcome.PASS),
        ({**FP, "openmp_runtimes": ["libiomp"]}, {}, Outcome.PASS),
        ({**FP, "torch_parallel_backend": "native thread pool"}, {}, Outcome.PASS),
        ({**FP, "system": "Darwin"}, {}, Outcome.PASS),
    ],
)
def test_gomp_fork_hang_prediction(fp, env, outcome):
    got, reason = predict.gomp_fork_hang(Build(fp, env))
    assert got is outcome and reason


def test_expectation_with_reason_is_unpacked():
    v = hazard("x", expect=predict.gomp_fork_hang)
    outcomes, reason = v.expected(Build(FP))
    assert outcomes == {Outcome.HANG} and "libgomp" in reason
    assert hazard("y", expect=("HANG", "PASS")).expected(Build(FP))[0] == {Outcome.HANG, Outcome.PASS}


def test_parse_parallel_info():
    text = """ATen/Parallel:
\tat::get_num_threads() : 2
\tat::get_num_interop_threads() : 2
OpenMP 201511 (a.k.a. OpenMP 4.5)
\tomp_get_max_threads() : 2
Intel(R) oneAPI Math Kernel Library Version 2024.2
\tmkl_get_max_threads() : 2
std::thread::hardware_concurrency() : 2
Environment variables:
\tOMP_NUM_THREADS : [not set]
\tMKL_NUM_THREADS : [not set]
ATen parallel backend: OpenMP
"""
    assert parse_parallel_info(text) == {"backend": "OpenMP", "num_threads": 2, "interop_threads": 2}


def test_signatures():
    text = "[mutex.cc : 452] RAW: Lock blocking 0x1\nOMP: Error #15: Initializing libiomp5.so\nERROR: DataLoader worker (pid 12) is killed"
    assert {"abseil-mutex-raw-lock-blocking", "omp-error-15-duplicate-runtime", "dataloader-worker-died"} <= set(ev.match_signatures(text))
    assert ev.match_signatures("all fine") == []


@pytest.mark.parametrize("chunk", [7, 64, 100, 4096, 1 << 20])
@pytest.mark.parametrize("line_end", ["\n", ""])
def test_scan_signatures_reads_the_whole_file_in_chunks(tmp_path, chunk, line_end):
    """Found wherever they are: across chunk cuts, in a line longer than a chunk (no newline
    before it), with multi-byte text around; a file of nothing known matches nothing."""
    noise = "".join(f"bruit n° {i} ⟂ unrelated\n" for i in range(300))
    text = noise + "x" * 5000 + line_end + "[mutex.cc : 452] RAW: Lock blocking 0x1\n" + noise
    text += "OMP: Error #15: Initializing libiomp5.so" + ("y" * 3000 if not line_end else "\n") + noise
    path = tmp_path / "stderr.txt"
    path.write_text(text)
    found, unread = ev.scan_signatures(path, chunk=chunk)
    assert found == ["abseil-mutex-raw-lock-blocking", "omp-error-15-duplicate-runtime"] and unread == 0
    (tmp_path / "plain.txt").write_text(noise)
    assert ev.scan_signatures(tmp_path / "plain.txt", chunk=chunk) == ([], 0)
    assert ev.scan_signatures(tmp_path / "missing.txt") == ([], 0)


def test_scan_signatures_of_a_huge_file_reads_its_head_and_tail(tmp_path):
    path = tmp_path / "stderr.txt"
    filler = "z" * 99 + "\n"
    path.write_text("Fatal Python error: one\n" + filler * 50 + "libgomp: in the middle\n" + filler * 50 + "Bus error\n")
    size = path.stat().st_size
    found, unread = ev.scan_signatures(path, limit=2000, chunk=256)
    assert found == ["python-fatal-error", "bus-error"]  # the middle, beyond the limit, is not read
    assert unread == size - 2000
    assert "libgomp-error" in ev.scan_signatures(path, limit=size, chunk=256)[0]


def test_top_frame_of_py_spy_dump():
    dump = 'Thread 7 (idle): "MainThread"\n    0x7f (libgomp.so.1)\n    _wait_child (repro/scenarios/fork_threads.py:62)\n    <module> (x.py:1)\n'
    assert ev.top_frame(dump) == "_wait_child (repro/scenarios/fork_threads.py:62)"


def test_report_lists_every_result_and_details_unexpected_ones():
    good = Result("s", "v", "fix", "PASS", ["PASS"], ok=True, seconds=1.0, metrics={"x": 1.5})
    bad = Result("s", "h", "hazard", "TIMEOUT", ["HANG"], ok=False, seconds=9.0, evidence={"stderr_tail": "boom"})
    skipped = Result("s", "k", "hazard", "SKIP", ["SKIP"], expected_reason="needs CUDA", ok=True)
    text = render([good, bad, skipped])
    assert "1/2 as expected" in text and "1 skipped on this build" in text
    assert "- `s:k` (hazard): needs CUDA" in text and "| s | k |" not in text
    assert "Hazards reproduced" not in text
    assert "| s | v | fix | PASS | **PASS** | ✅ | 1.00 | x=1.5 |" in text
    assert "<details><summary><b>s:h</b>: TIMEOUT (expected HANG)" in text


def _snap(t, threads):
    from repro.harness.verdict import Snapshot, ThreadState

    snap = Snapshot(t)
    for tid, (wait, ticks) in enumerate(threads):
        snap.threads[(1, tid)] = ThreadState(1, tid, "x", "S", ticks, "futex", wait, raw=f"202 {tid}")
    return snap


def test_detector_needs_a_full_quiet_window_without_progress():
    from repro.harness.verdict import HangDetector

    d = HangDetector(window=1.0)
    d._update(_snap(0.0, [("untimed", 5), ("untimed", 1)]))
    d._update(_snap(0.5, [("untimed", 5), ("untimed", 1)]))
    assert not d.hung()
    d._update(_snap(0.9, [("untimed", 6), ("untimed", 1)]))  # a CPU tick: the window restarts
    d._update(_snap(1.5, [("untimed", 6), ("untimed", 1)]))
    assert not d.hung()
    d._update(_snap(2.0, [("untimed", 6), ("untimed", 1), ("zombie", 0)]))  # zombies do not count
    assert d.hung() and d.quiet_since == 0.9


@pytest.mark.parametrize("other", ["timed", "sleep", "busy", "other", "unknown"])
def test_detector_never_hangs_while_one_thread_is_not_blocked(other):
    from repro.harness.verdict import HangDetector

    d = HangDetector(window=1.0)
    for t in range(10):
        d._update(_snap(t * 0.5, [("untimed", 1), (other, 1)]))
    assert not d.hung()


def test_fingerprint_cache_key_follows_packages_installed_beside_torch(tmp_path, monkeypatch):
    """A package installed into the venv later (pip's mkl into a bundled venv) makes a new build:
    the cached fingerprint must not be reused for it."""
    from repro.harness import fingerprint

    site = tmp_path / "site-packages"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("")
    (site / "torch" / "version.py").write_text("__version__ = '0'")
    monkeypatch.setattr(fingerprint, "_torch_origin", lambda python: str(site / "torch" / "__init__.py"))
    before = fingerprint.cache_key(sys.executable)
    assert fingerprint.cache_key(sys.executable) == before  # stable while nothing changes
    (site / "mkl-2025.0.dist-info").mkdir()
    os.utime(site, ns=(0, os.stat(site).st_mtime_ns + 1_000_000))  # coarse-clock filesystems: a new mtime
    assert fingerprint.cache_key(sys.executable) != before


def test_load_variants_run_alone(monkeypatch):
    """A load variant's figures are measured: it takes the exclusive run lock even in a scenario
    that is not ``serial`` (serving_split's gpt2_small once ran beside other tests under -n 2)."""
    from repro.harness import runner
    from repro.scenarios import load_catalogue

    cat = load_catalogue()
    seen = {}
    monkeypatch.setattr(runner, "_run", lambda argv, **kw: seen.setdefault(kw["variant"], kw["serial"]))
    split = cat["serving_split"]
    assert not split.serial
    build = Build({})
    for v in split.variants:
        runner.run_variant(split, v, build=build)
    assert seen == {"tiny": False, "gpt2_small": True}
    loads = [(s, v) for s in cat.values() for v in s.variants if v.kind == "load"]
    assert loads and all(s.serial_for(v) for s, v in loads)


def test_quick_runs_take_the_variants_quick_params(monkeypatch):
    """run_variant(quick=True) hands the child the variant's quick overrides (and says so in the
    record); a full run, and a variant without overrides, get ``params`` as they are."""
    from repro.harness import runner
    from repro.harness.spec import Scenario, Variant, load

    seen = {}

    def fake_run(argv, **kw):
        seen[kw["variant"]] = (json.loads(next(a for a in argv if a.startswith("--params="))[9:]), kw["params"])

    monkeypatch.setattr(runner, "_run", fake_run)
    sc = Scenario(
        "q", "x:y", [load("a", params={"rounds": 5, "size": 4}, quick={"rounds": 1}), load("b", params={"rounds": 5})]
    )
    build = Build({})
    runner.run_variant(sc, "a", build=build, quick=True)
    runner.run_variant(sc, "b", build=build, quick=True)
    assert seen["a"][0] == seen["a"][1] == {"rounds": 1, "size": 4, "quick": True}
    assert seen["b"][0] == seen["b"][1] == {"rounds": 5}
    runner.run_variant(sc, "a", build=build)
    assert seen["a"][0] == seen["a"][1] == {"rounds": 5, "size": 4}
    with pytest.raises(ValueError, match="does not have"):
        Variant("c", params={"rounds": 5}, quick={"round": 1})  # a misspelt override is an error


@pytest.mark.parametrize("flag", [[], ["--quick"]])
def test_cli_run_quick(monkeypatch, tmp_path, flag):
    """`repro run --quick` runs load variants with their quick parameters and its JSON says so."""
    from repro import cli
    from repro.harness import runner

    monkeypatch.setattr(cli, "_fingerprint", lambda *a, **k: {})

    def fake_run(argv, **kw):
        return Result(kw["scenario"], kw["variant"], kw["kind"], "PASS", ["PASS"], ok=True, params=kw["params"])

    monkeypatch.setattr(runner, "_run", fake_run)
    out = tmp_path / "r.json"
    assert cli.main(["run", "ipc_transports:4k", "--json", str(out), *flag]) == 0
    (rec,) = json.loads(out.read_text())["results"]
    assert rec["params"]["rounds"] == (500 if flag else 2000) and rec["params"].get("quick", False) is bool(flag)


def test_run_selects_each_variant_once():
    from repro.cli import _select
    from repro.scenarios import load_catalogue

    cat = load_catalogue()
    every = [(s.name, v.name) for s in cat.values() for v in s.variants]
    ids = lambda chosen: [(s.name, v.name) for s, v in chosen]  # noqa: E731
    assert ids(_select(cat, ["serving_split:tiny"], True, None)) == every
    twice = _select(cat, ["serving_split:tiny", "serving_split", "serving_split:tiny"], False, None)
    assert ids(twice) == [("serving_split", "tiny"), ("serving_split", "gpt2_small")]


def test_a_forked_copy_of_the_context_never_writes_the_result(tmp_path):
    """record/stage/observe/_finish in a process forked from the context's owner change only the
    fork's copy: the result file keeps the owner's state. (Run in a fresh interpreter: this test
    process may have threads, and is not to be forked.)"""
    import json
    import subprocess

    result = tmp_path / "result.json"
    code = f"""
import os
from repro.harness.context import Context
ctx = Context(scenario="s", variant="v", kind="fix", params={{}}, workdir=".", result_path={str(result)!r}, timeout=5)
ctx.record(owner=1)
pid = os.fork()
if pid == 0:
    ctx.record(forked=1)
    ctx.stage("in-the-fork")
    ctx.observe("from the fork")
    ctx._finish("pass")
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "from the fork" in proc.stderr  # observe still echoes
    data = json.loads(result.read_text())
    assert data["status"] == "running" and data["metrics"] == {"owner": 1}
    assert data["stages"] == [] and data["observations"] == []
    assert not list(tmp_path.glob(".result.json.*.tmp"))


def _zombie_child(code: int):
    """A child of this process that has exited with ``code`` and is not yet reaped."""
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", f"import sys; sys.exit({code})"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # until it has exited; leaves the zombie
    return child


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (start times)")
def test_reap_leaves_a_reused_pid_to_its_owner():
    """A pid seen in a run, now a zombie child of ours started after (a reused pid): reap()
    must not take its exit status from the Popen that owns it."""
    child = _zombie_child(7)
    try:
        start = ev._start_time(child.pid)
        tree = ev.Tree(-1, "no-such-token", root_start=start - 1 if start else 0)
        tree.session = -1  # not a member of the run's session
        tree.seen[child.pid] = "python"
        tree._tracked[child.pid] = start - 1  # an earlier process that had this pid
        assert tree.reap() == []
        assert child.wait(10) == 7
    finally:
        child.poll()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (start times)")
def test_reap_takes_a_zombie_of_the_run():
    child = _zombie_child(3)
    try:
        start = ev._start_time(child.pid)
        tree = ev.Tree(-1, "no-such-token", root_start=start)
        tree.session = -1
        tree.seen[child.pid] = "python"
        tree._tracked[child.pid] = start
        assert tree.reap() == [child.pid]
    finally:
        child.returncode = 0  # reaped above: keep Popen from waiting on a pid no longer ours


@pytest.mark.parametrize(
    "kind, opted_in, raised, status",
    [
        ("hazard", True, "symptom", "fail"),
        ("hazard", True, "check", "error"),  # a leak, a setup step...: not the hazard reproduced
        ("hazard", True, "assert", "error"),
        ("hazard", False, "check", "fail"),  # not opted in: every failed check is a FAIL
        ("fix", True, "check", "fail"),  # fix variants keep FAIL for any failed check
        ("hazard", True, "other", "error"),
    ],
)
def test_only_symptoms_fail_in_hazard_variants(tmp_path, kind, opted_in, raised, status):
    import json

    from repro.harness import child
    from repro.harness.context import Context

    ctx = Context(
        scenario="s", variant="v", kind=kind, params={}, workdir=tmp_path, result_path=tmp_path / "r.json", timeout=60
    )
    if opted_in:
        ctx.only_symptoms_fail()
    try:
        if raised == "symptom":
            ctx.symptom("DataLoader timed out: workers in untimed futex waits")
        elif raised == "check":
            ctx.check(False, "workers ran with [1] threads, expected 2")
        elif raised == "assert":
            raise AssertionError("a bare assert")
        else:
            raise RuntimeError("boom")
    except BaseException as exc:  # noqa: BLE001 - the harness's own path for what ended the code
        assert child._report(ctx, exc) == 1
    state = json.loads((tmp_path / "r.json").read_text())
    assert state["status"] == status
    if kind == "hazard" and opted_in and raised in ("check", "assert"):
        assert state["error"]["message"].startswith("a check other than the hazard's symptom failed")


_BUILDS = [
    {**FP, "python": "3.11.7", "torch": "2.13.0"},
    {**FP, "python": "3.11.7", "torch": "2.13.0", "mkl_pip": True, "cuda_available": True},
    {**FP, "python": "3.13.0", "torch": "2.13.0", "openmp_runtimes": ["libiomp"], "torch_num_threads": 8},
]


def test_hazards_predicted_to_fail_only_fail_on_their_symptom():
    """A hazard variant predicted FAIL (on some build) must not reproduce through an unrelated
    failed check: its scenario opts into ctx.only_symptoms_fail() and reports the symptom with
    ctx.symptom(). (Breaking a check other than the symptom gave a FAIL, i.e. "reproduced", in
    manager_cancel:seed_timeout, manager_duplicate:check_then_act, serving_auth:silent_flood_no_grace
    and torch_load_malicious:weights_only_false before they did.)"""
    import importlib
    import inspect

    from repro.scenarios import load_catalogue

    missing = []
    for sc in load_catalogue().values():
        fail_hazards = [
            v.name
            for v in sc.variants
            if v.kind == "hazard" and any(Outcome.FAIL in v.expected(Build(fp, v.env))[0] for fp in _BUILDS)
        ]
        if not fail_hazards:
            continue
        module = importlib.import_module(sc.func.partition(":")[0])
        source = inspect.getsource(module)
        if "ctx.only_symptoms_fail()" not in source or "ctx.symptom(" not in source:
            missing.append(f"{sc.name} ({', '.join(fail_hazards)})")
    assert not missing, f"hazards predicted FAIL without ctx.only_symptoms_fail()/ctx.symptom(): {missing}"


_PY_SPY_NATIVE = """Thread 17155 (idle): "MainThread"
    read (libc.so.6)
    os_read (libpython3.11.so.1.0)
    Connection._recv (multiprocessing/connection.py:395)
    Queue.get (multiprocessing/queues.py:103)
    serving_faults (repro/scenarios/serving_faults.py:99)
Thread 17159 (idle): "QueueFeederThread"
    Condition.wait (threading.py:327)
    Queue._feed (multiprocessing/queues.py:231)
"""
_FAULTHANDLER = """Thread 0x00007f9a5664b740 (most recent call first):
  File "/root/.pyenv/versions/3.11.7/lib/python3.11/multiprocessing/connection.py", line 395 in _recv
  File "/root/.pyenv/versions/3.11.7/lib/python3.11/multiprocessing/queues.py", line 103 in get
  File "/work/main/repro/scenarios/serving_faults.py", line 99 in serving_faults
"""
_ELSEWHERE = """Thread 17155 (idle): "MainThread"
    Condition.wait (threading.py:327)
    Event.wait (threading.py:629)
    serving_faults (repro/scenarios/serving_faults.py:99)
"""


@pytest.mark.parametrize(
    "stacks, patterns, outcome, missing",
    [
        ({"1": {"method": "py-spy --native", "text": _PY_SPY_NATIVE}}, ("Q", "native:libc"), "HANG", []),
        ({"1": {"method": "faulthandler", "text": _FAULTHANDLER}}, ("Q",), "HANG", []),
        ({"1": {"method": "py-spy --native", "text": _ELSEWHERE}}, ("Q",), "ERROR", ["Q"]),
        ({"1": {"method": "faulthandler", "text": _ELSEWHERE}}, ("Q", "native:libgomp"), "ERROR", ["Q"]),
        # native frames not taken: a native pattern is not sought, and does not turn a HANG into an ERROR
        ({"1": {"method": "faulthandler", "text": _FAULTHANDLER}}, ("Q", "native:libgomp"), "HANG", []),
        ({"1": {"method": "py-spy --native", "text": _PY_SPY_NATIVE}}, ("Q", "native:libgomp"), "ERROR", ["native:libgomp"]),
        ({"1": {"method": "none", "text": ""}}, ("Q",), "HANG", None),  # no stacks: not checked
        # per process: the parent's native stack lacks libgomp, the child's has no native frames
        # (py-spy --native failed there): the child may hold it, so not confirmed, not missing
        (
            {"1": {"method": "py-spy --native", "text": _ELSEWHERE}, "2": {"method": "faulthandler", "text": _FAULTHANDLER}},
            ("Q", "native:libgomp"),
            "HANG",
            [],
        ),
        # a process without any stack may hold a Python pattern too
        ({"1": {"method": "py-spy --native", "text": _ELSEWHERE}, "2": {"method": "none", "text": ""}}, ("Q",), "HANG", []),
        # every process searched with native frames, none shows it: missing
        (
            {"1": {"method": "py-spy --native", "text": _ELSEWHERE}, "2": {"method": "py-spy --native", "text": _PY_SPY_NATIVE}},
            ("Q", "native:libgomp"),
            "ERROR",
            ["native:libgomp"],
        ),
    ],
    ids=[
        "py-spy",
        "faulthandler",
        "elsewhere",
        "elsewhere-faulthandler",
        "no-native-frames",
        "native-missing",
        "no-stacks",
        "child-without-native-frames",
        "process-without-stack",
        "every-process-searched",
    ],
)
def test_a_hang_counts_only_where_the_hazard_hangs(stacks, patterns, outcome, missing):
    import re

    from repro.harness import runner
    from repro.harness.spec import frame, pattern_label

    q = frame("multiprocessing/queues.py", "get")
    patterns = tuple(q if p == "Q" else p for p in patterns)
    missing = None if missing is None else [q.label if p == "Q" else p for p in missing]
    result = Result("s", "h", "hazard", "HANG", ["HANG"], evidence={"stacks": stacks, "top_frame": "x (y.py:1)"})
    notes: list[str] = []
    runner._check_hang_where(result, patterns, notes)
    assert result.outcome == outcome
    where = result.evidence["hang_where"]
    if missing is None:
        assert where["checked"] is False and "not checked" in notes[0]
        assert where["unchecked"] == [pattern_label(p) for p in patterns]
    else:
        assert where["checked"] is True and where["missing"] == missing
        # what was neither found nor missing is reported as not confirmed
        found = [p for p in patterns if re.search(p.removeprefix("native:"), "\n".join(e["text"] for e in stacks.values()), re.M)]
        assert sorted(where["unchecked"]) == sorted(
            pattern_label(p) for p in patterns if p not in found and pattern_label(p) not in missing
        )
        if where["unchecked"] and outcome == "HANG":
            assert "not confirmed" in notes[-1]
    if outcome == "ERROR":
        assert result.error["type"] == "HangElsewhere" and "not where the hazard hangs" in result.error["message"]
        assert ", ".join(missing) in result.error["message"].replace("; ", ", ")


_GOMP_ELSEWHERE = """Thread 17160 (idle): "MainThread"
    do_futex_wait (libgomp.so.1)
    gomp_team_barrier_wait_end (libgomp.so.1)
    forward (torch/nn/modules/linear.py:125)
"""


@pytest.mark.parametrize(
    "stacks, native, outcome, grouped_missing",
    [
        # the queue wait and libc's read in one process: found either way
        ({"1": {"method": "py-spy --native", "text": _PY_SPY_NATIVE}}, "native:libc", "HANG", False),
        # the queue wait in one process, libgomp in another: the separate patterns are both
        # found somewhere, the group is in no one process
        (
            {"1": {"method": "py-spy --native", "text": _PY_SPY_NATIVE}, "2": {"method": "py-spy --native", "text": _GOMP_ELSEWHERE}},
            "native:libgomp",
            "ERROR",
            True,
        ),
        # the process with the queue wait has no native frames: it may be in libgomp too
        (
            {"1": {"method": "faulthandler", "text": _FAULTHANDLER}, "2": {"method": "py-spy --native", "text": _GOMP_ELSEWHERE}},
            "native:libgomp",
            "HANG",
            False,
        ),
    ],
    ids=["one-process", "split-across-processes", "group-unconfirmed"],
)
def test_together_patterns_must_match_in_one_process(stacks, native, outcome, grouped_missing):
    from repro.harness import runner
    from repro.harness.spec import frame, together

    q = frame("multiprocessing/queues.py", "get")
    group = together(q, native)
    assert group.label == f"{q.label} and {native} (in one process)"
    separate = Result("s", "h", "hazard", "HANG", ["HANG"], evidence={"stacks": stacks})
    runner._check_hang_where(separate, (q, native), [])
    assert separate.outcome == "HANG"  # each pattern alone is found somewhere (or may be)
    result = Result("s", "h", "hazard", "HANG", ["HANG"], evidence={"stacks": stacks, "top_frame": "x (y.py:1)"})
    notes: list[str] = []
    runner._check_hang_where(result, (group,), notes)
    assert result.outcome == outcome
    where = result.evidence["hang_where"]
    assert where["missing"] == ([group.label] if grouped_missing else [])
    if outcome == "HANG" and len(stacks) > 1:
        assert where["unchecked"] == [group.label] and "not confirmed" in notes[-1]
    if outcome == "ERROR":
        assert result.error["type"] == "HangElsewhere" and "(in one process)" in result.error["message"]


def test_together_is_validated():
    from repro.harness.spec import together

    with pytest.raises(ValueError, match="two patterns or more"):
        together("native:libgomp")
    with pytest.raises(ValueError, match="not a regular expression"):
        hazard("h", expect="HANG", hang_where=(together("ok", "("),))
    with pytest.raises(TypeError, match="patterns or together"):
        hazard("h", expect="HANG", hang_where=(together("a", together("b", "c")),))


def test_frame_pattern_names_one_function_in_one_file():
    import re

    from repro.harness.spec import frame

    q = frame("multiprocessing/queues.py", "get")
    assert re.search(q, "    Queue.get (multiprocessing/queues.py:103)", re.M)
    assert re.search(q, "    get (/usr/lib/python3.11/multiprocessing/queues.py:103)", re.M)
    assert re.search(q, '  File "/usr/lib/python3.11/multiprocessing/queues.py", line 103 in get', re.M)
    for other in (
        "    Queue.get_nowait (multiprocessing/queues.py:120)",
        "    Queue._feed (multiprocessing/queues.py:231)",
        "    target_get (multiprocessing/queues.py:1)",
        '  File "/x/multiprocessing/queues.py", line 120 in get_nowait',
        "    Queue.get (other/queues.py:103)",
        '  File "/x/othermultiprocessing/queues.py", line 103 in get',
    ):
        assert not re.search(q, other, re.M), other
    with pytest.raises(ValueError, match="not a regular expression"):
        hazard("h", expect="HANG", hang_where=("(",))
    with pytest.raises(TypeError, match="tuple of patterns"):
        hazard("h", expect="HANG", hang_where="native:libgomp")


def test_hazards_predicted_to_hang_say_where():
    """Every hazard variant predicted HANG (on some build) names where (hang_where): a hang
    anywhere else is no reproduction of it."""
    from repro.scenarios import load_catalogue

    missing = [
        f"{sc.name}:{v.name}"
        for sc in load_catalogue().values()
        for v in sc.variants
        if v.kind == "hazard"
        and not v.hang_where
        and any(Outcome.HANG in v.expected(Build(fp, v.env))[0] for fp in _BUILDS)
    ]
    assert not missing, f"hazards predicted HANG without hang_where: {missing}"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/PID/fd")
def test_faulthandler_dump_never_signals_a_process_without_the_handler(tmp_path):
    """A Python process that forks runs sitecustomize's at-fork hook in the child, which makes
    the child's faulthandler file; the child then execs a program that is not Python (or one
    without sitecustomize). The file exists, but nothing in the process holds it open: SIGUSR1
    would kill it (its default action) and let the rest of a hung tree run on."""
    import subprocess

    proc = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        (tmp_path / f"faulthandler-{proc.pid}.txt").write_text("")  # as the at-fork hook left it
        assert ev.faulthandler_dump(proc.pid, tmp_path, timeout=2.0) == ""
        assert proc.poll() is None, f"the dump request killed it (status {proc.returncode})"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/PID/fd")
def test_faulthandler_dump_still_asks_a_process_with_the_handler(tmp_path):
    """The same request goes to a Python process that registered the handler on its file."""
    import subprocess

    code = (
        "import faulthandler, os, signal, sys\n"
        f"fh = open(os.path.join({str(tmp_path)!r}, f'faulthandler-{{os.getpid()}}.txt'), 'w')\n"
        "faulthandler.register(signal.SIGUSR1, file=fh, all_threads=True, chain=False)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        text = ev.faulthandler_dump(proc.pid, tmp_path)
        assert "most recent call first" in text, text
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_the_termination_after_a_verdict_says_how_the_root_really_ended():
    """After a HANG or TIMEOUT verdict the stacks are taken, then the tree is killed. A root that
    ended in between (a hang at shutdown that let go) exited with its own status, yet the
    evidence said "killed by the harness (SIGKILL)" beside exit_code 0. The description now
    follows the exit status."""
    import signal

    from repro.harness.runner import _termination

    killed = _termination(-signal.SIGKILL, {}, "HANG", [])
    assert killed["kind"] == "killed-by-harness" and "SIGKILL" in killed["description"]
    assert _termination(None, {}, "TIMEOUT", [])["kind"] == "killed-by-harness"
    own = _termination(0, {"status": "pass"}, "HANG", [])
    assert own["kind"] == "exited-after-verdict" and own["code"] == 0
    assert "exited 0 on its own after the HANG verdict" in own["description"]
    other = _termination(-signal.SIGTERM, {}, "TIMEOUT", [])
    assert other["kind"] == "signal-after-verdict" and other["signal"] == "SIGTERM"
    assert "SIGKILL" not in other["signal"]


def test_the_termination_after_a_verdict_names_a_realtime_signal_without_raising():
    """A realtime signal between SIGRTMIN and SIGRTMAX is a valid signal number but no member of
    signal.Signals: naming it by Signals(n) raised ValueError inside the run (after a HANG
    verdict, the harness's traceback instead of a result). The verdict-less path says
    'signal n' for such numbers; so does the one after a verdict."""
    import signal

    from repro.harness.runner import _termination

    n = signal.SIGRTMIN + 3
    assert n in signal.valid_signals() and n not in {s.value for s in signal.Signals}
    after = _termination(-n, {}, "HANG", [])
    assert after["kind"] == "signal-after-verdict" and after["signal"] == f"signal {n}", after
    assert _termination(-n, {}, None, [])["signal"] == f"signal {n}"


def test_killing_the_tree_leaves_the_roots_exit_status_with_its_popen():
    """kill_all waited for its victims with psutil, which reaps a child of this process itself;
    Popen, finding its root already reaped (ECHILD), then said it exited 0, and the evidence of
    a HANG read 'exited 0 on its own' beside a SIGKILL. The root is now waited for through its
    Popen. A sleeping root, whole trees of which are killed several times (the old code lost
    the status in most tries, depending on whether the root was still dying when looked at)."""
    import signal
    import subprocess

    codes = []
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        tree = ev.Tree(proc.pid, "no-such-token")
        tree.pids()  # seen, as the runner's samples see it
        tree.kill_all(proc)
        codes.append(proc.returncode)
    assert codes == [-signal.SIGKILL] * 8, codes
