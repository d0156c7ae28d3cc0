"""Seed 003: DataLoader workers next to a parent that used intra-op threads.

The seed blamed ``num_workers>0`` itself ("DataLoader 多进程死锁") and fixed it with
``num_workers=0`` and thread environment variables. What reproduces here is narrower: torch
sets every DataLoader worker to one intra-op thread, so fork workers are safe *unless* the
worker turns intra-op threads back on (``worker_init_fn`` calling ``torch.set_num_threads``)
after the parent ran a parallel region on GNU libgomp. libgomp keeps the parent's thread team
in its state but the forked child has none of those threads: the child's next parallel region
waits forever on a barrier (an untimed futex). The DataLoader then times out.

Verdict convention (same in every scenario of this family): a hazard whose symptom is an
error is reported as FAIL only after the scenario verified the symptom is the predicted one
(here: DataLoader timed out while the worker sits in untimed futex waits); any other exception,
and in a hazard variant any other failed check, is an ERROR and so a mismatch.
"""

from __future__ import annotations

import os
import signal
import time

from repro.harness.spec import Build, Outcome, fix, hazard, probe, scenario
from repro.scenarios._proc import check_reaped, proc_key, thread_states, untimed_futex_waiters

N_ITEMS = 12
BATCH = 3


# --- expectations -------------------------------------------------------------------------
def fork_worker_threads_hang(build: Build):
    """The worker re-enables threads: hangs where torch's pool is libgomp and the parent ran
    its parallel region with more than one thread (OMP_NUM_THREADS / default)."""
    if build.gomp and build.intra_threads > 1:
        return Outcome.FAIL, (
            f"libgomp + {build.intra_threads} intra-op threads in the parent: the fork worker's "
            "parallel region waits on the parent's thread team -> DataLoader timed out"
        )
    return Outcome.PASS, f"no libgomp team to inherit (gomp={build.gomp}, intra_threads={build.intra_threads})"


def fork_worker_parent_set_threads_hang(build: Build):
    """The parent calls torch.set_num_threads(2) itself: OMP_NUM_THREADS=1 does not help."""
    if build.gomp:
        return Outcome.FAIL, "libgomp: the parent set 2 threads explicitly, the env var is overridden"
    return Outcome.PASS, "no libgomp"


# --- the dataset (module level: spawn/forkserver workers import it) ---------------------------
class SquaresDataset:
    """Map-style dataset whose items run a parallel intra-op region (big enough to use every
    thread) and return the index, so the scenario can count items in and out."""

    def __init__(self, n: int = N_ITEMS, kill_at: int | None = None):
        self.n = n
        self.kill_at = kill_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import torch

        if self.kill_at is not None and i == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        x = torch.ones(1 << 20)  # 1 Mi elements: at::parallel_for splits it over all threads
        s = float(x.add(i).sum())  # == (1 + i) * 2**20
        a = torch.full((128, 128), 1.0 / 128)
        m = float((a @ a).sum())  # == 128
        return torch.tensor([i, s, m, torch.get_num_threads(), os.getpid()], dtype=torch.float64)


def threads_on(worker_id: int) -> None:
    """worker_init_fn that turns intra-op threads back on (torch set them to 1)."""
    import torch

    torch.set_num_threads(2)


# --- the scenario ---------------------------------------------------------------------------
def _loader(ctx, dataset):
    from torch.utils.data import DataLoader

    p = ctx.params
    workers = int(p.get("workers", 2))
    kw = dict(batch_size=BATCH, num_workers=workers)
    if workers:
        kw["multiprocessing_context"] = p.get("method", "fork")
        # fixes get a generous timeout: the first batch waits for the workers to start, and a
        # spawn worker imports torch and this module first (over 8 s on a loaded 2-core box)
        kw["timeout"] = float(p.get("dl_timeout", 45))
        kw["persistent_workers"] = bool(p.get("persistent", False))
        if p.get("worker_threads"):
            kw["worker_init_fn"] = threads_on
    ctx.record(loader=dict(kw, dataset=type(dataset).__name__, worker_init_fn=bool(p.get("worker_threads"))))
    return DataLoader(dataset, **kw)


def _worker_keys(it) -> list:
    return [proc_key(w.pid) for w in getattr(it, "_workers", [])]


def _shutdown(it) -> None:
    """Shut a DataLoader iterator's workers down now (a traceback may still hold it)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def _warm_parent(ctx) -> None:
    import torch

    p = ctx.params
    if p.get("parent_threads"):
        torch.set_num_threads(int(p["parent_threads"]))
    # a parallel region in the parent: libgomp builds its thread team now
    x = torch.ones(1 << 22)
    ctx.check(float(x.add(1).sum()) == 2.0 * (1 << 22), "parent parallel op is wrong")
    ctx.record(parent_threads=torch.get_num_threads(), parent_pid=os.getpid())


def _check_batches(ctx, batches, expect_threads: int | None) -> None:
    ids = [int(r[0]) for b in batches for r in b]
    ctx.record(items_out=len(ids), duplicates=len(ids) - len(set(ids)))
    ctx.check(sorted(ids) == list(range(N_ITEMS)), f"items lost or duplicated: {sorted(ids)}")
    for b in batches:
        for r in b:
            i = int(r[0])
            ctx.check(float(r[1]) == (1.0 + i) * (1 << 20), f"item {i}: wrong sum {float(r[1])}")
            ctx.check(abs(float(r[2]) - 128.0) < 1e-9, f"item {i}: wrong matmul {float(r[2])}")
    threads = sorted({int(r[3]) for b in batches for r in b})
    ctx.record(worker_threads_seen=threads, worker_pids_seen=sorted({int(r[4]) for b in batches for r in b}))
    if expect_threads is not None:
        ctx.check(threads == [expect_threads], f"workers ran with {threads} threads, expected {expect_threads}")


def _epoch(ctx, dl, label: str):
    """One pass; on a DataLoader timeout gather the worker's thread states and raise the
    hazard's FAIL (only for that exact symptom)."""
    it = iter(dl)
    keys = _worker_keys(it)
    batches = []
    t0 = time.monotonic()
    timed_out = None
    try:
        for b in it:
            batches.append(b)
    except RuntimeError as exc:
        if not str(exc).startswith("DataLoader timed out"):
            raise
        timed_out = str(exc)
    if timed_out is not None:
        waited = time.monotonic() - t0
        workers = []
        for k in keys:
            if k:
                n_untimed, n_threads = untimed_futex_waiters(k[0])
                workers.append(
                    {"pid": k[0], "untimed_futex": n_untimed, "threads": n_threads, "states": thread_states(k[0])}
                )
        ctx.record(timeout_after_s=round(waited, 3), stuck_workers=workers, batches_before_timeout=len(batches))
        stuck = [w["pid"] for w in workers if w["threads"] and w["untimed_futex"] == w["threads"]]
        ctx.observe(f"{label}: {timed_out}; workers all in untimed futex waits: {stuck}")
        _shutdown(it)  # join with timeout, then terminate: the stuck workers are killed
        check_reaped(ctx, keys, label=label)
        if not stuck:
            raise RuntimeError(f"DataLoader timed out but no worker is in untimed futex waits: {workers}")
        ctx.symptom(f"{label}: {timed_out} (fork worker(s) {stuck} stuck in untimed futex waits: libgomp barrier)")
    ctx.record(**{f"{label}_seconds": round(time.monotonic() - t0, 3)})
    return it, keys, batches


@scenario(
    name="dataloader_workers",
    seed="003",
    claims=("003-dataloader-fork-deadlock", "003-thread-env-fix", "003-zombies"),
    timeout=120,
    variants=[
        hazard(
            "fork_threads",
            params={"method": "fork", "workers": 2, "worker_threads": 2, "dl_timeout": 6},
            expect=fork_worker_threads_hang,
            doc="fork workers whose worker_init_fn calls torch.set_num_threads(2) after the parent ran a parallel op",
        ),
        hazard(
            "fork_threads_env1_parent_sets_2",
            params={"method": "fork", "workers": 2, "worker_threads": 2, "dl_timeout": 6, "parent_threads": 2},
            env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
            expect=fork_worker_parent_set_threads_hang,
            doc="the seed's thread env vars are set, but the parent calls torch.set_num_threads(2): still hangs",
        ),
        fix("num_workers0", params={"workers": 0}, doc="the seed's fix: no worker processes"),
        fix("fork_one_thread", params={"method": "fork", "workers": 2}, doc="fork workers left at torch's 1 thread"),
        fix("spawn_threads", params={"method": "spawn", "workers": 2, "worker_threads": 2}),
        fix("forkserver_threads", params={"method": "forkserver", "workers": 2, "worker_threads": 2}),
        fix(
            "fork_threads_env1",
            params={"method": "fork", "workers": 2, "worker_threads": 2},
            env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
            doc="OMP_NUM_THREADS=1 before import: the parent never builds a libgomp team",
        ),
        fix(
            "persistent_fork",
            params={"method": "fork", "workers": 2, "persistent": True, "epochs": 3},
            doc="persistent fork workers at 1 thread over 3 epochs: same workers, every item each epoch",
        ),
        fix(
            "persistent_spawn_threads",
            params={"method": "spawn", "workers": 2, "persistent": True, "epochs": 2, "worker_threads": 2},
        ),
        probe(
            "worker_killed",
            params={"method": "fork", "workers": 2, "kill_at": 5, "dl_timeout": 20},
            doc="a worker SIGKILLs itself mid-epoch: the loader raises at once, nothing is left behind",
        ),
    ],
)
def dataloader_workers(ctx):
    """DataLoader worker start methods and thread counts after the parent used intra-op threads."""
    ctx.only_symptoms_fail()
    p = ctx.params
    ctx.stage("import torch")
    import torch  # noqa: F401

    ctx.stage("parent parallel op")
    _warm_parent(ctx)
    workers = int(p.get("workers", 2))
    expect_threads = 2 if p.get("worker_threads") else (1 if workers else None)

    if p.get("kill_at") is not None:
        ctx.stage("epoch with a killed worker")
        dl = _loader(ctx, SquaresDataset(kill_at=int(p["kill_at"])))
        import psutil  # noqa: F401  (imported before the workers start: see below)

        t0 = time.monotonic()
        err = None
        keys: list = []
        it = None
        try:
            # The worker may die while the parent is still here: torch's SIGCHLD handler then
            # raises out of whatever the parent runs (seen once in a slow import of psutil).
            it = iter(dl)
            keys = _worker_keys(it)
            for _ in it:
                pass
        except RuntimeError as exc:
            err = str(exc)
        waited = time.monotonic() - t0
        ctx.record(error=err, error_after_s=round(waited, 3))
        ctx.check(err is not None, "a killed worker went unnoticed: the epoch completed")
        ctx.check("DataLoader worker (pid" in err, f"unexpected error: {err}")
        ctx.check(waited < float(p["dl_timeout"]), f"error came only after {waited:.1f}s (timeout {p['dl_timeout']})")
        ctx.observe(f"killed worker reported after {waited:.3f}s: {err}")
        if it is not None:
            _shutdown(it)
        if not keys:
            ctx.observe("the worker died before its pids were read: reaping checked on the children left, if any")
        check_reaped(ctx, keys)
        return

    epochs = int(p.get("epochs", 1))
    dl = _loader(ctx, SquaresDataset())
    all_keys: list = []
    pids_per_epoch = []
    it = None
    for e in range(epochs):
        ctx.stage(f"epoch {e}")
        it, keys, batches = _epoch(ctx, dl, f"epoch{e}")
        all_keys.extend(k for k in keys if k not in all_keys)
        _check_batches(ctx, batches, expect_threads)
        pids_per_epoch.append(ctx.metrics["worker_pids_seen"])
    ctx.record(pids_per_epoch=pids_per_epoch)
    if p.get("persistent"):
        ctx.check(
            all(pe == pids_per_epoch[0] for pe in pids_per_epoch), f"persistent workers changed: {pids_per_epoch}"
        )
        ctx.check(len(pids_per_epoch[0]) == workers, f"expected {workers} worker pids, saw {pids_per_epoch[0]}")
    ctx.stage("shutdown")
    if it is not None:
        _shutdown(it)
    del it, dl
    import gc

    gc.collect()
    check_reaped(ctx, all_keys)


# --- a DataLoader with workers inside a daemonic process ------------------------------------
def _daemon_target(conn, workers: int) -> None:
    """Runs in a daemonic multiprocessing child: build a DataLoader there and report."""
    try:
        import torch
        from torch.utils.data import DataLoader

        kw = {"num_workers": workers, "batch_size": BATCH}
        ids = [int(r[0]) for b in DataLoader(SquaresDataset(), **kw) for r in b]
        torch.set_num_threads(1)
        conn.send(("ok", sorted(ids)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


@scenario(
    name="dataloader_daemonic",
    seed="003",
    claims=("003-dataloader-fork-deadlock", "003-zombies"),
    timeout=60,
    variants=[
        probe(
            "daemon_workers2",
            params={"workers": 2, "daemon": True},
            doc="AssertionError 'daemonic processes are not allowed to have children', raised at once",
        ),
        fix("daemon_workers0", params={"workers": 0, "daemon": True}),
        fix("nondaemon_workers2", params={"workers": 2, "daemon": False}),
    ],
)
def dataloader_daemonic(ctx):
    """A DataLoader with workers inside a daemonic (spawned) process."""
    import multiprocessing as mp

    p = ctx.params
    mctx = mp.get_context("spawn")
    parent_conn, child_conn = mctx.Pipe(duplex=False)
    proc = mctx.Process(target=_daemon_target, args=(child_conn, int(p["workers"])), daemon=bool(p["daemon"]))
    ctx.stage("start daemonic child" if p["daemon"] else "start child")
    proc.start()
    child_conn.close()
    key = proc_key(proc.pid)
    t0 = time.monotonic()
    ctx.stage("wait for the child's report")
    got = parent_conn.poll(max(1.0, ctx.remaining() - 10))
    ctx.check(got, "no report from the child before the deadline")
    status, detail = parent_conn.recv()
    waited = time.monotonic() - t0
    proc.join(timeout=10)
    ctx.record(status=status, detail=detail, report_after_s=round(waited, 3), child_exitcode=proc.exitcode)
    ctx.observe(f"daemon={p['daemon']} workers={p['workers']}: {status}: {detail}")
    if p["daemon"] and int(p["workers"]) > 0:
        ctx.check(status == "error", f"a daemonic process started DataLoader workers: {detail}")
        ctx.check(
            "daemonic processes are not allowed to have children" in detail, f"unexpected error in daemon: {detail}"
        )
    else:
        ctx.check(status == "ok" and detail == list(range(N_ITEMS)), f"child failed: {status} {detail}")
    check_reaped(ctx, [key])
