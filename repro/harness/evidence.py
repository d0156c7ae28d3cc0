"""Evidence about a scenario's process tree, and its removal.

* :class:`Tree` finds every process of a run: the root's descendants, the members of the run's
  session (the root leads a session of its own; found after their parent died, whatever their
  environment), any process whose environment carries the run's ``SPLITREPRO_RUN_TOKEN`` (found
  even after ``setsid`` + double fork), every process once seen in the tree, and the
  descendants of all of these. See :class:`Tree` for the one kind of process it cannot see.
* :func:`stacks` gets Python stacks of every process: ``py-spy dump --native``, then plain
  ``py-spy dump``, then SIGUSR1 -> faulthandler file (``_site/sitecustomize.py``), saying which.
* :func:`match_signatures` names known messages in texts, :func:`scan_signatures` in a whole
  file (stderr), read in chunks.
* :meth:`Tree.kill_all` SIGKILLs the tree, reaps what the harness may reap, and reports survivors.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

PR_SET_CHILD_SUBREAPER = 36

# name -> regex matched against stderr (and faulthandler output)
SIGNATURES: dict[str, str] = {
    "abseil-mutex-raw-lock-blocking": r"RAW: Lock blocking",
    "omp-error-15-duplicate-runtime": r"OMP: Error #15",
    "mkl-threading-layer-incompatible": r"MKL_THREADING_LAYER=INTEL is incompatible",
    "intel-mkl-error": r"INTEL MKL ERROR",
    "cuda-reinit-in-forked-child": r"Cannot re-initialize CUDA in forked subprocess",
    "dataloader-worker-died": r"DataLoader worker \(pid",
    "python-fatal-error": r"Fatal Python error",
    "segmentation-fault": r"Segmentation fault",
    "bus-error": r"Bus error",
    "aborted": r"Aborted|Abort trap|SIGABRT",
    "terminate-called": r"terminate called after throwing",
    "out-of-memory": r"Out of memory|MemoryError|std::bad_alloc|CUDA out of memory",
    "omp-warning": r"OMP: (Warning|Info) #\d+",
    "libgomp-error": r"libgomp: ",
    "resource-tracker-leak": r"resource_tracker: There appear to be \d+ leaked",
    "too-many-open-files": r"Too many open files",
    "broken-pipe": r"BrokenPipeError|Broken pipe",
    "fork-with-threads-warning": r"DeprecationWarning: This process .* is multi-threaded, use of fork\(\) may lead to deadlocks",
}
_COMPILED = {name: re.compile(rx) for name, rx in SIGNATURES.items()}


def match_signatures(*texts: str) -> list[str]:
    joined = "\n".join(t for t in texts if t)
    return [name for name, rx in _COMPILED.items() if rx.search(joined)]


SCAN_LIMIT = 32 << 20  # bytes of a file sought for signatures: all of it, or its first and last half of this
SCAN_CHUNK = 1 << 20
_OVERLAP = 4096  # bytes kept across a cut inside a line longer than a chunk


def scan_signatures(
    path: str | os.PathLike, *, limit: int = SCAN_LIMIT, chunk: int = SCAN_CHUNK
) -> tuple[list[str], int]:
    """Known messages anywhere in the file (not only in its tail), and how many bytes were not
    read. The file is streamed in chunks cut after a line end (every signature lies within one
    line), so memory stays about one chunk; a file over ``limit`` bytes is read in its first and
    last ``limit // 2`` bytes only (a message is printed early or at the end, and 1 MiB costs
    some 30 ms of matching). Names come in :data:`SIGNATURES` order."""
    pending = dict(_COMPILED)
    found: set[str] = set()
    try:
        fh = open(path, "rb")
    except OSError:
        return [], 0
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size <= limit:
            spans, skipped = [(0, size)], 0
        else:
            half = limit // 2
            spans, skipped = [(0, half), (size - half, size)], size - 2 * half
        for start, end in spans:
            fh.seek(start)
            left, carry = end - start, b""
            while left > 0 and pending:
                data = fh.read(min(chunk, left))
                if not data:
                    break
                left -= len(data)
                buf = carry + data
                if left <= 0:
                    text, carry = buf, b""
                else:
                    cut = buf.rfind(b"\n") + 1
                    if cut:  # whole lines now, the unfinished one with the next chunk
                        text, carry = buf[:cut], buf[cut:]
                    else:  # one line longer than a chunk: search it, keep its end for a message cut in two
                        text, carry = buf, buf[-_OVERLAP:]
                decoded = text.decode("utf-8", "replace")
                for name, rx in list(pending.items()):
                    if rx.search(decoded):
                        found.add(name)
                        del pending[name]
    return [name for name in _COMPILED if name in found], skipped


def tail(path: str | os.PathLike, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    return ("…" + text) if size > limit else text


def become_subreaper() -> bool:
    """Make this process a child subreaper (Linux): orphans of a run reparent here."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _has_token(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return needle in fh.read()
    except OSError:
        return False


class Tree:
    """The processes of one run.

    The root is started with ``start_new_session=True``, so its pid is the id of the run's
    session. A process belongs to the run when it is

    * the root (its pid with the root's start time),
    * a member of the run's session started no earlier than the root (the kernel keeps the
      session's id from being reused as a pid while any member lives; the start time keeps out
      processes older than the run),
    * a carrier of the run token in its environment (found after ``setsid`` too),
    * a process once found in the tree, recognised by pid and start time after it was reparented
      (to the harness, a child subreaper, or to init), left the session or dropped the token,
    * or a descendant of any of these.

    Orphans adopted by the harness are found through these rules, not through their parent: a
    process that calls ``setsid`` *and* runs without the token *and* loses its parent before a
    scan sees it (the harness scans every 0.15 s while the run lasts, and at its end) is not
    found; nothing ties it to the run any more.
    """

    def __init__(self, root_pid: int, token: str, root_start: int | None = None):
        self.root_pid = root_pid
        self.token = token
        self._needle = f"SPLITREPRO_RUN_TOKEN={token}\0".encode()
        self._not_ours: dict[int, int] = {}  # pid -> starttime known not to carry the token
        self.seen: dict[int, str] = {}  # pid -> name: every process ever seen in the tree
        self._tracked: dict[int, int] = {}  # pid -> starttime of every process ever seen in the tree
        self.session = root_pid  # start_new_session: the root leads its own session
        self.has_proc = os.path.isdir("/proc/self")
        # The root's start time (clock ticks since boot), read while the root cannot have been
        # reaped yet (right after Popen), or given (a tree rebuilt after the run, in tests).
        self.root_start = root_start if root_start is not None else _start_time(root_pid)

    def _scan(self) -> tuple[set[int], dict[int, tuple[int, int, int]]]:
        """One pass over /proc: (pids carrying the token, pid -> (ppid, session, start time) of
        every process)."""
        found: set[int] = set()
        procs: dict[int, tuple[int, int, int]] = {}
        me = os.getpid()
        try:
            names = os.listdir("/proc")
        except OSError:
            return found, procs
        for name in names:
            if not name.isdigit():
                continue
            pid = int(name)
            stat = _stat_fields(pid)
            if stat is None:
                continue
            procs[pid] = stat
            if pid == me:
                continue
            start = stat[2]
            if self._not_ours.get(pid) == start:
                continue  # environ is fixed at exec: a process seen without the token keeps lacking it
            if _has_token(pid, self._needle):
                found.add(pid)
            else:
                self._not_ours[pid] = start
        return found, procs

    def token_scan(self) -> set[int]:
        return self._scan()[0] if self.has_proc else set()

    def _ours(self, pid: int, ppid_sid_start: tuple[int, int, int]) -> bool:
        """Whether a process is of the run by itself (not as a descendant): the root, a member
        of the run's session, or a process tracked since it was seen in the tree."""
        _, sid, start = ppid_sid_start
        if self.root_start is None:
            return pid == self.root_pid  # no start time to tell the root from a reused pid
        if pid == self.root_pid:
            return start == self.root_start
        if sid == self.session and start >= self.root_start:
            return True
        return self._tracked.get(pid) == start

    def pids(self, include_root: bool = True) -> list[int]:
        """Live (or zombie) processes of the run, root first (see the class's docstring)."""
        if self.has_proc:
            tokened, procs = self._scan()
            children: dict[int, list[int]] = {}
            for pid, (ppid, _, _) in procs.items():
                children.setdefault(ppid, []).append(pid)
            found: set[int] = set()
            stack = [*tokened, *(pid for pid, info in procs.items() if self._ours(pid, info))]
            while stack:
                pid = stack.pop()
                if pid in found:
                    continue
                found.add(pid)
                stack.extend(children.get(pid, ()))
            found.discard(os.getpid())
            for pid in found:
                if pid in procs:
                    self._tracked[pid] = procs[pid][2]
        else:
            found = set()
            try:
                found = {self.root_pid, *(c.pid for c in psutil.Process(self.root_pid).children(recursive=True))}
            except psutil.Error:
                pass
        found.discard(os.getpid())
        if not include_root:
            found.discard(self.root_pid)
        for pid in found:
            if pid not in self.seen:
                try:
                    self.seen[pid] = psutil.Process(pid).name()
                except psutil.Error:
                    self.seen[pid] = "?"
        return sorted(found, key=lambda p: (p != self.root_pid, p))

    def alive(self, include_root: bool = True) -> list[int]:
        out = []
        for pid in self.pids(include_root):
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
            except psutil.Error:
                pass
        return out

    def describe(self, pids: list[int]) -> list[dict[str, Any]]:
        out = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                out.append(
                    {
                        "pid": pid,
                        "name": p.name(),
                        "ppid": p.ppid(),
                        "status": p.status(),
                        "cmdline": " ".join(p.cmdline())[:200],
                    }
                )
            except psutil.Error:
                out.append({"pid": pid, "name": self.seen.get(pid, "?"), "status": "gone"})
        return out

    def kill_all(self, root_popen: subprocess.Popen | None = None, *, timeout: float = 10.0) -> dict[str, Any]:
        """SIGKILL every process of the run, reap what is ours to reap, report survivors."""
        killed: list[int] = []
        for _ in range(20):  # a process may fork between the scan and the kill: rescan
            victims = self.alive()
            if not victims:
                break
            # Freeze first so that no process reacts to another's death (EOF, SIGCHLD,
            # respawn) or forks between our scan and our kill.
            for pid in victims:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGSTOP)
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                    if pid not in killed:
                        killed.append(pid)
                except ProcessLookupError:
                    pass
                except PermissionError:
                    pass
            # wait for the victims to die (not merely be signalled) before rescanning. The root
            # is waited for through its Popen: psutil's wait reaps a child of ours itself, and
            # Popen, finding it gone (ECHILD), then says it exited 0 where SIGKILL ended it
            root = root_popen.pid if root_popen is not None else None
            procs = []
            for pid in victims:
                try:
                    if pid != root:
                        procs.append(psutil.Process(pid))
                except psutil.Error:
                    pass
            _wait_dead(procs, timeout=2.0)
            if root in victims:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    root_popen.wait(timeout=2.0)
        if root_popen is not None:
            try:
                root_popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.reap()
        survivors = self.alive()
        return {"killed": killed, "survivors": self.describe(survivors)}

    def reap(self) -> list[int]:
        """waitpid() every zombie of the run that reparented to this (subreaper) process.

        A zombie is the run's only by the same rules as :meth:`_ours` (a member of the run's
        session, or pid *and* start time of a process seen in the tree): a pid seen once may
        since have been reused by a child of this process that is not the run's (another run's
        root, a ``subprocess.Popen``), whose exit status must stay with its owner.
        """
        reaped = []
        me = os.getpid()
        candidates = set(self.seen)
        with contextlib.suppress(psutil.Error):
            candidates.update(child.pid for child in psutil.Process(me).children())
        for pid in candidates:
            if pid == self.root_pid:
                continue  # the Popen object owns the root
            if not self._reapable(pid, me):
                continue
            try:
                got, _ = os.waitpid(pid, os.WNOHANG)
                if got == pid:
                    reaped.append(pid)
            except ChildProcessError:
                pass
        return reaped

    def _reapable(self, pid: int, me: int) -> bool:
        """A zombie child of ``me`` that belongs to the run (see :meth:`reap`)."""
        if self.has_proc:
            stat = _stat_fields(pid)
            if stat is None or stat[0] != me:
                return False
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.Error:
                return False
            return self._tracked.get(pid) == stat[2] or self._ours(pid, stat)
        try:  # no /proc (no start times): the pid, as seen while the run lasted
            p = psutil.Process(pid)
            return p.ppid() == me and p.status() == psutil.STATUS_ZOMBIE and pid in self.seen
        except psutil.Error:
            return False


def _stat_fields(pid: int) -> tuple[int, int, int] | None:
    """(ppid, session, start time in clock ticks since boot) from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode("ascii", "replace")
        fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
        return int(fields[1]), int(fields[3]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _session(pid: int) -> int | None:
    stat = _stat_fields(pid)
    return None if stat is None else stat[1]


def _start_time(pid: int) -> int | None:
    stat = _stat_fields(pid)
    return None if stat is None else stat[2]


def wait_gone(pids: list[int], timeout: float) -> None:
    """Wait (bounded) until the given processes have exited by themselves."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    _wait_dead(procs, timeout)


def _wait_dead(procs: list[psutil.Process], timeout: float) -> None:
    """Until every process is gone or a zombie (killed processes that are not our children
    stay zombies until their parent reaps them)."""
    end = time.monotonic() + timeout
    pending = list(procs)
    while pending and time.monotonic() < end:
        still = []
        for p in pending:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    still.append(p)
            except psutil.Error:
                pass
        if not still:
            return
        # psutil.wait_procs returns as soon as a process goes away (it reaps our own children)
        _, alive = psutil.wait_procs(still, timeout=0.05)
        pending = alive


# -- stacks ---------------------------------------------------------------------------------
def find_py_spy() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    if exe.exists():
        return str(exe)
    return shutil.which("py-spy")


def stacks(
    pids: list[int], evidence_dir: str | os.PathLike, *, timeout: float = 20.0, native: bool = True
) -> dict[str, Any]:
    """Python (and native) stacks of each pid, in parallel; each entry says its method."""
    out: dict[str, Any] = {}
    spy = find_py_spy()
    remaining = list(pids)
    if spy:
        attempts = (["--native"], []) if native else ([],)
        for extra in attempts:
            if not remaining:
                break
            running = {}
            for pid in remaining:
                running[pid] = subprocess.Popen(
                    [spy, "dump", "--pid", str(pid), *extra],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
            end = time.monotonic() + timeout
            failed = []
            for pid, proc in running.items():
                try:
                    so, se = proc.communicate(timeout=max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    so, se = proc.communicate()
                    failed.append(pid)
                    out.setdefault(str(pid), {})["py-spy" + " ".join(extra)] = "timed out"
                    continue
                text = so.decode("utf-8", "replace")
                if proc.returncode == 0 and text.strip():
                    out[str(pid)] = {"method": "py-spy --native" if extra else "py-spy", "text": text}
                else:
                    failed.append(pid)
                    out.setdefault(str(pid), {})["py-spy" + (" --native" if extra else "") + " error"] = se.decode(
                        "utf-8", "replace"
                    ).strip()[-500:]
            remaining = failed
    for pid in remaining:
        entry = out.setdefault(str(pid), {})
        text = faulthandler_dump(pid, evidence_dir)
        if text:
            entry.update(method="faulthandler", text=text)
        else:
            entry.setdefault("method", "none")
            entry.setdefault("text", "")
            entry["note"] = "no py-spy stack and no faulthandler output (not a Python process, or no sitecustomize)"
    return out


def faulthandler_dump(pid: int, evidence_dir: str | os.PathLike, timeout: float = 3.0) -> str:
    """Ask a Python process of the run for an all-threads dump (SIGUSR1, see sitecustomize)."""
    path = Path(evidence_dir) / f"faulthandler-{pid}.txt"
    if not path.exists():
        return ""  # no handler registered: SIGUSR1 would kill it rather than dump
    if _holds_open(pid, path) is False:
        # The file is not this process image's: a Python parent's at-fork hook made it before
        # the child exec'd something that is not Python (or runs without sitecustomize), or an
        # earlier process had the pid. Its SIGUSR1 is not handled: asking would kill it.
        return ""
    before = path.stat().st_size
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        return path.read_text("utf-8", "replace")
    end = time.monotonic() + timeout
    # The handler writes the dump synchronously in the target, one write() per line or so, and
    # says nowhere that it is done: wait until the file has grown and then stopped growing for
    # ``settle`` seconds (or the target died, or the time is up). Reading as soon as it grew
    # gave half a dump on a loaded machine: the first thread's header and one frame.
    settle = 0.1
    size, changed = before, time.monotonic()
    while time.monotonic() < end:
        try:
            now_size = path.stat().st_size
        except OSError:
            break
        if now_size != size:
            size, changed = now_size, time.monotonic()
        elif size > before and time.monotonic() - changed >= settle:
            break
        try:
            psutil.Process(pid).wait(timeout=0.02)  # returns early only if it dies
            break
        except psutil.TimeoutExpired:
            continue
        except psutil.Error:
            break
    return path.read_text("utf-8", "replace")


def _holds_open(pid: int, path: Path) -> bool | None:
    """Whether ``pid`` has ``path`` open (None: cannot tell here). sitecustomize keeps its
    faulthandler file open for the life of the process image; Python opens files close-on-exec,
    so a process that exec'd since holds it no more."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        want = os.stat(path)
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    for fd in fds:
        try:
            st = os.stat(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            return True
    return False


def faulthandler_files(evidence_dir: str | os.PathLike) -> dict[str, str]:
    """Non-empty faulthandler files (fatal-signal tracebacks of crashed processes)."""
    out = {}
    for path in sorted(Path(evidence_dir).glob("faulthandler-*.txt")):
        text = path.read_text("utf-8", "replace")
        if text.strip():
            out[path.stem.split("-", 1)[1]] = text
    return out


def top_frame(stack_text: str) -> str:
    """The innermost Python frame of the main thread in a py-spy or faulthandler dump."""
    lines = stack_text.splitlines()
    # py-spy: 'Thread 123 (idle): "MainThread"' then frames '    fn (file:line)'
    for i, line in enumerate(lines):
        if line.startswith("Thread ") and "MainThread" in line:
            for frame in lines[i + 1 :]:
                f = frame.strip()
                if not f or f.startswith("Thread "):
                    break
                if ".py:" in f or ".py)" in f:
                    return f
            break
    # faulthandler: 'Current thread 0x... (most recent call first):' / 'Thread 0x...'
    for i, line in enumerate(lines):
        if line.startswith(("Current thread", "Thread 0x")):
            for frame in lines[i + 1 :]:
                f = frame.strip()
                if f.startswith("File "):
                    return f
            break
    return ""


def main_thread_frames(stack_text: str, depth: int = 3) -> list[str]:
    """The innermost ``depth`` frames (native ones included) of the main thread of a dump."""
    lines = stack_text.splitlines()
    for i, line in enumerate(lines):
        if (line.startswith("Thread ") and "MainThread" in line) or line.startswith("Current thread"):
            frames = []
            for frame in lines[i + 1 :]:
                f = frame.strip()
                if not f or f.startswith(("Thread ", "Current thread")):
                    break
                frames.append(f)
                if len(frames) == depth:
                    break
            return frames
    return []
