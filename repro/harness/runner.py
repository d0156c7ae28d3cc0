"""Run one scenario variant, or any Python script, in a fresh interpreter and classify it.

The child is ``python -m repro.harness.child ...`` started with ``subprocess.Popen`` (never a
fork of this process), in its own session, stdin from /dev/null, stdout/stderr to files, with a
controlled environment; a scenario runs in a per-run working directory, a script in the caller's
current directory. While it runs, the whole process tree is sampled from /proc
(:mod:`repro.harness.verdict`) so that a HANG is decided about a second after the tree goes
quiescent rather than at the deadline. On HANG/TIMEOUT/CRASH the
evidence (:mod:`repro.harness.evidence`) is gathered, then every process of the run is killed
and reaped; a process that survives marks the run failed.

This module never imports torch, numpy or transformers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from repro.harness import evidence as ev
from repro.harness.spec import Build, Outcome, Scenario, Together, Variant, pattern_label
from repro.harness.verdict import HangDetector, proc_readable

LEFTOVER_GRACE_S = 1.0

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SITE_DIR = Path(__file__).resolve().parent / "_site"

SAMPLE_INTERVAL = 0.15  # seconds between samples of the tree
HANG_WINDOW = 1.0  # seconds of quiescence that make a HANG

# Inherited thread/runtime settings a run must not see unless its variant sets them.
DROPPED_PREFIXES = (
    "OMP_",
    "MKL_",
    "KMP_",
    "GOMP_",
    "OPENBLAS_",
    "BLIS_",
    "NUMEXPR_",
    "SPLITREPRO_RUN_TOKEN",
    "SPLITREPRO_EVIDENCE_DIR",
)
DROPPED_NAMES = ("GOTO_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "PYTHONSTARTUP", "PYTHONINSPECT")
# Kept when the machine sets them: they keep old OpenBLAS builds from crashing on new CPUs.
KEPT_NAMES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

_SUBREAPER: bool | None = None


@dataclass
class Result:
    scenario: str
    variant: str
    kind: str
    outcome: str
    expected: list[str]
    expected_reason: str = ""
    ok: bool = False
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    observations: list[str] = field(default_factory=list)
    stage: str | None = None
    stages: list = field(default_factory=list)
    error: dict[str, Any] | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    timeout: float = 0.0
    started_at: str = ""

    @property
    def id(self) -> str:
        return f"{self.scenario}:{self.variant}" if self.variant else self.scenario

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), indent=kw.pop("indent", 1), default=str, **kw)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def where(self) -> str:
        """Where it stopped: stage and innermost frame, for one-line summaries."""
        parts = []
        if self.stage:
            parts.append(f"stage {self.stage!r}")
        frame = self.evidence.get("top_frame")
        if frame:
            parts.append(frame)
        return "; ".join(parts)

    def summary(self) -> str:
        """A few lines a human reads at a glance (used in pytest failures and the CLI)."""
        exp = "/".join(self.expected)
        lines = [
            f"{self.id} [{self.kind}]: {self.outcome} (expected {exp}) in {self.seconds:.2f}s"
            + ("" if self.ok else "  <-- UNEXPECTED")
        ]
        if self.expected_reason:
            lines.append(f"  why expected: {self.expected_reason}")
        if self.where():
            lines.append(f"  where: {self.where()}")
        term = self.evidence.get("termination", {})
        if term.get("description"):
            lines.append(f"  termination: {term['description']}")
        for pid, entry in list((self.evidence.get("stacks") or {}).items())[:4]:
            frames = ev.main_thread_frames(entry.get("text") or "")
            if frames:
                lines.append(f"  pid {pid} main thread ({entry.get('method')}): " + " <- ".join(frames))
        hang = self.evidence.get("hang")
        if hang:
            lines.append(
                f"  hang: decided {hang.get('detected_after_s')}s after start, quiescent since {hang.get('onset_estimate_s')}s, window {hang.get('window_s')}s"
            )
        scalars = {k: v for k, v in self.metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        if scalars:
            lines.append("  metrics: " + ", ".join(f"{k}={v}" for k, v in list(scalars.items())[:12]))
        if self.error:
            lines.append(f"  error: {self.error.get('type')}: {str(self.error.get('message'))[:300]}")
        if self.evidence.get("signatures"):
            lines.append(f"  signatures: {', '.join(self.evidence['signatures'])}")
        if self.evidence.get("survivors"):
            lines.append(f"  SURVIVORS (leak): {self.evidence['survivors']}")
        if self.evidence.get("left_behind"):
            lines.append(f"  left behind (killed): {[p.get('pid') for p in self.evidence['left_behind']]}")
        for note in self.evidence.get("notes", []):
            lines.append(f"  note: {note}")
        if not self.ok:
            stderr = (self.evidence.get("stderr_tail") or "").strip().splitlines()[-8:]
            if stderr:
                lines.append("  stderr tail:")
                lines.extend("    " + s for s in stderr)
            if self.evidence.get("run_dir"):
                lines.append(f"  evidence kept in {self.evidence['run_dir']}")
        return "\n".join(lines)


# -- environment ------------------------------------------------------------------------
def child_env(
    extra: dict[str, str] | None = None, *, token: str | None = None, evidence_dir: str | None = None
) -> dict[str, str]:
    env = {}
    for key, value in os.environ.items():
        if key in KEPT_NAMES or not (key.startswith(DROPPED_PREFIXES) or key in DROPPED_NAMES):
            env[key] = value
    env.update({k: str(v) for k, v in (extra or {}).items()})
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    path = [str(SITE_DIR), str(PROJECT_ROOT)]
    # the variant's (or script's) own PYTHONPATH, else the caller's, after the harness's two
    user_path = (extra or {}).get("PYTHONPATH", os.environ.get("PYTHONPATH"))
    if user_path:
        path.append(str(user_path))
    env["PYTHONPATH"] = os.pathsep.join(path)
    if token:
        env["SPLITREPRO_RUN_TOKEN"] = token
        # A harness started inside a run (a benchmark scenario timing nested runs) must not take
        # the run lock again: the outer run holds it for the whole tree.
        env["SPLITREPRO_IN_RUN"] = "1"
    if evidence_dir:
        env["SPLITREPRO_EVIDENCE_DIR"] = evidence_dir
    return env


# -- serialisation of serial (load) scenarios -----------------------------------------------
def lock_dir() -> Path:
    d = Path(os.environ.get("SPLITREPRO_LOCK_DIR") or tempfile.gettempdir())
    d.mkdir(parents=True, exist_ok=True)
    return d


# Set while a process (and so its children) runs inside a test that shares the machine lock.
MACHINE_SHARED_ENV = "SPLITREPRO_MACHINE_SHARED"


def _lock_paths() -> tuple[str, str, str]:
    base = lock_dir() / f"splitrepro-{os.getuid()}"
    return f"{base}.turnstile", f"{base}.lock", f"{base}.machine"


@contextlib.contextmanager
def run_lock(serial: bool) -> Iterator[float]:
    """LOCK_EX for serial scenarios, LOCK_SH for the rest, across processes (xdist workers).

    A serial run also takes the *machine* lock exclusively, so that work which is not a
    scenario run but holds :func:`machine_shared` (the unit tests under pytest) does not run
    beside it either. Locks are always taken in the order turnstile, machine, run. A turnstile
    taken briefly by everyone gives a waiting serial run priority over a stream of shared
    holders. A process inside a test that already shares the machine lock (``MACHINE_SHARED_ENV``)
    takes the run lock alone: it can neither wait on the turnstile (a serial run holding it
    waits for that very test) nor get the machine to itself. Yields the seconds spent waiting.
    """
    t0 = time.monotonic()
    if os.environ.get("SPLITREPRO_IN_RUN") == "1":
        yield 0.0
        return
    turn_path, run_path, machine_path = _lock_paths()
    inside_shared_test = os.environ.get(MACHINE_SHARED_ENV) == "1"
    with open(turn_path, "a") as turn, open(run_path, "a") as lock, open(machine_path, "a") as machine:
        if inside_shared_test:
            fcntl.flock(lock, fcntl.LOCK_EX if serial else fcntl.LOCK_SH)
        else:
            fcntl.flock(turn, fcntl.LOCK_EX)
            try:
                if serial:
                    fcntl.flock(machine, fcntl.LOCK_EX)
                fcntl.flock(lock, fcntl.LOCK_EX if serial else fcntl.LOCK_SH)
            finally:
                fcntl.flock(turn, fcntl.LOCK_UN)
        try:
            yield time.monotonic() - t0
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(machine, fcntl.LOCK_UN)


@contextlib.contextmanager
def machine_shared() -> Iterator[float]:
    """Hold the machine lock shared: no serial scenario run starts meanwhile (and a waiting one
    goes first). Marks the environment so that runs started inside take the run lock alone."""
    t0 = time.monotonic()
    turn_path, _, machine_path = _lock_paths()
    previous = os.environ.get(MACHINE_SHARED_ENV)
    with open(turn_path, "a") as turn, open(machine_path, "a") as machine:
        fcntl.flock(turn, fcntl.LOCK_EX)
        try:
            fcntl.flock(machine, fcntl.LOCK_SH)
        finally:
            fcntl.flock(turn, fcntl.LOCK_UN)
        os.environ[MACHINE_SHARED_ENV] = "1"
        try:
            yield time.monotonic() - t0
        finally:
            if previous is None:
                os.environ.pop(MACHINE_SHARED_ENV, None)
            else:
                os.environ[MACHINE_SHARED_ENV] = previous
            fcntl.flock(machine, fcntl.LOCK_UN)


# -- public entry points ----------------------------------------------------------------
def run_variant(
    scenario: Scenario,
    variant: Variant | str,
    *,
    timeout: float | None = None,
    python: str = sys.executable,
    build: Build | None = None,
    out_dir: str | os.PathLike | None = None,
    quick: bool = False,
) -> Result:
    """Run one variant of ``scenario`` in a fresh interpreter and judge it against ``build``.

    ``quick``: run with the variant's ``quick`` parameter overrides, if it has any (see
    :class:`repro.harness.spec.Variant`); its figures are then not benchmark figures."""
    if isinstance(variant, str):
        variant = scenario.variant(variant)
    if build is None:
        from repro.harness.fingerprint import get_fingerprint

        build = Build(get_fingerprint(python), variant.env)
    elif dict(build.env) != dict(variant.env):
        build = Build(build.fp, variant.env)
    expected, reason = variant.expected(build)
    limit = float(timeout if timeout is not None else scenario.timeout_for(variant))
    params = variant.params_for(quick)
    # --option=VALUE throughout: a value starting with '-' is never read as an option
    argv = [
        f"--func={scenario.func}",
        f"--scenario={scenario.name}",
        f"--variant={variant.name}",
        f"--kind={variant.kind}",
        f"--params={json.dumps(params, default=str)}",
    ]
    return _run(
        argv,
        scenario=scenario.name,
        variant=variant.name,
        kind=variant.kind,
        expected=expected,
        reason=reason,
        timeout=limit,
        python=python,
        env=dict(variant.env),
        params=params,
        fingerprint=build.fp,
        serial=scenario.serial_for(variant),
        out_dir=out_dir,
        window=scenario.hang_window or HANG_WINDOW,
        hang_where=tuple(variant.hang_where),
    )


def run_script(
    path: str | os.PathLike,
    *,
    timeout: float,
    args: Iterable[str] = (),
    python: str = sys.executable,
    env: dict[str, str] | None = None,
    expect: Iterable[Outcome | str] = (Outcome.PASS,),
    fingerprint: dict[str, Any] | bool = True,
    out_dir: str | os.PathLike | None = None,
    serial: bool = False,
    cwd: str | os.PathLike | None = None,
) -> Result:
    """Run any Python file as ``__main__`` in a fresh interpreter, with the same verdicts.

    As ``python PATH ARGS`` would: in the caller's current directory (``cwd`` to choose
    another), so that relative paths in ``args`` and files the script writes relatively are
    where the caller expects them. ``path`` itself is resolved against the caller's directory.
    ``fingerprint``: True collects the interpreter's fingerprint (cached), False leaves it
    empty (no torch import at all), a dict is used as is.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"script not found: {path}")
    where = Path(cwd).resolve() if cwd is not None else Path.cwd()
    if not where.is_dir():
        raise NotADirectoryError(f"not a directory to run in: {where}")
    if fingerprint is True:
        from repro.harness.fingerprint import get_fingerprint

        fp = get_fingerprint(python)
    else:
        fp = dict(fingerprint) if isinstance(fingerprint, dict) else {}
    # The child starts in the run's work dir (so that `-m` puts nothing of the caller's on
    # sys.path) and changes to `where` just before the script runs.
    argv = [f"--script={path}", f"--scenario={path.name}", "--kind=script", f"--cwd={where}", "--", *map(str, args)]
    return _run(
        argv,
        scenario=path.name,
        variant="",
        kind="script",
        expected=frozenset(Outcome(e) for e in expect),
        reason="",
        timeout=float(timeout),
        python=python,
        env=dict(env or {}),
        params={"args": list(map(str, args)), "cwd": str(where)},
        fingerprint=fp,
        serial=serial,
        out_dir=out_dir,
        window=HANG_WINDOW,
    )


# -- the run itself -----------------------------------------------------------------------
def _ensure_subreaper() -> bool:
    global _SUBREAPER
    if _SUBREAPER is None:
        _SUBREAPER = ev.become_subreaper()
    return _SUBREAPER


def _run(
    child_args: list[str],
    *,
    scenario: str,
    variant: str,
    kind: str,
    expected: frozenset[Outcome],
    reason: str,
    timeout: float,
    python: str,
    env: dict[str, str],
    params: dict[str, Any],
    fingerprint: dict[str, Any],
    serial: bool,
    out_dir: str | os.PathLike | None,
    window: float,
    hang_where: tuple[str, ...] = (),
) -> Result:
    subreaper = _ensure_subreaper()
    token = uuid.uuid4().hex
    label = f"{scenario}-{variant}".strip("-").replace("/", "_").replace(":", "_")
    if out_dir is not None:
        run_dir = Path(out_dir) / f"{label}-{token[:8]}"
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = Path(tempfile.mkdtemp(prefix=f"splitrepro-{label}-"))
    work = run_dir / "work"
    evidence_dir = run_dir / "evidence"
    work.mkdir()
    evidence_dir.mkdir()
    # The tree's own temp dir (TMPDIR), removed once the tree is reaped: a killed scenario cannot
    # clean up its mkdtemp()s (socket dirs, servers' weight files). Short, beside the run dir
    # rather than inside it, so Unix socket paths made in it stay under the 108-byte limit.
    # A TMPDIR the caller sets explicitly is left alone.
    scratch = None if "TMPDIR" in (env or {}) else Path(tempfile.mkdtemp(prefix="sr-"))
    result_path = run_dir / "result.json"
    stdout_path, stderr_path = run_dir / "stdout.txt", run_dir / "stderr.txt"

    result = Result(
        scenario=scenario,
        variant=variant,
        kind=kind,
        outcome=Outcome.ERROR.value,
        expected=sorted(o.value for o in expected),
        expected_reason=reason,
        env=env,
        params=params,
        fingerprint=fingerprint,
        timeout=timeout,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    notes: list[str] = []
    if not subreaper:
        notes.append(
            "not a child subreaper here: orphans go to init; they are found by the run's session, "
            "the run token or having been seen in the tree"
        )
    readable, why = proc_readable()
    if not readable:
        notes.append(why)

    try:
        with run_lock(serial) as waited:
            if waited > 0.05:
                result.evidence["lock_wait_s"] = round(waited, 3)
            t0 = time.monotonic()
            deadline = t0 + timeout
            cmd = [
                python,
                "-m",
                "repro.harness.child",
                *_split_before_dashdash(child_args),
                f"--result={result_path}",
                f"--workdir={work}",
                f"--timeout={timeout!r}",
                f"--deadline={deadline!r}",
                *_after_dashdash(child_args),
            ]
            # The try opens before the start: an interruption (Ctrl-C, SIGTERM through the CLI)
            # at any point after Popen returns still kills the tree. One that comes while Popen
            # still runs (after the fork: it waits for the exec) loses the Popen object, but the
            # root is then a new child of this process leading a session of its own.
            proc: subprocess.Popen | None = None
            tree: ev.Tree | None = None
            children_before = _child_pids()
            try:
                with open(stdout_path, "wb") as so, open(stderr_path, "wb") as se:
                    proc = subprocess.Popen(
                        cmd,
                        stdin=subprocess.DEVNULL,
                        stdout=so,
                        stderr=se,
                        cwd=work,
                        env=child_env(
                            {**(env or {}), **({"TMPDIR": str(scratch)} if scratch else {})},
                            token=token,
                            evidence_dir=str(evidence_dir),
                        ),
                        start_new_session=True,
                    )
                tree = ev.Tree(proc.pid, token)
                # the run's session is the root's pid; with the root's start time it names the
                # run's processes after the run too (pids are reused)
                result.evidence["root"] = {"pid": proc.pid, "start": tree.root_start}
                detector = HangDetector(window=window, deadline=deadline)
                verdict = _watch(proc, tree, detector, deadline, readable)
                result.seconds = round(time.monotonic() - t0, 3)  # same origin as the deadline
                _finish(
                    result,
                    proc,
                    tree,
                    detector,
                    verdict,
                    t0,
                    run_dir,
                    evidence_dir,
                    result_path,
                    stderr_path,
                    notes,
                    window,
                )
                if result.outcome == Outcome.HANG.value and hang_where:
                    _check_hang_where(result, hang_where, notes)
            except BaseException:
                # interrupted (Ctrl-C, SIGTERM/SIGHUP through the CLI, pytest-timeout) or a harness
                # bug: never leave the tree behind
                if proc is not None:
                    (tree or ev.Tree(proc.pid, token)).kill_all(proc)
                else:
                    _kill_unowned_roots(_child_pids() - children_before, token)
                raise
    except KeyboardInterrupt:
        # the user stopped it (also while waiting for the run lock): no verdict, so no evidence
        # to keep unless asked. Anything else (pytest-timeout, a harness bug) keeps the directory.
        if out_dir is None and os.environ.get("SPLITREPRO_KEEP") != "1":
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if scratch is not None:
            left = _remove_scratch(scratch)
            if left:
                result.evidence["temp_left"] = left

    result.evidence["run_token"] = token
    result.evidence["pids"] = sorted(tree.seen)
    result.evidence["run_dir"] = str(run_dir)
    result.ok = Outcome(result.outcome) in expected and not result.evidence.get("survivors")
    if result.evidence.get("survivors"):
        notes.append("processes survived the kill: the run counts as failed")
    result.evidence["notes"] = notes
    keep = out_dir is not None or not result.ok or os.environ.get("SPLITREPRO_KEEP") == "1"
    shutil.rmtree(work, ignore_errors=True)
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
        result.evidence.pop("run_dir", None)
    else:
        (run_dir / "verdict.json").write_text(result.to_json())
    return result


def _child_pids() -> set[int]:
    try:
        return {c.pid for c in psutil.Process().children()}
    except psutil.Error:
        return set()


def _kill_unowned_roots(pids: set[int], token: str) -> None:
    """Kill and reap the trees of children started by an interrupted Popen (its object lost):
    those of ``pids`` that lead a session of their own (``start_new_session``), as a root does."""
    for pid in pids:
        try:
            if os.getsid(pid) != pid:
                continue  # not a root of ours: a child started some other way
        except OSError:
            continue
        ev.Tree(pid, token).kill_all()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # no Popen owns it: reap it here


def _remove_scratch(path: Path, shown: int = 20) -> list[str]:
    """Remove the tree's temp dir; return the names the tree left in it (evidence, at most
    ``shown`` of them, sorted)."""
    try:
        names = sorted(os.listdir(path))
    except OSError:
        names = []
    shutil.rmtree(path, ignore_errors=True)
    return names[:shown] + ([f"... {len(names) - shown} more"] if len(names) > shown else [])


def _split_before_dashdash(args: list[str]) -> list[str]:
    return args[: args.index("--")] if "--" in args else args


def _after_dashdash(args: list[str]) -> list[str]:
    return args[args.index("--") :] if "--" in args else []


def _watch(
    proc: subprocess.Popen, tree: ev.Tree, detector: HangDetector, deadline: float, readable: bool
) -> str | None:
    """Wait for exit, HANG or the deadline: None (exited), 'HANG' or 'TIMEOUT'."""
    pidfd = None
    poller = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(proc.pid)
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
        except OSError:
            pidfd = None
    try:
        while True:
            wait = max(0.0, min(SAMPLE_INTERVAL, deadline - time.monotonic()))
            if poller is not None:
                poller.poll(wait * 1000)
                if proc.poll() is not None:
                    return None
            else:
                try:
                    proc.wait(timeout=wait)
                    return None
                except subprocess.TimeoutExpired:
                    pass
            if readable:
                detector.sample(tree.pids())
                if detector.hung():
                    return "HANG"
            if time.monotonic() >= deadline:
                if proc.poll() is not None:
                    return None
                return "TIMEOUT"
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _read_child_result(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}


def _finish(
    result: Result,
    proc: subprocess.Popen,
    tree: ev.Tree,
    detector: HangDetector,
    verdict: str | None,
    t0: float,
    run_dir: Path,
    evidence_dir: Path,
    result_path: Path,
    stderr_path: Path,
    notes: list[str],
    window: float,
) -> None:
    evd = result.evidence
    stacks: dict[str, Any] = {}
    if verdict in ("HANG", "TIMEOUT"):
        detected_at = time.monotonic()
        snap = detector.last
        evd["threads"] = detector.table(snap)
        if verdict == "HANG":
            onset = (detector.quiet_since or detected_at) - t0
            evd["hang"] = {
                "detected_after_s": round(detected_at - t0, 3),
                "onset_estimate_s": round(onset, 3),
                "window_s": window,
                "samples": detector.samples,
            }
        elif not detector.samples:
            notes.append("quiescence not sampled: verdict from the deadline only")
        alive = tree.alive()
        t_st = time.monotonic()
        stacks = ev.stacks(alive, evidence_dir)
        evd["stacks_seconds"] = round(time.monotonic() - t_st, 3)
        evd["stacks"] = stacks
        kill = tree.kill_all(proc)
        evd["killed"] = kill["killed"]
        evd["survivors"] = kill["survivors"]
        child = _read_child_result(result_path)
        result.outcome = verdict
        if child.get("status") in ("pass", "fail", "error", "exit"):
            notes.append(
                f"the code had finished (result {child['status']!r}): the {verdict} is at interpreter shutdown "
                "(non-daemon threads, atexit handlers, or child processes joined at exit)"
            )
    else:
        child = _read_child_result(result_path)
        left = tree.alive(include_root=False)
        if left:
            # Descendants orphaned by the root's exit get a short grace to leave on their own:
            # multiprocessing's resource tracker, for one, exits when its pipe closes, just
            # after the root. Only what is still alive after the grace counts as left behind.
            ev.wait_gone(left, LEFTOVER_GRACE_S)
            left = tree.alive(include_root=False)
        described = tree.describe(left)
        kill = tree.kill_all(proc)
        extra = [p for p in kill["killed"] if p not in left and p != proc.pid]
        if left or extra:
            evd["left_behind"] = described + tree.describe(extra)
        evd["survivors"] = kill["survivors"]
        result.outcome = _outcome_from_exit(proc.returncode, child)
        if result.outcome == Outcome.CRASH.value and detector.last is not None:
            evd["threads"] = detector.table(detector.last)
            notes.append(
                f"threads: the last sample, {time.monotonic() - detector.last.t:.2f}s before the exit was seen"
            )

    rc = proc.returncode
    stderr_tail = ev.tail(stderr_path)
    fh = ev.faulthandler_files(evidence_dir)
    # faulthandler files of processes we dumped on purpose are stacks, not crash reports
    crash_fh = {pid: text for pid, text in fh.items() if pid not in stacks}
    if crash_fh:
        evd["faulthandler"] = crash_fh
    evd["stderr_tail"] = stderr_tail
    # Signatures anywhere in stderr, not only in its tail, and in the error the root recorded
    # (the child keeps it out of stderr: a DataLoader's "worker (pid N) is killed" is raised there).
    in_stderr, unread = ev.scan_signatures(stderr_path)
    if unread:
        notes.append(f"stderr is long: {unread} bytes in its middle not sought for signatures")
    error = child.get("error") or {}
    recorded = f"{error.get('type')}: {error.get('message')}" if error else ""
    found = set(in_stderr) | set(ev.match_signatures(recorded, *crash_fh.values()))
    evd["signatures"] = [name for name in ev.SIGNATURES if name in found]
    evd["termination"] = _termination(rc, child, verdict, evd["signatures"])
    evd["exit_code"] = rc
    if stacks:
        root_stack = stacks.get(str(proc.pid), {}).get("text", "")
        frame = ev.top_frame(root_stack)
        if not frame:
            for entry in stacks.values():
                frame = ev.top_frame(entry.get("text", ""))
                if frame:
                    break
        evd["top_frame"] = frame
    elif crash_fh:
        evd["top_frame"] = ev.top_frame(next(iter(crash_fh.values())))
    result.metrics = child.get("metrics", {})
    result.observations = child.get("observations", [])
    result.stage = child.get("stage")
    result.stages = child.get("stages", [])
    result.error = child.get("error")
    evd["child_status"] = child.get("status", "missing")
    if verdict == "HANG" and result.stages and child.get("t0_monotonic"):
        # latency from entering the last stage (where the hang began, at the latest) to the verdict
        last_stage_at = child["t0_monotonic"] + result.stages[-1][1]
        evd["hang"]["after_last_stage_s"] = round(t0 + evd["hang"]["detected_after_s"] - last_stage_at, 3)


def _check_hang_where(result: Result, patterns: tuple[str, ...], notes: list[str]) -> None:
    """A HANG counts as the variant's hazard only if the stacks show it where the variant says
    (``Variant.hang_where``); a hang anywhere else is an ERROR.

    Each entry (a pattern, or a :func:`~repro.harness.spec.together` group whose patterns must
    all match in one process) is sought process by process: a ``native:`` pattern only in the
    stacks that have native frames (py-spy --native), a Python one in every stack taken. An
    entry found in no process is *missing* (ERROR) only if no process could still hold it: a
    process whose stack (or native frames) could not be taken, and whose other patterns of the
    group matched, may be the one, so the entry is *unchecked*: the HANG stands, and the
    evidence and a note say what was not confirmed (the matrix report shows it)."""
    stacks = result.evidence.get("stacks") or {}
    entries = [e for e in stacks.values() if isinstance(e, dict)]
    if not any(e.get("text") for e in entries):
        notes.append("where the hang is was not checked (no stacks could be taken)")
        result.evidence["hang_where"] = {
            "checked": False,
            "expected": [pattern_label(p) for p in patterns],
            "missing": [],
            "unchecked": [pattern_label(p) for p in patterns],
        }
        return

    def searchable(e: dict, pattern: str) -> bool:
        return bool(e.get("text")) and (not pattern.startswith("native:") or e.get("method") == "py-spy --native")

    def matches(e: dict, pattern: str) -> bool:
        return re.search(pattern.removeprefix("native:"), e["text"], re.M) is not None

    missing, unchecked = [], []
    for entry in patterns:
        group = tuple(entry) if isinstance(entry, Together) else (entry,)
        # per process: does every pattern it could be searched for match, and could it be searched for all?
        fits = [(all(matches(e, p) for p in group if searchable(e, p)), all(searchable(e, p) for p in group)) for e in entries]
        if any(ok and complete for ok, complete in fits):
            continue
        (unchecked if any(ok and not complete for ok, complete in fits) else missing).append(entry)
    result.evidence["hang_where"] = {
        "checked": True,
        "expected": [pattern_label(p) for p in patterns],
        "missing": [pattern_label(p) for p in missing],
        "unchecked": [pattern_label(p) for p in unchecked],
    }
    if unchecked and not missing:
        notes.append(
            f"not confirmed (a process's stack or native frames could not be taken): {', '.join(map(pattern_label, unchecked))}"
        )
    if missing:
        top = result.evidence.get("top_frame") or "?"
        result.outcome = Outcome.ERROR.value
        result.error = {
            "type": "HangElsewhere",
            "message": f"hung, but not where the hazard hangs: no stack shows {'; '.join(map(pattern_label, missing))} "
            f"(top frame: {top})",
            "traceback": "",
        }


def _outcome_from_exit(rc: int | None, child: dict[str, Any]) -> str:
    status = child.get("status")
    if rc is not None and rc < 0:
        # killed by a signal: a crash whatever the code reported before (the termination says what)
        return Outcome.CRASH.value
    if rc == 0 and status == "pass":
        return Outcome.PASS.value
    if status == "fail":
        return Outcome.FAIL.value
    if status == "error":
        return Outcome.ERROR.value
    if status == "exit" and rc is not None and rc > 0:
        return Outcome.FAIL.value  # a deliberate sys.exit(n): the program's own verdict
    return Outcome.CRASH.value  # exit without a final result, or rc != 0 after pass


def _termination(rc: int | None, child: dict[str, Any], verdict: str | None, signatures: list[str]) -> dict[str, Any]:
    status = child.get("status", "missing")
    if verdict:
        # the kill comes after the stacks are taken: a root that ended meanwhile (the hang was
        # at interpreter shutdown and let go, or something else killed it) has its own status
        if rc is not None and rc >= 0:
            return {
                "kind": "exited-after-verdict",
                "code": rc,
                "description": f"exited {rc} on its own after the {verdict} verdict, before the harness's SIGKILL (the rest of its tree was killed)",
            }
        if rc is not None and rc != -signal.SIGKILL:
            try:  # a realtime signal is a valid number but no member of signal.Signals
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            return {
                "kind": "signal-after-verdict",
                "signal": name,
                "description": f"killed by {name} after the {verdict} verdict, before the harness's SIGKILL",
            }
        return {
            "kind": "killed-by-harness",
            "signal": "SIGKILL",
            "description": f"killed by the harness (SIGKILL) after {verdict}",
        }
    if rc is None:
        return {"kind": "unknown", "description": "exit status unknown"}
    if rc < 0:
        try:
            sig = signal.Signals(-rc)
            name, text = sig.name, signal.strsignal(sig) or ""
        except ValueError:
            name, text = f"signal {-rc}", ""
        kind = "abort" if name == "SIGABRT" else "signal"
        desc = f"killed by {name}" + (f" ({text})" if text else "")
        if status in ("pass", "fail", "error", "exit"):
            desc += f" after the code reported {status!r} (the signal came after its result was written)"
        return {"kind": kind, "signal": name, "description": desc}
    if rc == 0:
        if status == "pass":
            return {"kind": "exit", "code": 0, "description": "exited normally (0)"}
        return {
            "kind": "exit-without-result",
            "code": 0,
            "description": f"exited 0 but the result says {status!r} (os._exit before the end?)",
        }
    if status == "exit":
        code = child.get("exit_code", rc)
        return {
            "kind": "deliberate-exit",
            "code": rc,
            "deliberate": True,
            "description": f"deliberate exit: the program called sys.exit({code})",
        }
    if status in ("fail", "error"):
        return {"kind": "exit", "code": rc, "description": f"exited {rc} after reporting {status}"}
    if status == "pass":
        return {
            "kind": "exit-after-pass",
            "code": rc,
            "description": f"exited {rc} after the scenario passed (crash or exit at interpreter shutdown)",
        }
    mkl = [s for s in signatures if s in ("intel-mkl-error", "mkl-threading-layer-incompatible")]
    if mkl:
        return {
            "kind": "deliberate-native-exit",
            "code": rc,
            "deliberate": True,
            "description": f"deliberate exit({rc}) from native code with a message ({', '.join(mkl)}): MKL refused to run, not a crash by signal",
        }
    return {
        "kind": "exit-without-result",
        "code": rc,
        "description": f"exited with code {rc} without writing a final result (os._exit or exit() from native code; no signal)",
    }
