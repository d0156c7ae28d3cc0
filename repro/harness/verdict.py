"""Reading a process tree from /proc and deciding HANG.

HANG means the whole tree is quiescent: over a window (default 1.0 s) no thread of any
process gained a CPU tick, no process or thread came or went, and every live thread sat in an
*untimed* blocking wait, read from ``/proc/PID/task/TID/syscall``:

* ``futex`` WAIT / WAIT_BITSET / LOCK_PI / LOCK_PI2 / WAIT_REQUEUE_PI with a NULL timeout
  (argument 3) is untimed; with a timeout it is timed. CPython's ``Lock.acquire()`` is an
  untimed futex wait, ``acquire(timeout=..)`` a timed one, ``time.sleep`` is ``clock_nanosleep``
  (Python 3.11+) or ``select``/``pselect6`` of no descriptors (3.10).
* ``poll``/``epoll_wait`` with timeout -1, ``ppoll``/``pselect6``/``select`` with a NULL timeout,
  ``read``/``recvfrom``/``recvmsg``/``accept``/``wait4``/``waitid``/``pause``/``rt_sigsuspend``/
  ``write``/``sendto``/``connect``/``flock``/``semop``/``msgrcv`` are untimed.
* ``nanosleep``/``clock_nanosleep``, and ``select``/``pselect6``/``poll``/``ppoll`` of no
  descriptors with a timeout, are sleeps (timed).
* A timed wait (not a sleep) whose expiry cannot come before the run's hard deadline (the timeout is read
  from the syscall arguments, or from the target's memory through ``/proc/PID/mem`` for
  ``struct timespec`` pointers) is counted as blocked: it cannot end before the harness would
  call TIMEOUT anyway. This lets a scenario bound its own waits with ``ctx.remaining()``.
* ``running``, state ``R`` and state ``D`` (uninterruptible, usually I/O) are busy; zombies
  are ignored; any other syscall is "other" and never counts as blocked.

Nothing here imports torch (the harness parent uses it).
"""

from __future__ import annotations

import os
import platform
import struct
import time
from dataclasses import dataclass, field
from typing import Any

# -- syscall tables ---------------------------------------------------------------------
# name -> number, for the architectures we can read. Only the calls the classifier needs.
_X86_64 = {
    "read": 0,
    "write": 1,
    "poll": 7,
    "readv": 19,
    "writev": 20,
    "select": 23,
    "pause": 34,
    "nanosleep": 35,
    "connect": 42,
    "accept": 43,
    "sendto": 44,
    "recvfrom": 45,
    "sendmsg": 46,
    "recvmsg": 47,
    "wait4": 61,
    "semop": 65,
    "msgrcv": 70,
    "flock": 73,
    "rt_sigtimedwait": 128,
    "rt_sigsuspend": 130,
    "futex": 202,
    "semtimedop": 220,
    "clock_nanosleep": 230,
    "epoll_wait": 232,
    "waitid": 247,
    "pselect6": 270,
    "ppoll": 271,
    "epoll_pwait": 281,
    "accept4": 288,
    "recvmmsg": 299,
    "epoll_pwait2": 441,
    "futex_waitv": 449,
}
_AARCH64 = {
    "read": 63,
    "write": 64,
    "readv": 65,
    "writev": 66,
    "pselect6": 72,
    "ppoll": 73,
    "nanosleep": 101,
    "clock_nanosleep": 115,
    "rt_sigsuspend": 133,
    "rt_sigtimedwait": 137,
    "epoll_pwait": 22,
    "flock": 32,
    "waitid": 95,
    "futex": 98,
    "msgrcv": 188,
    "semtimedop": 192,
    "semop": 193,
    "accept": 202,
    "connect": 203,
    "sendto": 206,
    "recvfrom": 207,
    "sendmsg": 211,
    "recvmsg": 212,
    "recvmmsg": 243,
    "accept4": 242,
    "wait4": 260,
    "epoll_pwait2": 441,
    "futex_waitv": 449,
}
SYSCALL_TABLES = {"x86_64": _X86_64, "aarch64": _AARCH64}

# Calls that block without any timeout argument.
UNTIMED_CALLS = frozenset(
    {
        "read",
        "readv",
        "write",
        "writev",
        "pause",
        "connect",
        "accept",
        "accept4",
        "sendto",
        "sendmsg",
        "recvfrom",
        "recvmsg",
        "wait4",
        "waitid",
        "semop",
        "msgrcv",
        "flock",
        "rt_sigsuspend",
    }
)
SLEEP_CALLS = frozenset({"nanosleep", "clock_nanosleep"})

FUTEX_CMD_MASK = ~(128 | 256)  # FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME
FUTEX_CLOCK_REALTIME = 256
_FUTEX_WAITS = {0: "WAIT", 6: "LOCK_PI", 9: "WAIT_BITSET", 11: "WAIT_REQUEUE_PI", 13: "LOCK_PI2"}
_FUTEX_ABSOLUTE = {"LOCK_PI", "WAIT_BITSET", "WAIT_REQUEUE_PI", "LOCK_PI2"}
CLOCK_REALTIME, CLOCK_MONOTONIC = 0, 1
TIMER_ABSTIME = 1

# Tolerance on a timed wait's expiry versus the deadline: the moment a thread entered a wait
# is only known to within a sampling interval.
EXPIRY_SLACK_S = 0.3


def machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def _names(arch: str) -> dict[int, str]:
    return {nr: name for name, nr in SYSCALL_TABLES.get(arch, {}).items()}


@dataclass
class ThreadState:
    pid: int
    tid: int
    name: str
    state: str  # kernel state letter: R S D Z T t X I
    ticks: int  # utime + stime, clock ticks
    syscall: str  # name, number as text, 'running', 'none' or 'unreadable'
    wait: str  # 'untimed' | 'timed' | 'sleep' | 'busy' | 'other' | 'zombie' | 'unknown'
    detail: str = ""  # e.g. 'futex WAIT_PRIVATE, no timeout'
    wchan: str = ""
    expires: float | None = None  # monotonic time the timed wait ends, when known
    raw: str = ""

    def key(self) -> tuple:
        return (self.pid, self.tid)

    def as_dict(self) -> dict[str, Any]:
        d = {
            "tid": self.tid,
            "name": self.name,
            "state": self.state,
            "syscall": self.syscall,
            "wait": self.wait,
            "detail": self.detail,
            "wchan": self.wchan,
            "cpu_ticks": self.ticks,
        }
        if self.expires is not None:
            d["expires_in_s"] = round(self.expires - time.monotonic(), 3)
        return d


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return None


def parse_stat(text: str) -> tuple[str, str, int, dict[str, int]]:
    """(comm, state, utime+stime, extra) from a /proc stat line; comm may hold spaces."""
    lp, rp = text.index("("), text.rindex(")")
    comm = text[lp + 1 : rp]
    rest = text[rp + 2 :].split()
    # rest[0] is field 3 (state); utime field 14 -> rest[11], stime field 15 -> rest[12]
    state = rest[0]
    ticks = int(rest[11]) + int(rest[12])
    extra = {"ppid": int(rest[1]), "pgrp": int(rest[2]), "session": int(rest[3]), "starttime": int(rest[19])}
    return comm, state, ticks, extra


def _read_mem(pid: int, addr: int, size: int) -> bytes | None:
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, size, addr)
        return data if len(data) == size else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _timespec(pid: int, addr: int) -> float | None:
    raw = _read_mem(pid, addr, 16)
    if raw is None:
        return None
    sec, nsec = struct.unpack("<qq", raw)
    return sec + nsec / 1e9


def _timeval(pid: int, addr: int) -> float | None:
    raw = _read_mem(pid, addr, 16)
    if raw is None:
        return None
    sec, usec = struct.unpack("<qq", raw)
    return sec + usec / 1e6


def _abs_to_monotonic(value: float, clock: int) -> float:
    if clock == CLOCK_REALTIME:
        return time.monotonic() + (value - time.time())
    return value  # CLOCK_MONOTONIC and friends share the timebase of time.monotonic()


class Classification:
    __slots__ = ("wait", "detail", "relative", "absolute")

    def __init__(self, wait: str, detail: str, relative: float | None = None, absolute: float | None = None):
        self.wait, self.detail, self.relative, self.absolute = wait, detail, relative, absolute


def classify_syscall(pid: int, name: str, args: list[int]) -> Classification:
    """How a thread blocked in ``name(args)`` waits: untimed, timed (with its timeout), sleep, other."""

    def timed_rel(sec: float | None, what: str) -> Classification:
        if sec is None:
            return Classification("timed", f"{what}, timeout unreadable")
        return Classification("timed", f"{what}, timeout {sec:.3f}s", relative=sec)

    if name in UNTIMED_CALLS:
        return Classification("untimed", name)
    if name == "futex":
        op = args[1] & FUTEX_CMD_MASK
        cmd = _FUTEX_WAITS.get(op)
        if cmd is None:
            return Classification("other", f"futex op {op}")
        label = f"futex {cmd}{'_PRIVATE' if args[1] & 128 else ''}"
        if args[3] == 0:
            return Classification("untimed", f"{label}, no timeout")
        value = _timespec(pid, args[3])
        if value is None:
            return Classification("timed", f"{label}, timeout unreadable")
        if cmd in _FUTEX_ABSOLUTE:
            clock = CLOCK_REALTIME if (cmd == "LOCK_PI" or args[1] & FUTEX_CLOCK_REALTIME) else CLOCK_MONOTONIC
            at = _abs_to_monotonic(value, clock)
            return Classification("timed", f"{label}, until {at - time.monotonic():+.3f}s", absolute=at)
        return timed_rel(value, label)
    if name == "futex_waitv":
        if args[3] == 0:
            return Classification("untimed", "futex_waitv, no timeout")
        value = _timespec(pid, args[3])
        if value is None:
            return Classification("timed", "futex_waitv, timeout unreadable")
        at = _abs_to_monotonic(value, args[4])
        return Classification("timed", f"futex_waitv, until {at - time.monotonic():+.3f}s", absolute=at)
    if name == "nanosleep":
        return Classification("sleep", "nanosleep", relative=_timespec(pid, args[0]))
    if name == "clock_nanosleep":
        value = _timespec(pid, args[2])
        if value is not None and args[1] & TIMER_ABSTIME:
            return Classification("sleep", "clock_nanosleep (absolute)", absolute=_abs_to_monotonic(value, args[0]))
        return Classification("sleep", "clock_nanosleep", relative=value)
    if name == "poll":
        ms = _signed32(args[2])
        if ms < 0:
            return Classification("untimed", "poll, no timeout")
        if args[1] == 0:  # no descriptors: a sleep
            return Classification("sleep", "poll of no descriptors", relative=ms / 1000.0)
        return timed_rel(ms / 1000.0, "poll")
    if name in ("epoll_wait", "epoll_pwait"):
        ms = _signed32(args[3])
        if ms < 0:
            return Classification("untimed", f"{name}, no timeout")
        return timed_rel(ms / 1000.0, name)
    if name == "epoll_pwait2":
        if args[3] == 0:
            return Classification("untimed", "epoll_pwait2, no timeout")
        return timed_rel(_timespec(pid, args[3]), "epoll_pwait2")
    if name == "ppoll":
        if args[2] == 0:
            return Classification("untimed", "ppoll, no timeout")
        if args[1] == 0:
            return Classification("sleep", "ppoll of no descriptors", relative=_timespec(pid, args[2]))
        return timed_rel(_timespec(pid, args[2]), "ppoll")
    # select/pselect6 with no descriptors (nfds 0) and a timeout is a sleep: CPython 3.10 and
    # older implement time.sleep() exactly so (libc select, which is pselect6 on some libcs)
    if name == "pselect6":
        if args[4] == 0:
            return Classification("untimed", "pselect6, no timeout")
        if args[0] == 0:
            return Classification("sleep", "pselect6 of no descriptors", relative=_timespec(pid, args[4]))
        return timed_rel(_timespec(pid, args[4]), "pselect6")
    if name == "select":
        if args[4] == 0:
            return Classification("untimed", "select, no timeout")
        if args[0] == 0:
            return Classification("sleep", "select of no descriptors", relative=_timeval(pid, args[4]))
        return timed_rel(_timeval(pid, args[4]), "select")
    if name == "rt_sigtimedwait":
        if args[2] == 0:
            return Classification("untimed", "rt_sigtimedwait, no timeout")
        return timed_rel(_timespec(pid, args[2]), "rt_sigtimedwait")
    if name == "semtimedop":
        if args[3] == 0:
            return Classification("untimed", "semtimedop, no timeout")
        return timed_rel(_timespec(pid, args[3]), "semtimedop")
    return Classification("other", name)


def _signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def read_thread(pid: int, tid: int, names: dict[int, str]) -> ThreadState | None:
    base = f"/proc/{pid}/task/{tid}"
    stat = _read(f"{base}/stat")
    if stat is None:
        return None
    try:
        comm, state, ticks, _ = parse_stat(stat)
    except (ValueError, IndexError):
        return None
    wchan = (_read(f"{base}/wchan") or "").strip()
    if wchan == "0":
        wchan = ""
    if state in ("Z", "X"):
        return ThreadState(pid, tid, comm, state, ticks, "none", "zombie", wchan=wchan)
    raw = _read(f"{base}/syscall")
    if raw is None or not raw.strip():
        return ThreadState(pid, tid, comm, state, ticks, "unreadable", "unknown", "syscall file unreadable", wchan)
    raw = raw.strip()
    if state in ("R", "D"):
        what = (
            "running"
            if raw == "running"
            else (names.get(int(raw.split()[0]), raw.split()[0]) if raw.split()[0].lstrip("-").isdigit() else raw)
        )
        return ThreadState(
            pid,
            tid,
            comm,
            state,
            ticks,
            str(what),
            "busy",
            "runnable" if state == "R" else "uninterruptible (D)",
            wchan,
            raw=raw,
        )
    if raw == "running":
        return ThreadState(pid, tid, comm, state, ticks, "running", "busy", "", wchan, raw=raw)
    parts = raw.split()
    if parts[0] == "-1":
        return ThreadState(pid, tid, comm, state, ticks, "none", "busy", "blocked outside a syscall", wchan, raw=raw)
    try:
        nr = int(parts[0])
        args = [int(a, 16) for a in parts[1:7]]
    except (ValueError, IndexError):
        return ThreadState(pid, tid, comm, state, ticks, raw, "unknown", "unparsed syscall line", wchan, raw=raw)
    name = names.get(nr, str(nr))
    if state in ("T", "t"):
        return ThreadState(pid, tid, comm, state, ticks, name, "other", "stopped", wchan, raw=raw)
    cls = classify_syscall(pid, name, args)
    ts = ThreadState(pid, tid, comm, state, ticks, name, cls.wait, cls.detail, wchan, raw=raw)
    if cls.absolute is not None:
        ts.expires = cls.absolute
    ts._relative = cls.relative  # type: ignore[attr-defined]
    return ts


@dataclass
class Snapshot:
    t: float
    threads: dict[tuple, ThreadState] = field(default_factory=dict)
    processes: dict[int, dict[str, Any]] = field(default_factory=dict)  # pid -> {name, ppid, state, cmdline}


def proc_readable() -> tuple[bool, str]:
    """Whether quiescence can be read here, and why not."""
    if not os.path.isdir("/proc/self/task"):
        return False, "no /proc: deadline only"
    if machine() not in SYSCALL_TABLES:
        return False, f"no syscall table for {machine()}: deadline only"
    raw = _read(f"/proc/self/task/{os.getpid()}/syscall")
    if raw is None or not raw.strip():
        return False, "/proc/PID/task/TID/syscall unreadable: deadline only"
    return True, ""


class HangDetector:
    """Feed it the tree's pids every sample; it says when the tree has been quiescent for a window.

    ``deadline`` (monotonic) lets timed waits that expire after it count as blocked.
    """

    def __init__(self, *, window: float = 1.0, deadline: float | None = None, arch: str | None = None):
        self.window = float(window)
        self.deadline = deadline
        self.names = _names(arch or machine())
        self.last: Snapshot | None = None
        self.quiet_since: float | None = None  # time of the first sample of the quiescent run
        self.samples = 0
        self._first_seen: dict[tuple, float] = {}
        self.last_busy: float | None = None

    def sample(self, pids: list[int], now: float | None = None) -> Snapshot:
        now = time.monotonic() if now is None else now
        snap = Snapshot(now)
        for pid in pids:
            tids = _listdir(f"/proc/{pid}/task")
            if tids is None:
                continue
            stat = _read(f"/proc/{pid}/stat")
            info: dict[str, Any] = {"pid": pid}
            if stat:
                try:
                    comm, state, _, extra = parse_stat(stat)
                    info.update(
                        name=comm, state=state, ppid=extra["ppid"], pgrp=extra["pgrp"], session=extra["session"]
                    )
                except (ValueError, IndexError):
                    pass
            cmd = _read(f"/proc/{pid}/cmdline")
            if cmd:
                info["cmdline"] = cmd.replace("\0", " ").strip()[:300]
            snap.processes[pid] = info
            for tid in tids:
                ts = read_thread(pid, tid, self.names)
                if ts is not None:
                    snap.threads[ts.key()] = ts
        self._resolve_expiry(snap)
        self._update(snap)
        return snap

    def _resolve_expiry(self, snap: Snapshot) -> None:
        """Give relative timed waits an expiry and mark those that reach the deadline.

        A thread's wait began at most at ``first_seen`` (the first sample showing the same
        syscall line and CPU ticks), so a relative timeout ends by ``first_seen + timeout``.
        """
        prev = self.last.threads if self.last else {}
        first_seen: dict[tuple, float] = {}
        for key, ts in snap.threads.items():
            old = prev.get(key)
            if old is not None and old.raw == ts.raw and old.ticks == ts.ticks:
                first_seen[key] = self._first_seen.get(key, snap.t)
            else:
                first_seen[key] = snap.t
            rel = getattr(ts, "_relative", None)
            if ts.expires is None and rel is not None:
                ts.expires = first_seen[key] + rel
            # Sleeps are passage of time, never a hang; only timed *waits* qualify.
            if ts.wait == "timed" and ts.expires is not None and self.deadline is not None:
                if ts.expires >= self.deadline - EXPIRY_SLACK_S:
                    ts.detail += " (ends at/after the deadline: counted as blocked)"
                    ts.wait = "timed-past-deadline"
        self._first_seen = first_seen

    @staticmethod
    def blocked(ts: ThreadState) -> bool:
        return ts.wait in ("untimed", "timed-past-deadline", "zombie")

    def _update(self, snap: Snapshot) -> None:
        self.samples += 1
        live = {k: t for k, t in snap.threads.items() if t.wait != "zombie"}
        quiet = bool(live) and all(self.blocked(t) for t in live.values())
        same = False
        if self.last is not None and quiet:
            prev_live = {k: t for k, t in self.last.threads.items() if t.wait != "zombie"}
            # same threads, no CPU tick gained, and no thread moved to another wait (a wake-up
            # shorter than a clock tick still changes the syscall line)
            same = prev_live.keys() == live.keys() and all(
                prev_live[k].ticks == live[k].ticks and prev_live[k].raw == live[k].raw for k in live
            )
        if not quiet:
            self.quiet_since = None
            self.last_busy = snap.t
        elif self.quiet_since is None or not same:
            self.quiet_since = snap.t
        self.last = snap

    def hung(self) -> bool:
        return self.quiet_since is not None and self.last is not None and self.last.t - self.quiet_since >= self.window

    def quiet_for(self) -> float:
        if self.quiet_since is None or self.last is None:
            return 0.0
        return self.last.t - self.quiet_since

    def table(self, snap: Snapshot | None = None) -> dict[str, Any]:
        """Per process, per OS thread: what it waits in (JSON-ready)."""
        snap = snap or self.last
        if snap is None:
            return {}
        out: dict[str, Any] = {}
        for pid, info in snap.processes.items():
            threads = [t.as_dict() for (p, _), t in sorted(snap.threads.items()) if p == pid]
            out[str(pid)] = {**{k: v for k, v in info.items() if k != "pid"}, "threads": threads}
        return out


def _listdir(path: str) -> list[int] | None:
    try:
        return [int(n) for n in os.listdir(path) if n.isdigit()]
    except OSError:
        return None
