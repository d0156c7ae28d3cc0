"""The harness judged on small synthetic programs (tests/programs/, no torch): each must get
the right verdict, with its evidence, and leave no process alive."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from repro.harness import evidence as ev
from repro.harness import runner
from repro.harness.runner import run_script

PROGRAMS = Path(__file__).parent / "programs"
ROOT = Path(__file__).resolve().parents[1]
GENEROUS = 30.0  # deadline for programs that must be judged long before it
_EVIDENCE_ROOT: str | None = None


@pytest.fixture(autouse=True)
def _evidence_root(tmp_path):
    global _EVIDENCE_ROOT
    _EVIDENCE_ROOT = str(tmp_path)
    yield
    _EVIDENCE_ROOT = None


def run(name: str, timeout: float = GENEROUS, **kw):
    # evidence of runs with unexpected outcomes goes to pytest's tmp dirs, not to /tmp
    out = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_EVIDENCE_ROOT))
    result = run_script(PROGRAMS / f"{name}.py", timeout=timeout, fingerprint=False, out_dir=out, **kw)
    assert_nothing_left(result)
    return result


def assert_nothing_left(result) -> None:
    """No process of the run is alive or an unreaped zombie of ours; no survivor reported.

    The run's processes are looked for by the run token *and* by the run's session (the root's
    pid, members started no earlier than the root): a process whose environment was cleared
    carries no token but stays in the session unless it calls setsid."""
    token = result.evidence["run_token"]
    assert result.evidence.get("survivors") == [], result.summary()
    tree = ev.Tree(-1, token)
    assert tree.token_scan() == set(), f"processes still carry the run token: {result.summary()}"
    root = result.evidence.get("root")
    if root:
        in_session = ev.Tree(root["pid"], token, root_start=root["start"]).pids()
        assert in_session == [], f"processes of the run's session still exist: {in_session}: {result.summary()}"
    for pid in result.evidence["pids"]:
        try:
            p = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        # the pid may have been reused by an unrelated process: only ours would carry the token
        assert not (p.ppid() == os.getpid() and p.status() == psutil.STATUS_ZOMBIE), f"unreaped zombie {pid}"


def threads_of(result) -> list[dict]:
    return [t for proc in result.evidence["threads"].values() for t in proc["threads"]]


def assert_hang(result, processes: int) -> None:
    assert result.outcome == "HANG", result.summary()
    hang = result.evidence["hang"]
    assert hang["detected_after_s"] < GENEROUS / 2, hang
    assert len(result.evidence["threads"]) == processes, result.evidence["threads"].keys()
    for t in threads_of(result):
        assert t["wait"] in ("untimed", "timed-past-deadline"), t
    stacks = result.evidence["stacks"]
    assert len(stacks) == processes
    for entry in stacks.values():
        assert entry["method"] in ("py-spy --native", "py-spy", "faulthandler"), entry
        assert entry["text"].strip()
    assert len(result.evidence["killed"]) == processes
    assert result.evidence["termination"]["kind"] == "killed-by-harness"


# -- HANG -------------------------------------------------------------------------------
def test_lock_held_across_fork_is_hang_with_stacks():
    r = run("lock_across_fork")
    assert_hang(r, processes=2)
    details = [t["detail"] for t in threads_of(r)]
    assert any(d.startswith("futex") and "no timeout" in d for d in details), details
    assert any(t["syscall"] == "wait4" for t in threads_of(r))  # the parent's os.waitpid
    assert "lock_across_fork.py" in r.evidence["top_frame"]


def test_processes_waiting_on_each_other_through_pipes():
    r = run("pipe_deadlock")
    assert_hang(r, processes=2)
    assert sorted(t["syscall"] for t in threads_of(r)) == ["read", "read"]


def test_threads_joining_each_other():
    r = run("mutual_join")
    assert_hang(r, processes=1)
    assert len(threads_of(r)) == 3
    assert "join" in next(iter(r.evidence["stacks"].values()))["text"]


def test_hang_across_children_and_setsid_daemon_kills_everything():
    r = run("hang_with_daemon")
    assert_hang(r, processes=3)
    sessions = {p["session"] for p in r.evidence["threads"].values()}
    assert len(sessions) == 2, "the daemon left the run's session and was still found"


def test_wait_with_timeout_beyond_deadline_counts_as_blocked():
    r = run("wait_past_deadline")
    assert_hang(r, processes=1)
    assert any("counted as blocked" in t["detail"] for t in threads_of(r))


def test_faulthandler_fallback_when_py_spy_is_missing(monkeypatch):
    monkeypatch.setattr(ev, "find_py_spy", lambda: None)
    r = run("lock_across_fork")
    assert r.outcome == "HANG"
    for entry in r.evidence["stacks"].values():
        assert entry["method"] == "faulthandler"
        assert "lock_across_fork.py" in entry["text"]


def test_without_proc_the_deadline_decides(monkeypatch):
    monkeypatch.setattr(runner, "proc_readable", lambda: (False, "no /proc: deadline only"))
    r = run("wait_past_deadline", timeout=2.0)
    assert r.outcome == "TIMEOUT", r.summary()
    assert "no /proc: deadline only" in r.evidence["notes"]


# -- TIMEOUT and PASS: busy, sleeping and timed waits are never HANG -------------------------
def test_busy_loop_is_timeout_not_hang():
    r = run("busy", timeout=2.5)
    assert r.outcome == "TIMEOUT", r.summary()
    assert "hang" not in r.evidence
    assert 2.5 <= r.seconds < 5
    assert any(t["wait"] == "busy" for t in threads_of(r))


def test_long_sleep_is_timeout_not_hang():
    r = run("long_sleep", timeout=2.5)
    assert r.outcome == "TIMEOUT", r.summary()
    assert [t["wait"] for t in threads_of(r)] == ["sleep"]


def test_timed_waits_and_sleeps_then_success_pass():
    r = run("timed_waits")
    assert r.outcome == "PASS", r.summary()
    assert r.ok


def test_script_arguments_and_pass():
    r = run("ok", args=["a", "b"])
    assert r.outcome == "PASS" and r.ok, r.summary()
    assert r.evidence["termination"]["kind"] == "exit"


def test_script_runs_in_the_callers_directory(tmp_path, monkeypatch):
    """As `python FILE ARGS`: relative paths in the arguments are read from the caller's current
    directory, and a file the script writes relatively stays there after the run."""
    (tmp_path / "in.txt").write_text("input\n")
    monkeypatch.chdir(tmp_path)
    r = run("relative_paths", args=["in.txt", "out.txt"])
    assert r.outcome == "PASS" and r.ok, r.summary()
    assert (tmp_path / "out.txt").read_text() == "INPUT\n"
    assert r.params["cwd"] == str(tmp_path)


def test_cli_script_cwd_chooses_the_directory(tmp_path, capsys):
    from repro import cli

    (tmp_path / "in.txt").write_text("input\n")
    prog = str(PROGRAMS / "relative_paths.py")
    rc = cli.main(["script", prog, "--no-fingerprint", "--cwd", str(tmp_path), "--", "in.txt", "out.txt"])
    assert rc == 0, capsys.readouterr().out
    assert (tmp_path / "out.txt").read_text() == "INPUT\n"


def test_script_whose_name_starts_with_a_dash(tmp_path):
    """The child's options carry their values as --opt=VALUE: a script named '-dash.py' is not
    taken for an option."""
    script = tmp_path / "-dash.py"
    script.write_text((PROGRAMS / "ok.py").read_text())
    r = run_script(script, timeout=GENEROUS, args=["a", "b"], fingerprint=False, out_dir=tmp_path / "out")
    assert_nothing_left(r)
    assert r.outcome == "PASS" and r.ok, r.summary()
    assert r.scenario == "-dash.py"


def test_cli_script_named_after_the_double_dash(tmp_path, capsys, monkeypatch):
    """`python -m repro script -- -dash.py a b`: the first word after -- is the script when
    none came before it (argparse would take '-dash.py' for an option)."""
    from repro import cli

    (tmp_path / "-dash.py").write_text((PROGRAMS / "ok.py").read_text())
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.json"
    rc = cli.main(["script", "--no-fingerprint", "--json", str(out), "--", "-dash.py", "a", "b"])
    assert rc == 0, capsys.readouterr()
    rec = json.loads(out.read_text())
    assert rec["scenario"] == "-dash.py" and rec["outcome"] == "PASS", rec


# -- CRASH and deliberate exits ----------------------------------------------------------------
def test_abort_is_crash_named_sigabrt():
    r = run("abort")
    assert r.outcome == "CRASH"
    assert r.evidence["termination"]["signal"] == "SIGABRT"
    assert r.evidence["termination"]["kind"] == "abort"
    assert r.evidence["faulthandler"], "faulthandler wrote the aborting stack"


def test_segfault_is_crash_named_sigsegv():
    r = run("segfault")
    assert r.outcome == "CRASH"
    assert r.evidence["termination"]["signal"] == "SIGSEGV"
    assert "segmentation-fault" in r.evidence["signatures"]
    assert "string_at" in r.evidence["top_frame"]


def test_killed_by_a_signal_after_reporting_fail_is_crash():
    """A signal is a crash whatever the code reported before it: the FAIL it recorded stays in
    the evidence, the crash is not hidden behind it."""
    r = run("fail_then_segfault")
    assert r.outcome == "CRASH", r.summary()
    term = r.evidence["termination"]
    assert term["signal"] == "SIGSEGV" and "'fail'" in term["description"], term
    assert r.evidence["child_status"] == "fail" and r.error["type"] == "AssertionError"


def test_exit_without_result_is_crash_with_code():
    r = run("os_exit")
    assert r.outcome == "CRASH"
    assert r.evidence["termination"] == {**r.evidence["termination"], "kind": "exit-without-result", "code": 4}
    assert "leaving early" in r.evidence["stderr_tail"]


def test_sys_exit_is_a_deliberate_exit():
    r = run("sys_exit")
    assert r.outcome == "FAIL"
    assert r.evidence["termination"]["kind"] == "deliberate-exit"
    assert "sys.exit(3)" in r.evidence["termination"]["description"]


def test_native_exit_with_mkl_message_is_told_apart_from_a_crash():
    r = run("mkl_exit")
    term = r.evidence["termination"]
    assert r.outcome == "CRASH" and term["kind"] == "deliberate-native-exit" and term["deliberate"]
    assert "signal" not in term
    assert {"intel-mkl-error", "mkl-threading-layer-incompatible"} <= set(r.evidence["signatures"])


def test_signature_in_the_error_the_root_raised():
    """The root's exception is recorded in the result, not printed: its message is sought too."""
    r = run("error_with_signature")
    assert r.outcome == "ERROR", r.summary()
    assert "dataloader-worker-died" in r.evidence["signatures"], r.summary()


@pytest.mark.parametrize(
    "which, message, signature, kind",
    [
        ("omp", "OMP: Error #15", "omp-error-15-duplicate-runtime", "abort"),
        ("mkl", "INTEL MKL ERROR", "intel-mkl-error", "deliberate-native-exit"),
    ],
)
def test_signature_followed_by_more_than_a_tail_of_stderr(which, message, signature, kind):
    """A message followed by more output than the stored tail holds is still named, and the
    classification that rests on it (MKL's deliberate exit) still holds."""
    r = run("early_signature", args=[which])
    assert r.outcome == "CRASH", r.summary()
    assert signature in r.evidence["signatures"], r.summary()
    assert r.evidence["termination"]["kind"] == kind, r.evidence["termination"]
    assert message not in r.evidence["stderr_tail"] and len(r.evidence["stderr_tail"]) <= 4001  # the tail stays short


def test_expected_outcome_makes_ok():
    r = run("sys_exit", expect=["FAIL"])
    assert r.ok


# -- processes left behind ----------------------------------------------------------------
def test_children_grandchildren_and_daemon_left_behind_are_killed_and_listed():
    r = run("leave_behind")
    assert r.outcome == "PASS", r.summary()
    left = r.evidence["left_behind"]
    assert len(left) == 3, left
    assert len({p["pid"] for p in left}) == 3


def _kill_if_left(pidfile: Path) -> psutil.Process | None:
    """The process named in ``pidfile`` if it is still alive (then killed, so that a failing
    test leaves nothing behind either), else None."""
    try:
        p = psutil.Process(int(pidfile.read_text()))
        if p.status() == psutil.STATUS_ZOMBIE or "time.sleep(1000)" not in " ".join(p.cmdline()):
            return None  # gone, or the pid is another process's now
    except (OSError, ValueError, psutil.Error):
        return None
    p.kill()
    return p


@pytest.mark.parametrize("how", ["popen", "shell"])
def test_orphan_without_the_token_is_killed_and_listed(tmp_path, how):
    """A sleeper started with an empty environment (no run token) outlives the root: it is
    found through the run's session, killed and listed as left behind."""
    pidfile = tmp_path / "sleeper.pid"
    try:
        r = run("orphan_env_cleared", args=[str(pidfile), how])
        assert r.outcome == "PASS", r.summary()
        pid = int(pidfile.read_text())
        assert pid in [p["pid"] for p in r.evidence.get("left_behind", [])], r.summary()
    finally:
        left = _kill_if_left(pidfile)
    assert left is None, f"the env-cleared sleeper {left.pid} survived the run"


@pytest.mark.parametrize("work", ["sleep", "busy"])
def test_busy_orphan_without_the_token_keeps_the_run_alive(work):
    """The root is blocked reading a pipe while an env-cleared orphan works (sleeps, or spins
    on the CPU) for 3 s before writing to it: the run is not quiescent, so PASS, not HANG."""
    r = run("orphan_busy_worker", args=[work])
    assert r.outcome == "PASS", r.summary()
    assert r.seconds >= 3


def test_the_trees_temp_dir_is_removed_after_the_run_and_its_leftovers_listed(tmp_path):
    where = tmp_path / "where.txt"
    r = run("leave_temp", args=[str(where)])
    assert r.outcome == "PASS", r.summary()
    left = Path(where.read_text())
    assert left.name.startswith("left-behind-") and not left.exists()
    assert left.parent.name.startswith("sr-") and not left.parent.exists()
    assert r.evidence["temp_left"] == [left.name]
    assert len(r.evidence["left_behind"]) == 1


def test_a_tmpdir_the_caller_sets_is_left_alone(tmp_path):
    where = tmp_path / "where.txt"
    r = run("leave_temp", args=[str(where)], env={"TMPDIR": str(tmp_path)})
    assert r.outcome == "PASS", r.summary()
    left = Path(where.read_text())
    assert left.parent == tmp_path and left.is_dir()
    assert "temp_left" not in r.evidence


# -- the harness parent ----------------------------------------------------------------------
def test_parent_never_imports_torch(tmp_path):
    """The CLI (list, run of a scenario that imports torch, script with a fingerprint taken in a
    child) and the catalogue with its pytest items leave torch, numpy and transformers out of
    the parent."""
    out = tmp_path / "r.json"
    code = f"""
import runpy, sys
from repro.scenarios import load_catalogue
import repro.harness.runner, repro.harness.report, repro.harness.predict, repro.harness.fingerprint, repro.cli
import tests.test_scenarios
assert load_catalogue()
for argv in (["list"], ["run", "harness_overhead:import-torch"],
             ["script", {str(PROGRAMS / 'ok.py')!r}, "--json", {str(out)!r}, "--", "a", "b"]):
    sys.argv = ["repro", *argv]
    try:
        runpy.run_module("repro", run_name="__main__")
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
bad = sorted(m for m in ("torch", "numpy", "transformers") if m in sys.modules)
assert not bad, bad
print("clean")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in ("outcome", "seconds", "evidence", "fingerprint"):
        assert key in data
    assert data["fingerprint"].get("torch"), "the fingerprint came from a child"


def test_cli_script_exit_status_follows_expectation(tmp_path):
    cmd = [sys.executable, "-m", "repro", "script", str(PROGRAMS / "sys_exit.py"), "--no-fingerprint"]
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # evidence of the unexpected run stays in tmp_path
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert "evidence kept in " + str(tmp_path) in bad.stdout, bad.stdout
    assert bad.returncode == 1 and "FAIL" in bad.stdout, bad.stdout + bad.stderr
    good = subprocess.run([*cmd, "--expect", "FAIL", "--json", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stdout + good.stderr
    report = subprocess.run([sys.executable, "-m", "repro", "report", str(tmp_path / "r.json"), "-o", str(tmp_path / "r.md")],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "r.md").read_text()
    assert "| scenario | variant | kind | expected | observed | ok | seconds | key metrics |" in text
    assert "sys_exit.py" in text and "**FAIL**" in text
    to_stdout = subprocess.run([sys.executable, "-m", "repro", "report", str(tmp_path / "r.json"), "-o", "-"],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert to_stdout.returncode == 0 and to_stdout.stdout == text, to_stdout.stderr


def test_bench_on_an_interpreter_without_a_fingerprint_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """bench times scenarios in the interpreter it runs in: one that cannot be fingerprinted (no
    torch) is named in one line, exit 2, before anything runs."""
    from repro import cli
    from repro.harness import fingerprint

    def no_fingerprint(python, **kw):
        raise fingerprint.FingerprintError(f"could not fingerprint {python}: No module named 'torch'")

    monkeypatch.setattr(fingerprint, "get_fingerprint", no_fingerprint)
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "harness_overhead", "--json", str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "bench: error: could not fingerprint" in err, err
    assert "Traceback" not in err and not (tmp_path / "b.json").exists()


@pytest.mark.parametrize(
    "argv, says",
    [
        (["script", "/nonexistent/x.py"], "not a file: /nonexistent/x.py"),
        (["script", "{ok}", "--timeout", "-1"], "--timeout: must be a positive number"),
        (["script", "{ok}", "--timeout", "abc"], "--timeout: not a number"),
        (["run", "harness_overhead", "--timeout", "0"], "--timeout: must be a positive number"),
        (["run", "harness_overhead", "--repeat", "0"], "--repeat: must be at least 1"),
        (["run", "harness_overhead", "--python", "/nonexistent/python"], "no executable interpreter"),
        (["env", "--python", "no-such-python-3.99"], "no executable interpreter"),
        (["report", "{missing}"], "No such file"),
        (["report", "{notjson}"], "not JSON"),
        (["report", "{nulljson}"], "not a splitrepro result file"),
        (["script", "{ok}", "--json", "-"], "'-' (standard output) is not taken here"),  # made a file named -
        (["report", "{nullresults}"], "not a splitrepro result file"),
        (["report", "{partial}"], "not a splitrepro result file"),
        (["bench", "--timeout", "0", "--list"], "--timeout: must be a positive number"),
        (["bench", "--render", "{missing}"], "--render: not a file"),
        (["matrix", "{missing}", "-o", "{out}"], "no such cell file or directory"),
        (["matrix", "{notjson}", "-o", "{out}"], "not JSON"),
        (["matrix", "{empty}", "-o", "{out}"], "no cell files found"),
        (["hazards", "{notjson}", "-o", "{out}.md"], "not JSON"),
        (["run", "no_such_scenario"], "run: error: unknown scenario 'no_such_scenario'"),
        (["run"], "run: error: name a scenario"),
        (["run", "harness_overhead:badvariant"], "run: error: scenario 'harness_overhead' has no variant 'badvariant'"),
        (["run", "harness_overhead", "--kind", "hazard"], "run: error: nothing selected"),
        (["bench", "no_such_scenario", "--json", "{out}.json"], "bench: error: unknown scenario"),
        (["script", "{ok}", "--cwd", "{missing}"], "--cwd: not a directory"),
        (["script", "--timeout", "5"], "required: path"),
        (["script", "--"], "required: path"),
        # interpreters that give no fingerprint: no torch, something else on stdout, a hang
        (["run", "harness_overhead", "--python", "{notorch}"], "run: error: could not fingerprint"),
        (["script", "{ok}", "--python", "{notorch}", "--", "a", "b"], "No module named 'torch'"),
        (["env", "--python", "{chatty}"], "env: error: could not fingerprint"),
        (["env", "--python", "{hangs}"], "no answer in 2s"),
    ],
)
def test_cli_bad_arguments_are_usage_errors(argv, says, tmp_path, capsys, monkeypatch):
    """A wrong path, name, interpreter or number is named in one line with exit status 2 (1 is
    for outcomes not as expected), never a traceback."""
    from repro import cli
    from repro.harness import fingerprint

    (tmp_path / "notjson.json").write_text("this is not json")
    (tmp_path / "null.json").write_text("null")
    (tmp_path / "nullresults.json").write_text('{"results": null}')
    (tmp_path / "partial.json").write_text('{"outcome": "PASS", "seconds": 1.0}')  # no scenario, kind...
    (tmp_path / "empty").mkdir()
    real = sys.executable
    pythons = {  # -S: no site-packages, so no torch; the project still comes through PYTHONPATH
        "notorch": f'exec {real} -S "$@"\n',
        "chatty": "echo 'hello from a shell profile'\n",
        "hangs": f'case "$1" in -c) exec {real} "$@";; *) exec sleep 600;; esac\n',  # finds torch, hangs importing it
    }
    for name, body in pythons.items():
        (tmp_path / name).write_text("#!/bin/sh\n" + body)
        (tmp_path / name).chmod(0o755)
    monkeypatch.setattr(fingerprint, "PROBE_TIMEOUT_S", 2.0)
    monkeypatch.setattr(fingerprint, "COLLECT_TIMEOUT_S", 2.0)
    paths = {
        "ok": str(PROGRAMS / "ok.py"),
        "missing": str(tmp_path / "missing.json"),
        "notjson": str(tmp_path / "notjson.json"),
        "nulljson": str(tmp_path / "null.json"),
        "nullresults": str(tmp_path / "nullresults.json"),
        "partial": str(tmp_path / "partial.json"),
        "empty": str(tmp_path / "empty"),
        "out": str(tmp_path / "report"),
        **{name: str(tmp_path / name) for name in pythons},
    }
    argv = [a.format(**paths) for a in argv]
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert says in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 or "usage:" in err, err  # one line, or argparse's usage + line
    assert not list(tmp_path.glob("report*")), "nothing is written on a usage error"


def _signals_as_from_a_terminal() -> None:
    """In the CLI's child before exec: the default actions of SIGINT, SIGTERM and SIGHUP, as a
    command started from a terminal has them. pytest may run where they are ignored (under
    ``nohup``, SIGHUP is), and the CLI leaves an ignored signal ignored."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def test_an_interruption_inside_popen_still_kills_the_tree(tmp_path, monkeypatch):
    """Ctrl-C arriving while Popen still runs in the parent (the child forked and exec'd, Popen
    not yet returned: under load, test_interrupted_run_leaves_nothing_behind hit it about once in
    15 runs) loses the Popen object; the root and its tree were left running."""
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen_then_interrupted(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        raise KeyboardInterrupt  # as the signal handler would, before Popen returns

    monkeypatch.setattr(runner.subprocess, "Popen", popen_then_interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_script(PROGRAMS / "long_sleep.py", timeout=GENEROUS, fingerprint=False)
        monkeypatch.undo()
        assert len(started) == 1
        root = started[0]
        try:
            status = psutil.Process(root.pid).status()
        except psutil.NoSuchProcess:
            status = None  # killed and reaped
        assert status is None, f"the root outlived the harness ({status})"
    finally:
        for p in started:  # fail, but leave nothing running
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p.pid, 0)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_interrupted_run_leaves_nothing_behind(tmp_path, sig):
    """Ctrl-C (SIGINT), SIGTERM (``timeout``, a CI cancel) or SIGHUP (a closed terminal) in the
    middle of a run: exit 128 + the signal's number, the scenario's tree killed (it runs in a
    session of its own, out of reach of the signal), and neither the run's directory nor the
    tree's temp dir left in TMPDIR (there is no verdict to keep evidence for)."""
    env = {k: v for k, v in os.environ.items() if k != "SPLITREPRO_KEEP"}
    env["TMPDIR"] = str(tmp_path)
    cmd = [sys.executable, "-m", "repro", "script", str(PROGRAMS / "long_sleep.py"), "--no-fingerprint", "--timeout", "120"]
    cli = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_signals_as_from_a_terminal,
    )
    child = None
    try:
        # the run is under way once the CLI's child (the scenario's interpreter) exists
        until = time.monotonic() + 60
        while child is None:
            assert cli.poll() is None and time.monotonic() < until, "the run never started"
            child = next((p for p in psutil.Process(cli.pid).children() if "repro.harness.child" in p.cmdline()), None)
            if child is None:
                time.sleep(0.05)  # polling another process's start: there is nothing to wait on
        assert list(tmp_path.glob("splitrepro-long_sleep.py-*")) and list(tmp_path.glob("sr-*"))
        cli.send_signal(sig)
        out, _ = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        survived = False
        if child is not None:
            with contextlib.suppress(psutil.Error):
                survived = child.status() != psutil.STATUS_ZOMBIE
            if survived:  # fail, but leave nothing running: the scenario's session is the child's pid
                os.killpg(child.pid, signal.SIGKILL)
            with contextlib.suppress(psutil.Error):
                child.wait(10)  # reaps it if it was reparented here (this process may be a subreaper)
    assert cli.returncode == 128 + sig and "interrupted" in out, (cli.returncode, out)
    assert not survived, "the scenario's tree outlived the harness"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_serial_runs_exclude_shared_runs(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setenv("SPLITREPRO_LOCK_DIR", str(tmp_path))
    lock_file = tmp_path / f"splitrepro-{os.getuid()}.lock"
    with runner.run_lock(serial=True):
        with open(lock_file) as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
    with runner.run_lock(serial=False):
        with open(lock_file) as other:
            fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared beside shared: fine
            with open(lock_file) as third, pytest.raises(BlockingIOError):
                fcntl.flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_child_environment_is_controlled(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setenv("MKL_THREADING_LAYER", "INTEL")
    monkeypatch.setenv("KMP_AFFINITY", "x")
    monkeypatch.setenv("GOMP_SPINCOUNT", "1")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    env = runner.child_env({"OMP_NUM_THREADS": "1"}, token="tok", evidence_dir="/x")
    assert env["OMP_NUM_THREADS"] == "1"
    for gone in ("MKL_THREADING_LAYER", "KMP_AFFINITY", "GOMP_SPINCOUNT", "OPENBLAS_NUM_THREADS"):
        assert gone not in env
    assert env["OPENBLAS_CORETYPE"] == "Haswell"
    assert env["HF_HUB_OFFLINE"] == "1" and env["SPLITREPRO_RUN_TOKEN"] == "tok"
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [str(runner.SITE_DIR), str(runner.PROJECT_ROOT)]


def test_child_pythonpath_keeps_the_variants_own_after_the_harness_entries(monkeypatch):
    """A PYTHONPATH set by the variant (or run_script's env) was replaced by the caller's."""
    monkeypatch.setenv("PYTHONPATH", "/callers")
    head = [str(runner.SITE_DIR), str(runner.PROJECT_ROOT)]
    assert runner.child_env()["PYTHONPATH"].split(os.pathsep) == [*head, "/callers"]
    assert runner.child_env({"PYTHONPATH": "/mine:/more"})["PYTHONPATH"].split(os.pathsep) == [*head, "/mine", "/more"]
    monkeypatch.delenv("PYTHONPATH")
    assert runner.child_env()["PYTHONPATH"].split(os.pathsep) == head


def test_hang_at_interpreter_shutdown_is_named():
    r = run("shutdown_hang")
    assert_hang(r, processes=1)
    assert r.evidence["child_status"] == "pass"
    assert any("interpreter shutdown" in n for n in r.evidence["notes"])


def test_forked_child_leaving_through_the_harness_does_not_write_the_result():
    """A child forked (no exec) by the root calls sys.exit(0), which unwinds into the harness's
    child.main; the root then deadlocks. Only the root writes the result: HANG, with the code
    still running (no "the code had finished" note)."""
    r = run("fork_exit_then_deadlock")
    assert_hang(r, processes=1)
    assert r.evidence["child_status"] == "running", r.summary()
    assert not any("the code had finished" in n for n in r.evidence["notes"]), r.summary()


def test_session_lock_dir_reaches_xdist_workers():
    """conftest scopes the run lock to this session; xdist workers must see the same dir."""
    assert os.environ.get("SPLITREPRO_LOCK_DIR"), "tests/conftest.py sets it for the session"
    assert runner.lock_dir() == Path(os.environ["SPLITREPRO_LOCK_DIR"])


def test_serial_run_waits_for_tests_sharing_the_machine(tmp_path, monkeypatch):
    """A serial run takes the machine lock exclusively: not while a test shares it; and a run
    started inside such a test takes the run lock alone (no self-deadlock)."""
    import fcntl

    monkeypatch.setenv("SPLITREPRO_LOCK_DIR", str(tmp_path))
    monkeypatch.delenv(runner.MACHINE_SHARED_ENV, raising=False)
    machine = tmp_path / f"splitrepro-{os.getuid()}.machine"
    with runner.machine_shared():
        assert os.environ[runner.MACHINE_SHARED_ENV] == "1"
        with open(machine) as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with runner.run_lock(serial=True):  # inside the shared test: must not wait on itself
            pass
    assert runner.MACHINE_SHARED_ENV not in os.environ
    with runner.run_lock(serial=True):
        with open(machine) as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)


def test_hang_with_an_execd_program_that_is_not_python(tmp_path, monkeypatch):
    """The root forks and the child execs ``cat`` (the at-fork hook left it a faulthandler file
    before the exec): HANG, and taking the evidence must not kill ``cat`` (SIGUSR1) and so let
    the root's waitpid return; both are killed by the harness at the end."""
    monkeypatch.setattr(ev, "find_py_spy", lambda: None)  # every stack through faulthandler
    status = tmp_path / "status.txt"
    r = run("fork_exec_hang", args=[str(status)])
    assert r.outcome == "HANG", r.summary()
    assert len(r.evidence["stacks"]) == 2 and len(r.evidence["killed"]) == 2, r.summary()
    assert not status.exists(), f"the root's waitpid returned (status {status.read_text()}): its child was signalled"


@pytest.mark.parametrize(
    "argv",
    [
        ["script", "{ok}", "--no-fingerprint", "--json", "{dir}"],
        ["script", "{ok}", "--no-fingerprint", "--json", "{file}/r.json"],
        ["run", "harness_overhead:import-torch", "--json", "{dir}"],
        ["run", "harness_overhead:import-torch", "--report", "{dir}"],
        ["report", "{result}", "-o", "{dir}"],
    ],
)
def test_cli_output_that_cannot_be_written_is_a_usage_error(argv, tmp_path, capsys):
    """--json, --report or -o naming a directory (or a path under a file) is named in one line,
    exit 2, before anything runs; not a traceback once the run is over."""
    from repro import cli

    (tmp_path / "out").mkdir()
    (tmp_path / "plain").write_text("")
    result = tmp_path / "result.json"
    result.write_text(
        json.dumps({"scenario": "x.py", "variant": "", "kind": "script", "outcome": "PASS", "expected": ["PASS"]})
    )
    paths = {
        "ok": str(PROGRAMS / "ok.py"),
        "dir": str(tmp_path / "out"),
        "file": str(tmp_path / "plain"),
        "result": str(result),
    }
    try:
        rc = cli.main([a.format(**paths) for a in argv])
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code
    out, err = capsys.readouterr()
    assert rc == 2 and "Traceback" not in err, out + err
    assert "error:" in err and err.strip().splitlines()[-1].count("error:") == 1, err
    assert "ok.py" not in out, "nothing ran"


def test_fingerprint_of_a_wrapper_interpreter_that_hangs_leaves_nothing_behind(tmp_path, monkeypatch):
    """An interpreter that is a wrapper script running python as its child (no exec), whose
    python hangs importing torch: once the fingerprint gives up, neither the wrapper nor its
    child is left running."""
    from repro.harness import fingerprint

    pidfile = tmp_path / "child.pid"
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'case "$1" in -c) exec {sys.executable} "$@";; esac\n'
        f"sleep 600 & echo $! > {pidfile}\n"  # stands for the python that hangs importing torch
        "wait\n"
    )
    wrapper.chmod(0o755)
    monkeypatch.setattr(fingerprint, "COLLECT_TIMEOUT_S", 2.0)
    monkeypatch.setenv("SPLITREPRO_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(fingerprint.FingerprintError, match="no answer in 2s"):
        fingerprint.get_fingerprint(str(wrapper), refresh=True)
    child = psutil.Process(int(pidfile.read_text()))
    try:
        child.wait(10)  # gone (reaped by its new parent, or here if this process is a subreaper)
        survived = False
    except psutil.TimeoutExpired:
        survived = True
        child.kill()
    except psutil.NoSuchProcess:
        survived = False
    assert not survived, "the wrapper's child outlived the fingerprint"


def test_cli_python_given_as_a_relative_path(tmp_path, monkeypatch, capsys):
    """``--python venv/bin/python`` names the interpreter from the caller's directory, as a shell
    would, though the run starts its child in a work dir of its own."""
    from repro import cli

    here = Path(sys.executable).parent
    monkeypatch.chdir(here.parent)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # a run's dirs, if kept, stay in tmp_path
    rel = f"{here.name}/{Path(sys.executable).name}"
    rc = cli.main(["script", str(PROGRAMS / "ok.py"), "--no-fingerprint", "--python", rel, "--", "a", "b"])
    out, err = capsys.readouterr()
    assert rc == 0 and "PASS" in out, out + err


def test_run_json_records_the_code_it_ran(tmp_path):
    """`repro run --json` says which commit ran (and whether the tree had changes) beside the
    build's fingerprint: results carried home from another machine keep their provenance."""
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "repro", "run", "serving_cuda:spawn", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if head:
        assert data["source"]["commit"] == head and isinstance(data["source"]["dirty"], bool)
    assert [r["variant"] for r in data["results"]] == ["spawn"]
