"""Unit tests of splitlearn.pipeline: counts in/out, stalls named by stage, nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

torch = pytest.importorskip("torch")

from splitlearn.pipeline import Pipeline, PipelineError, StageStalled  # noqa: E402


def _items(n):
    return [torch.tensor([i, 2 * i]) for i in range(n)]


def _double(batch):
    return [row * 2 for row in batch]


def _threads_end(pipe, timeout=10.0):
    for t in pipe.threads:
        t.join(timeout)
    assert not [t.name for t in pipe.threads if t.is_alive()]


def test_import_does_not_import_torch():
    code = "import sys, splitlearn.pipeline; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("batch_size,queue_size", [(1, 1), (3, 2), (8, 16)])
def test_drain_counts_every_item_once(batch_size, queue_size):
    seen = []
    pipe = Pipeline(_double, consumer=lambda s, o: seen.append((s, o)), batch_size=batch_size,
                    queue_size=queue_size, put_timeout=10, keep_outputs=True)
    res = pipe.run(_items(37), timeout=60)
    assert res.ok and res.produced == res.consumed == 37
    assert res.ids == list(range(37)) and not res.missing and not res.duplicates
    assert res.counts == {f"{s}_{d}": 37 for s in ("producer", "model", "consumer") for d in ("in", "out")}
    assert all(torch.equal(o, torch.tensor([2 * s, 4 * s])) for s, o in res.outputs)
    assert sorted(s for s, _ in seen) == list(range(37))
    _threads_end(pipe)


def test_empty_input():
    pipe = Pipeline(_double, put_timeout=5)
    res = pipe.run([], timeout=30)
    assert res.ok and res.produced == res.consumed == 0


def test_stalled_model_stage_is_named_and_put_times_out():
    gate = threading.Event()
    calls = []

    def stalls(batch):
        calls.append(len(batch))
        if len(calls) > 1:
            gate.wait()
        return _double(batch)

    pipe = Pipeline(stalls, batch_size=2, queue_size=2, put_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(StageStalled) as info:
        pipe.run(_items(20), timeout=30, join_timeout=0.5)
    elapsed = time.monotonic() - t0
    err = info.value
    assert err.stage == "model" and err.queue_name == "model_in"
    assert 1.0 <= err.waited < 3.0 and elapsed < 10
    assert "stage 'model' stalled" in str(err) and "'forward'" in str(err)
    assert err.counts["model_out"] == 2 and err.counts["consumer_out"] == 2
    assert pipe.stuck_threads == ["pipeline-model"]
    gate.set()
    _threads_end(pipe)


def test_stalled_consumer_is_named():
    gate = threading.Event()

    def slow_consumer(seq, out):
        gate.wait()

    pipe = Pipeline(_double, consumer=slow_consumer, batch_size=2, queue_size=1, put_timeout=1.0)
    with pytest.raises(StageStalled) as info:
        pipe.run(_items(20), timeout=30, join_timeout=0.5)
    # whichever put times out first (the producer's or the model stage's), the root is named
    assert info.value.stage == "consumer", str(info.value)
    assert info.value.queue_name in ("model_in", "model_out")
    gate.set()
    _threads_end(pipe)


def test_stage_exception_propagates_and_stops_everything():
    def boom(batch):
        raise ValueError("bad batch")

    pipe = Pipeline(boom, batch_size=2, queue_size=2, put_timeout=5)
    with pytest.raises(ValueError, match="bad batch"):
        pipe.run(_items(10), timeout=30)
    _threads_end(pipe)


def test_wrong_output_count_is_an_error():
    pipe = Pipeline(lambda b: [0], batch_size=3, put_timeout=5)
    with pytest.raises(PipelineError, match="returned 1 outputs for 3 items"):
        pipe.run(_items(6), timeout=30)
    _threads_end(pipe)


def test_unbounded_queue_refused():
    with pytest.raises(ValueError):
        Pipeline(_double, queue_size=0)


def test_overall_timeout_names_a_stage():
    gate = threading.Event()

    def stalls(batch):
        gate.wait()
        return _double(batch)

    # queue large enough that the producer never blocks: only the overall timeout fires
    pipe = Pipeline(stalls, batch_size=1, queue_size=64, put_timeout=60)
    with pytest.raises(PipelineError, match="did not finish within 1.0s") as info:
        pipe.run(_items(4), timeout=1.0, join_timeout=0.5)
    # the stage stuck in its forward, not the consumer that has waited for it from the start
    assert "stage 'model' in 'forward'" in str(info.value), str(info.value)
    gate.set()
    _threads_end(pipe)


def test_overall_timeout_names_the_stuck_stage_after_the_consumer_has_consumed():
    """Once the consumer has taken an item and waits for the next, it is waiting, not busy. It
    used to keep the state 'consume' while it waited, so a stage that got stuck in a forward
    begun after the consumer's last item lost to the consumer as the culprit. The second batch
    starts its forward only once the first answer is being consumed: its collate (torch.stack
    on a tensor subclass, before the stage says 'forward') waits for the consumer's call."""
    gate = threading.Event()
    consumed = threading.Event()
    calls = []

    class SlowToStack(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.stack:
                consumed.wait(30)
            return super().__torch_function__(func, types, args, kwargs or {})

    def second_hangs(batch):
        calls.append(1)
        if len(calls) > 1:
            gate.wait()
        return [row * 2 for row in batch]

    items = [torch.tensor([0, 0]), torch.tensor([1, 2]).as_subclass(SlowToStack)]
    pipe = Pipeline(second_hangs, consumer=lambda s, o: consumed.set(), batch_size=1, queue_size=64, put_timeout=60)
    try:
        with pytest.raises(PipelineError, match="did not finish within 2.0s") as info:
            pipe.run(items, timeout=2.0, join_timeout=0.5)
        assert consumed.is_set() and len(calls) == 2
        assert "stage 'model' in 'forward'" in str(info.value), str(info.value)
    finally:
        gate.set()
        _threads_end(pipe)


def test_second_run_counts_only_its_own_items():
    pipe = Pipeline(_double, batch_size=2, queue_size=2, put_timeout=10, keep_outputs=True)
    first = pipe.run(_items(3), timeout=60)
    second = pipe.run(_items(3), timeout=60)
    every_3 = {f"{s}_{d}": 3 for s in ("producer", "model", "consumer") for d in ("in", "out")}
    assert first.counts == every_3
    assert second.counts == every_3 and pipe.counts() == every_3
    assert second.ok and second.ids == [0, 1, 2]
    assert all(st.state == "done" for st in pipe.stages.values())
    _threads_end(pipe)


def test_stall_on_a_reused_pipeline_is_diagnosed_from_that_run_alone():
    """The same stall as test_stalled_model_stage_is_named_and_put_times_out, after a clean run
    of 3 items on the same Pipeline: same stage named, same counts as on a fresh pipeline."""
    gate = threading.Event()
    calls = []
    stall = threading.Event()

    def maybe_stalls(batch):
        if stall.is_set():
            calls.append(len(batch))
            if len(calls) > 1:
                gate.wait()
        return _double(batch)

    pipe = Pipeline(maybe_stalls, batch_size=2, queue_size=2, put_timeout=1.0)
    assert pipe.run(_items(3), timeout=30).ok
    stall.set()
    with pytest.raises(StageStalled) as info:
        pipe.run(_items(20), timeout=30, join_timeout=0.5)
    err = info.value
    assert err.stage == "model" and err.queue_name == "model_in"
    assert err.counts["model_out"] == 2 and err.counts["consumer_out"] == 2, err.counts
    assert pipe.stuck_threads == ["pipeline-model"]
    gate.set()
    _threads_end(pipe)


def test_overlapping_runs_are_refused():
    entered = threading.Event()
    gate = threading.Event()

    def blocks(batch):
        entered.set()
        gate.wait()
        return _double(batch)

    pipe = Pipeline(blocks, batch_size=1, queue_size=4, put_timeout=30)
    results = []
    first = threading.Thread(target=lambda: results.append(pipe.run(_items(2), timeout=60)))
    first.start()
    try:
        assert entered.wait(30)
        with pytest.raises(PipelineError, match="already running"):
            pipe.run(_items(2), timeout=5)
    finally:
        gate.set()
        first.join(60)
    assert results and results[0].ok and results[0].counts["consumer_out"] == 2
    _threads_end(pipe)


_WORKERS_PROGRAM = r"""
import json, os, sys, threading
import psutil, torch
from splitlearn.pipeline import Pipeline

threads_at_fork = []
os.register_at_fork(before=lambda: threads_at_fork.append(sorted(t.name for t in threading.enumerate())))
pipe = Pipeline(lambda b: [row * 2 for row in b], batch_size=4, queue_size=4, put_timeout=60, num_workers=2,
                multiprocessing_context=sys.argv[1], keep_outputs=True)
res = pipe.run([torch.tensor([i, 2 * i]) for i in range(40)], timeout=120)
assert res.ok and res.ids == list(range(40)), res
assert [int(out[0]) for _, out in res.outputs] == [2 * i for i in range(40)]
assert len(pipe.worker_pids) == 2, pipe.worker_pids
for t in pipe.threads:
    t.join(10)
assert not [t.name for t in pipe.threads if t.is_alive()]
# every process below this one is gone but multiprocessing's own helpers (the forkserver, the
# resource tracker: children with a command line of their own). Not by "multiprocessing" in the
# command line: a forked worker has this program's, which says multiprocessing_context, and a
# forkserver's worker has the forkserver's
me = psutil.Process()
helpers = {c.pid for c in me.children() if c.cmdline() != me.cmdline() and "multiprocessing" in " ".join(c.cmdline())}
kids = [c for c in me.children(recursive=True) if c.pid not in helpers]
gone, alive = psutil.wait_procs(kids, timeout=10)
assert not alive, f"children left: {[(p.pid, p.ppid()) for p in alive]}"
def running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
assert not [pid for pid in pipe.worker_pids if running(pid)], f"workers left: {pipe.worker_pids}"
print("threads at each fork:", json.dumps(threads_at_fork))
"""


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_drain_through_worker_processes(method):
    """In a fresh interpreter (a fork must not copy the pytest process). With fork, every worker
    is forked while the process has none of the pipeline's threads: a fork beside a queue
    feeder sharing tensors can copy torch's share-memory lock held (scenario fork_share_lock)."""
    out = subprocess.run(
        [sys.executable, "-c", _WORKERS_PROGRAM, method], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    forks = [line for line in out.stdout.splitlines() if line.startswith("threads at each fork:")]
    assert forks, out.stdout
    if method == "fork":
        names = json.loads(forks[0].split(":", 1)[1])
        assert len(names) == 2, names  # one fork per worker
        assert all(n == ["MainThread"] for n in names), f"threads alive when a worker was forked: {names}"


_STUCK_STAGE_PROGRAM = r"""
import sys, threading
import psutil, torch
from splitlearn.pipeline import Pipeline, PipelineError

gate = threading.Event()
def stuck(batch):
    gate.wait()
    return [row * 2 for row in batch]

pipe = Pipeline(stuck, batch_size=2, queue_size=64, put_timeout=60, num_workers=2, multiprocessing_context="fork")
try:
    pipe.run([torch.tensor([i]) for i in range(8)], timeout=3, join_timeout=0.5)
except PipelineError as exc:
    print("raised:", exc)
else:
    sys.exit("no error")
assert pipe.stuck_threads == ["pipeline-model"], pipe.stuck_threads
assert len(pipe.worker_pids) == 2, pipe.worker_pids
procs = []
for pid in pipe.worker_pids:
    try:
        procs.append(psutil.Process(pid))
    except psutil.NoSuchProcess:
        pass
gone, alive = psutil.wait_procs(procs, timeout=10)
left = [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]
gate.set()
for t in pipe.threads:
    t.join(10)
assert not [t.name for t in pipe.threads if t.is_alive()]
assert not left, f"workers still running after run() returned: {left}"
print("ok")
"""


def test_a_stage_stuck_in_model_fn_leaves_no_worker_process_running():
    """run() gives up on a stage stuck inside model_fn (listed in stuck_threads); the stage's
    DataLoader workers used to be shut down only by that thread, so they kept running until it
    came back, if ever. run() now shuts them down itself before it raises."""
    out = subprocess.run([sys.executable, "-c", _STUCK_STAGE_PROGRAM], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok"), out.stdout
