"""Process-tree helpers shared by the DataLoader / pipeline / import scenarios.

No torch here. ``psutil`` only. Nothing sleeps to synchronise: waits are bounded waits on
the processes themselves (``psutil.wait_procs``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# multiprocessing's own helper processes: they live until the interpreter exits and are
# neither zombies nor orphans of a scenario
_MP_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def proc_key(pid: int) -> tuple[int, float] | None:
    """(pid, create_time): survives pid reuse."""
    import psutil

    try:
        return (pid, psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def thread_states(pid: int) -> list[dict[str, Any]]:
    """Per-thread state of a live process from /proc (Linux): state, wchan, syscall nr and
    the futex timeout argument (0: untimed wait)."""
    out: list[dict[str, Any]] = []
    base = Path(f"/proc/{pid}/task")
    try:
        tids = sorted(base.iterdir(), key=lambda p: int(p.name))
    except OSError:
        return out
    for tdir in tids:
        row: dict[str, Any] = {"tid": int(tdir.name)}
        try:
            stat = (tdir / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            row["state"] = fields[0]
            row["cpu_ticks"] = int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
        for name in ("wchan", "syscall"):
            try:
                row[name] = (tdir / name).read_text().strip()
            except OSError:
                pass
        sc = row.get("syscall", "").split()
        if sc and sc[0] == "202":  # futex(uaddr, op, val, timeout, ...)
            row["futex_timeout_arg"] = sc[4] if len(sc) > 4 else None
        out.append(row)
    return out


def untimed_futex_waiters(pid: int) -> tuple[int, int]:
    """(threads in an untimed futex wait, all threads)."""
    states = thread_states(pid)
    n = sum(1 for s in states if s.get("futex_timeout_arg") == "0x0")
    return n, len(states)


def stacks_of(pids: Iterable[int], *, own_threads: bool = False) -> dict[str, str]:
    """Evidence for a run that went wrong without hanging (the harness only dumps stacks of a
    HANG): py-spy (native frames where it can) of each live pid, and with ``own_threads`` a
    faulthandler dump of every thread of this process. Bounded (py-spy timeout 10 s)."""
    import faulthandler
    import tempfile

    from repro.harness import evidence as ev

    out: dict[str, str] = {}
    if own_threads:
        with tempfile.TemporaryFile("w+") as fh:
            faulthandler.dump_traceback(fh, all_threads=True)
            fh.seek(0)
            out[f"{os.getpid()} (self, faulthandler)"] = fh.read()[-6000:]
    pids = [p for p in pids if p and p != os.getpid()]
    if pids:
        where = os.environ.get("SPLITREPRO_EVIDENCE_DIR") or tempfile.gettempdir()
        for pid, entry in ev.stacks(pids, where, timeout=10.0).items():
            out[f"{pid} ({entry.get('method', 'none')})"] = (entry.get("text") or str(entry))[-6000:]
    return out


def _is_mp_helper(p) -> bool:
    try:
        cmd = " ".join(p.cmdline())
    except Exception:
        return False
    return any(h in cmd for h in _MP_HELPERS)


def check_reaped(
    ctx,
    keys: Iterable[tuple[int, float] | int | None],
    *,
    wait: float = 10.0,
    label: str = "",
    since: float | None = None,
) -> dict:
    """Fail the scenario if any process in ``keys`` still exists (orphan or zombie) after a
    bounded wait, or if this process has a zombie / unexpected child left. Records the check.

    ``keys``: ``(pid, create_time)`` pairs, or bare pids together with ``since`` (epoch
    seconds): a live process with that pid created at or after ``since`` is counted as ours."""
    import psutil

    keys = [k for k in keys if k]
    alive = []
    for k in keys:
        pid, ctime = (k, None) if isinstance(k, int) else k
        try:
            p = psutil.Process(pid)
            ours = (
                p.create_time() == ctime if ctime is not None else (since is not None and p.create_time() >= since - 1)
            )
            if ours:
                alive.append(p)
        except psutil.Error:
            pass
    # a child of ours that already exited is reaped by wait_procs; others we only watch
    gone, still = psutil.wait_procs(alive, timeout=wait) if alive else ([], [])
    me = psutil.Process()
    zombies, leftovers, helpers = [], [], []
    for c in me.children(recursive=True):
        try:
            status = c.status()
        except psutil.Error:
            continue
        if status == psutil.STATUS_ZOMBIE:
            zombies.append(c.pid)
        elif _is_mp_helper(c):
            helpers.append(c.pid)
        else:
            leftovers.append(c.pid)
    left = []
    for p in still:
        try:
            left.append({"pid": p.pid, "status": p.status(), "ppid": p.ppid()})
        except psutil.Error:
            pass
    summary = {
        "watched": len(keys),
        "survivors": left,
        "zombie_children": zombies,
        "other_children": leftovers,
        "mp_helpers": helpers,
    }
    if left or leftovers:
        summary["stacks"] = stacks_of([d["pid"] for d in left] + leftovers)
    ctx.record(**{f"reaped{('_' + label) if label else ''}": summary})
    ctx.check(not left, f"processes survived the variant{(' (' + label + ')') if label else ''}: {left}")
    ctx.check(not zombies, f"zombie children left: {zombies}")
    ctx.check(not leftovers, f"children left running: {leftovers}")
    return summary


def fork_run(ctx, child, *, stage: str, after_fork=None) -> int:
    """``os.fork()``; the child runs ``child()`` and exits with its return value (None: 0; an
    exception: 70, traceback on stderr) and never returns into the harness. The parent runs
    ``after_fork`` (if any), enters ``stage``, waits for the child until the scenario's
    deadline (pidfd, no polling sleep), and reaps it on every path: a child still running at
    the deadline is killed and the scenario fails. Returns the child's exit code."""
    import select
    import signal

    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            code = child() or 0
        except BaseException:  # noqa: BLE001 - reported through the exit code
            import traceback

            traceback.print_exc()
            code = 70
        finally:
            os._exit(code)
    status = None
    try:
        ctx.record(child_pid=pid)
        if after_fork is not None:
            after_fork()
        ctx.stage(stage)
        if not hasattr(os, "pidfd_open"):  # Linux < 5.3: an unbounded wait (the harness still times it out)
            _, status = os.waitpid(pid, 0)
        else:
            fd = os.pidfd_open(pid)
            try:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                if poller.poll(max(0.0, ctx.remaining()) * 1000):
                    _, status = os.waitpid(pid, 0)
            finally:
                os.close(fd)
    finally:
        if status is None:  # still running at our deadline (or we were interrupted): reap it
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    if status is None:
        ctx.fail(f"forked child {pid} still in stage {stage!r} after the deadline")
    return os.waitstatus_to_exitcode(status)


def run_python(args: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd: str | None = None):
    """Run ``python args...`` (this interpreter) with captured output; always reaped.
    Returns (returncode or None on timeout, stdout, stderr, seconds)."""
    import time

    full_env = dict(os.environ)
    if env is not None:
        for k, v in env.items():
            if v is None:
                full_env.pop(k, None)
            else:
                full_env[k] = v
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=cwd
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        rc = None
    return rc, out, err, time.monotonic() - t0
