"""Found here, not in the seeds: fork while another thread moves a tensor to shared memory.

``pipeline_backpressure:drain_fork_workers`` failed now and then in full matrix runs: the model
stage never got a batch, and its two fork DataLoader workers outlived the run. Stacks taken
on a stalled run (a stress loop of the same pipeline, two at a time on the 2-core VM; it
stalled in its first run) show each worker's queue feeder thread waiting in
``torch/storage.py``'s ``_share_memory_lock_protected`` wrapper: sending its first batch
needs torch's share-memory lock, and the worker was forked while the parent's ``mp.Queue``
feeder thread (pickling the producer's tensors, which moves them to shared memory) held it.
The lock is a plain ``threading.Lock`` in ``torch.storage`` (with a per-storage
``threading.RLock`` held for the whole copy), and nothing resets it after fork, unlike
torch's ``SharedCache`` lock (pytorch/pytorch#25158) or CPython's own queue locks.

The race is narrow in the pipeline. Here the window is made wide without touching the lock:
a background thread shares a large tensor (the per-storage lock is held while its bytes are
copied into shared memory), the main thread waits until torch's share map shows that sharing
in progress, then forks; the child shares the same tensor, as a DataLoader worker returning a
dataset's cached tensor would.

* hazard ``fork_mid_share``: ``os.fork`` during the copy; the child waits forever on a lock
  whose owner does not exist in it (HANG, child in an untimed futex wait);
* fix ``fork_before_threads``: the child is forked before the sharing thread starts (what
  ``splitlearn.pipeline.Pipeline.run`` does since: its workers start before its threads);
* fix ``spawn``: the child is a fresh interpreter and receives the tensor by pickling.
"""

from __future__ import annotations

import functools
import os
import threading
import time

from repro.harness import predict
from repro.harness.spec import Outcome, fix, frame, hazard, scenario, together
from repro.scenarios._proc import fork_run

ELEMENTS = 64 * 1024 * 1024  # float32: 256 MiB, a copy of tens to hundreds of ms


def child_share(t) -> None:
    """What the child runs: share the tensor (spawn imports this by name). One intra-op thread
    first, as a DataLoader worker has: the copy must not meet the separate libgomp fork hazard
    (``fork_after_threads``), as the parent's own parallel fill of ``t`` would make it."""
    import torch

    torch.set_num_threads(1)
    t.share_memory_()
    if not t.is_shared():
        raise RuntimeError("tensor not in shared memory after share_memory_()")


def _sharing_in_progress(torch) -> bool:
    return bool(getattr(torch.storage, "_share_memory_map", None))


def _wait_sharing(ctx, torch, thread: threading.Thread) -> bool:
    """Bounded wait until the background thread is inside torch's sharing (its per-storage lock
    is in the share map): True; False if the thread finished first. Fails if the map does not
    exist or the sharing does not start within 10 s."""
    if not hasattr(torch.storage, "_share_memory_map"):
        ctx.fail("torch.storage has no _share_memory_map: this torch shares without the lock this scenario targets")
    end = time.monotonic() + 10.0
    while not _sharing_in_progress(torch):
        if not thread.is_alive():
            return False
        if time.monotonic() > end:
            ctx.fail("the sharing thread did not start sharing within 10 s")
        os.sched_yield()
    return True


ATTEMPTS = 5  # tries at catching the copy in progress (one run on a fast VM missed it once)


def _start_sharing(ctx, torch):
    """A fresh tensor and a thread moving it to shared memory, returned once that sharing is in
    progress (tensor, thread, attempt); a copy that finished before the main thread saw it is
    tried again with a fresh tensor, up to ``ATTEMPTS`` times."""
    for attempt in range(1, ATTEMPTS + 1):
        t = torch.ones(ELEMENTS)
        sharer = threading.Thread(target=t.share_memory_, name="sharer", daemon=True)
        sharer.start()
        ctx.stage("wait until the thread is sharing")
        if _wait_sharing(ctx, torch, sharer):
            return t, sharer, attempt
        sharer.join(ctx.remaining())
        del t, sharer
    ctx.fail(f"the sharing thread finished before it was seen sharing, {ATTEMPTS} times: the tensor copy was too fast to catch")


MISSED = 3  # the child's exit code when the fork came after the sharing had finished


def _mid_share_child(torch, t):
    """The child of ``fork_mid_share``: first check that the sharing was still in progress when
    it was forked (the share map is not empty), else exit ``MISSED``."""
    if not _sharing_in_progress(torch):
        return MISSED
    child_share(t)
    return 0


@scenario(
    name="fork_share_lock",
    seed="003",
    claims=("003-fork-share-lock",),
    timeout=60.0,
    variants=[
        hazard(
            "fork_mid_share",
            params={"order": "fork_during_share"},
            expect=(Outcome.HANG, "torch.storage's share-memory locks are not reset after fork (seen on torch 2.13)"),
            requires=predict.fork_available,
            # the child, in share_memory_, waiting for a lock (the lock's own frame varies by torch)
            hang_where=(
                together(
                    frame("repro/scenarios/fork_share_lock.py", "child_share"),
                    frame("torch/_tensor.py", "share_memory_"),
                    "native:PyThread_acquire_lock",
                ),
            ),
            doc="os.fork while another thread copies a tensor into shared memory; the child shares it",
        ),
        fix(
            "fork_before_threads",
            params={"order": "fork_first"},
            requires=predict.fork_available,
            doc="fork before the sharing thread starts, then share in the child",
        ),
        fix("spawn", params={"order": "spawn"}, doc="a spawn child gets the tensor by pickling and shares it"),
    ],
)
def fork_share_lock(ctx) -> None:
    """A child started while a thread of the parent moves a tensor to shared memory shares it."""
    import torch

    order = ctx.params["order"]
    if order == "fork_first":
        t = torch.ones(ELEMENTS)
        sharer = threading.Thread(target=t.share_memory_, name="sharer", daemon=True)
        ctx.stage("fork before the sharing thread")
        code = fork_run(ctx, lambda: child_share(t), stage="child share_memory_", after_fork=sharer.start)
        ctx.record(child_exit=code)
        ctx.check(code == 0, f"forked child exited {code}")
    elif order == "fork_during_share":
        for attempt in range(1, ATTEMPTS + 1):
            if attempt > 1:  # the last fork came after the copy had finished: a fresh tensor
                sharer.join(ctx.remaining())
            t, sharer, caught = _start_sharing(ctx, torch)
            code = fork_run(ctx, functools.partial(_mid_share_child, torch, t), stage="child share_memory_")
            ctx.record(child_exit=code, attempts=attempt, caught_at_attempt=caught)
            if code != MISSED:
                break
        ctx.check(code == 0, f"forked child exited {code}" + (" (every fork came too late)" if code == MISSED else ""))
    elif order == "spawn":
        import multiprocessing as mp

        t, sharer, caught = _start_sharing(ctx, torch)
        ctx.record(caught_at_attempt=caught)
        proc = mp.get_context("spawn").Process(target=child_share, args=(t,), name="share-spawn")
        proc.start()  # pickling t shares it here: waits for the sharing thread, then sends a handle
        try:
            ctx.record(child_pid=proc.pid)
            ctx.stage("child share_memory_")
            proc.join(ctx.remaining())
        finally:
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        from multiprocessing import resource_tracker

        resource_tracker._resource_tracker._stop()
        ctx.record(child_exit=proc.exitcode)
        ctx.check(proc.exitcode == 0, f"spawn child exited {proc.exitcode}")
    else:
        raise ValueError(f"unknown order {order!r}")
    sharer.join(ctx.remaining())
    ctx.check(not sharer.is_alive(), "the sharing thread did not finish")
    ctx.check(t.is_shared(), "the parent's tensor is not in shared memory")
    ctx.observe(f"{order}: child exited 0")
