"""A DataLoader-fed model stage between a producer and a consumer (the shape of seed 003).

::

    producer --put(timeout)--> [bounded queue "model_in"] --DataLoader--> model stage
             --put(timeout)--> [bounded queue "model_out"] --> consumer

Seed 003's service blocked for 60 s on a full upstream queue ("队列满") and then failed with an
error that did not say which stage had stopped. Here every queue knows the stage downstream of
it, every blocking call has a timeout, and a timed-out ``put`` raises :class:`StageStalled`
naming the stage that stopped taking items, with the counts of every stage and how long ago the
stalled stage last made progress. :meth:`Pipeline.run` counts items in and out by sequence id,
so a run that drops or duplicates an item is told from one that delivers all of them.

The model stage reads its input through a ``torch.utils.data.DataLoader`` over an
``IterableDataset`` drawing from the input queue: ``num_workers=0`` reads in the stage thread;
``num_workers>0`` uses a multiprocessing queue that the workers share (each item is taken by
exactly one worker; one end marker per worker).

Importing this module imports neither torch nor transformers; :meth:`Pipeline.run` does.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from splitlearn.errors import SplitLearnError

__all__ = ["Pipeline", "PipelineError", "StageStalled", "PipelineResult", "QueueDataset"]  # noqa: F822 - QueueDataset: module __getattr__

_END = "__splitlearn_pipeline_end__"  # end marker (a str: picklable, survives worker queues)
_POLL = 0.2  # bound of every internal wait, so a stop request is seen promptly


class PipelineError(SplitLearnError, RuntimeError):
    """The pipeline did not deliver every item."""


class StageStalled(PipelineError):
    """A stage stopped taking items: the put into its input queue timed out."""

    def __init__(self, stage: str, queue_name: str, waited: float, counts: dict[str, int], detail: str = ""):
        """``stage``: the stalled stage; ``queue_name``: the queue whose put timed out."""
        self.stage = stage
        self.queue_name = queue_name
        self.waited = waited
        self.counts = dict(counts)
        self.detail = detail
        super().__init__(
            f"stage {stage!r} stalled: put into queue {queue_name!r} timed out after {waited:.1f}s"
            f"{'; ' + detail if detail else ''}; counts {self.counts}"
        )


@dataclass
class StageState:
    name: str
    items_in: int = 0
    items_out: int = 0
    state: str = "idle"
    last_progress: float = field(default_factory=time.monotonic)

    def progress(self, state: str) -> None:
        self.state = state
        self.last_progress = time.monotonic()

    def describe(self) -> str:
        ago = time.monotonic() - self.last_progress
        return f"stage {self.name!r} in {self.state!r}, last progress {ago:.1f}s ago"


@dataclass
class PipelineResult:
    produced: int
    consumed: int
    ids: list[int]
    missing: list[int]
    duplicates: list[int]
    seconds: float
    counts: dict[str, int]
    outputs: list[Any] = field(repr=False, default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.duplicates and self.consumed == self.produced


class _QueueIterable:
    """Mixin of :class:`QueueDataset`: iterate ``(seq, item)`` pairs from a queue until the
    end marker. Waits are bounded (``_POLL``) and re-check ``stop`` so a stopped pipeline never
    leaves a reader blocked forever."""

    def __init__(self, q: Any, stop: Any):
        self.q = q
        self.stop = stop

    def __iter__(self):
        while not self.stop.is_set():
            try:
                got = self.q.get(timeout=_POLL)
            except queue.Empty:
                continue
            if isinstance(got, str) and got == _END:
                return
            yield got


def __getattr__(name: str) -> Any:
    """``QueueDataset`` subclasses torch's IterableDataset, so it is built on first use (this
    module imports no torch); pickling finds it here by name (spawn workers)."""
    if name == "QueueDataset":
        if "QueueDataset" in globals():
            return globals()["QueueDataset"]
        from torch.utils.data import IterableDataset

        cls = type("QueueDataset", (_QueueIterable, IterableDataset), {"__module__": __name__})
        globals()["QueueDataset"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _collate(batch: list) -> tuple[list[int], Any]:
    import torch

    ids = [int(s) for s, _ in batch]
    items = [x for _, x in batch]
    if all(isinstance(x, torch.Tensor) for x in items):
        return ids, torch.stack(items)
    return ids, items


class Pipeline:
    """producer -> bounded queue -> DataLoader-fed ``model_fn`` -> bounded queue -> consumer.

    ``model_fn(batch)`` gets the collated batch (a stacked tensor when items are tensors) and
    returns one output per item (indexable, ``len == batch size``). ``consumer(seq, output)``
    is called in the consumer thread for every item.

    A pipeline may be run again: every :meth:`run` starts from fresh stage states (counts,
    states, progress times), so its result, its :class:`StageStalled` diagnosis and
    :meth:`counts` describe that run alone; ``stages`` / ``counts()`` show the latest run. Runs
    may not overlap: a :meth:`run` while another is in progress raises :class:`PipelineError`.
    A thread left stuck by an earlier run (see ``stuck_threads``) keeps updating only that run's
    stage states.
    """

    def __init__(
        self,
        model_fn: Callable[[Any], Any],
        *,
        consumer: Callable[[int, Any], None] | None = None,
        batch_size: int = 4,
        queue_size: int = 4,
        put_timeout: float = 60.0,
        num_workers: int = 0,
        multiprocessing_context: str | None = None,
        stage_name: str = "model",
        keep_outputs: bool = False,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1 (an unbounded queue hides a stalled stage)")
        self.model_fn = model_fn
        self.consumer = consumer
        self.batch_size = batch_size
        self.queue_size = queue_size
        self.put_timeout = float(put_timeout)
        self.num_workers = int(num_workers)
        self.mp_context = multiprocessing_context
        self.stage_name = stage_name
        self.keep_outputs = keep_outputs
        self.stages = self._fresh_stages()
        self.threads: list[threading.Thread] = []
        self.worker_pids: list[int] = []
        self.stuck_threads: list[str] = []
        self._running = threading.Lock()

    def _fresh_stages(self) -> dict[str, StageState]:
        return {
            "producer": StageState("producer"),
            self.stage_name: StageState(self.stage_name),
            "consumer": StageState("consumer"),
        }

    # -- counts ------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Items in and out of every stage in the latest (or current) run."""
        return _counts(self.stages)

    # -- stages ------------------------------------------------------------------------------
    def _put(
        self, q: Any, item: Any, queue_name: str, upstream: str, downstream: str, stop: Any, stages: dict[str, StageState]
    ) -> None:
        """put with the pipeline's timeout. A timeout names the stalled stage: the stage
        downstream of ``q``, or further down if that stage is itself blocked putting into the
        next queue (the root of the back-pressure is the most downstream blocked stage).
        ``stages``: the states of the run this put belongs to."""
        st = stages[upstream]
        previous = st.state
        st.state = f"put:{queue_name}"  # no progress while blocked: last_progress is kept
        deadline = time.monotonic() + self.put_timeout
        t0 = time.monotonic()
        while True:
            if stop.is_set():
                raise _Stopped()
            try:
                q.put(item, timeout=min(_POLL, max(0.0, deadline - time.monotonic())))
                st.state = previous
                return
            except queue.Full:
                if time.monotonic() >= deadline:
                    break
        order = list(stages)
        stalled = downstream
        via = []
        while stages[stalled].state.startswith("put:") and order.index(stalled) + 1 < len(order):
            via.append(f"{stalled!r} blocked on {stages[stalled].state[4:]!r}")
            stalled = order[order.index(stalled) + 1]
        detail = stages[stalled].describe() + (f" (back-pressure through {', '.join(via)})" if via else "")
        raise StageStalled(stalled, queue_name, time.monotonic() - t0, _counts(stages), detail)

    def _producer(self, items: Iterable, q: Any, stop: Any, ends: int, stages: dict[str, StageState]) -> None:
        st = stages["producer"]
        for seq, item in enumerate(items):
            st.items_in += 1
            st.progress("put")
            self._put(q, (seq, item), f"{self.stage_name}_in", "producer", self.stage_name, stop, stages)
            st.items_out += 1
        for _ in range(ends):
            self._put(q, _END, f"{self.stage_name}_in", "producer", self.stage_name, stop, stages)
        st.progress("done")

    def _loader_iter(self, q_in: Any, stop: Any) -> Any:
        """The stage's DataLoader iterator. With ``num_workers > 0`` this starts the workers, so
        :meth:`run` calls it before it starts any thread: a fork from a process whose other
        threads may hold locks (an import, a queue's feeder pickling a tensor into shared
        memory) can leave a worker waiting forever on a lock no thread of it will release."""
        from torch.utils.data import DataLoader

        kw: dict[str, Any] = {"batch_size": self.batch_size, "collate_fn": _collate, "num_workers": self.num_workers}
        if self.num_workers:
            kw["multiprocessing_context"] = self.mp_context
        it = iter(DataLoader(__getattr__("QueueDataset")(q_in, stop), **kw))
        self.worker_pids = [w.pid for w in getattr(it, "_workers", [])]
        return it

    def _stage(self, it: Any, q_out: Any, stop: Any, stages: dict[str, StageState]) -> None:
        st = stages[self.stage_name]
        try:
            st.progress("read")
            for ids, batch in it:
                st.items_in += len(ids)
                st.progress("forward")
                outputs = self.model_fn(batch)
                if len(outputs) != len(ids):
                    raise PipelineError(f"stage {self.stage_name!r} returned {len(outputs)} outputs for {len(ids)} items")
                for seq, out in zip(ids, outputs, strict=True):
                    self._put(q_out, (seq, out), f"{self.stage_name}_out", self.stage_name, "consumer", stop, stages)
                    st.items_out += 1
                st.progress("read")
            self._put(q_out, _END, f"{self.stage_name}_out", self.stage_name, "consumer", stop, stages)
            st.progress("done")
        finally:
            _shutdown_workers(it)

    def _consumer(self, q: Any, stop: Any, seen: list[int], outputs: list, stages: dict[str, StageState]) -> None:
        st = stages["consumer"]
        while not stop.is_set():
            try:
                got = q.get(timeout=_POLL)
            except queue.Empty:
                continue
            if isinstance(got, str) and got == _END:
                st.progress("done")
                return
            seq, out = got
            st.items_in += 1
            st.progress("consume")
            if self.consumer is not None:
                self.consumer(seq, out)
            seen.append(seq)
            if self.keep_outputs:
                outputs.append((seq, out))
            st.items_out += 1
            st.progress("read")  # waiting for the next one: not busy (see _culprit)

    # -- run ---------------------------------------------------------------------------------
    def run(self, items: Iterable, *, timeout: float = 300.0, join_timeout: float = 10.0) -> PipelineResult:
        """Push every item through; raise :class:`StageStalled` / :class:`PipelineError` if any
        stage stops, after stopping the others. Threads that cannot be joined (a stage stuck
        inside ``model_fn``) are daemon threads and are listed in ``self.stuck_threads``.
        Every run starts with fresh stage states; a second run while one is in progress raises
        :class:`PipelineError`."""
        if not self._running.acquire(blocking=False):
            raise PipelineError("this Pipeline is already running: runs of one Pipeline may not overlap")
        try:
            return self._run(list(items), timeout, join_timeout)
        finally:
            self._running.release()

    def _run(self, items: list, timeout: float, join_timeout: float) -> PipelineResult:
        stages = self.stages = self._fresh_stages()  # this run's states; an earlier run's stuck thread keeps its own
        self.stuck_threads = []
        self.worker_pids = []
        if self.num_workers:
            import multiprocessing as mp

            mctx = mp.get_context(self.mp_context)
            q_in: Any = mctx.Queue(self.queue_size)
            stop: Any = mctx.Event()
        else:
            q_in = queue.Queue(self.queue_size)
            stop = threading.Event()
        q_out: queue.Queue = queue.Queue(self.queue_size)
        errors: list[BaseException] = []
        done = threading.Event()
        seen: list[int] = []
        outputs: list = []
        remaining = [3]
        lock = threading.Lock()

        def guarded(fn: Callable, *args: Any) -> Callable[[], None]:
            def body() -> None:
                try:
                    fn(*args)
                except _Stopped:
                    pass
                except BaseException as exc:  # noqa: BLE001 - reported by run()
                    errors.append(exc)
                    stop.set()
                    done.set()
                finally:
                    with lock:
                        remaining[0] -= 1
                        if remaining[0] == 0:
                            done.set()

            return body

        t0 = time.monotonic()
        it = self._loader_iter(q_in, stop)  # workers first, while this process has no pipeline thread
        self.threads = [
            threading.Thread(
                target=guarded(self._producer, items, q_in, stop, max(1, self.num_workers), stages),
                name="pipeline-producer",
                daemon=True,
            ),
            threading.Thread(
                target=guarded(self._stage, it, q_out, stop, stages), name=f"pipeline-{self.stage_name}", daemon=True
            ),
            threading.Thread(
                target=guarded(self._consumer, q_out, stop, seen, outputs, stages), name="pipeline-consumer", daemon=True
            ),
        ]
        for t in self.threads:
            t.start()
        finished = done.wait(timeout)
        stop.set()
        for t in self.threads:
            t.join(join_timeout)
        self.stuck_threads = [t.name for t in self.threads if t.is_alive()]
        if self.num_workers and self.threads[1].is_alive():
            # the stage thread shuts its DataLoader's workers down as it ends; stuck (inside
            # model_fn, or waiting on a worker) it may never end: do it here, or they run on
            _shutdown_workers(it)
        if self.num_workers:
            q_in.cancel_join_thread()
            q_in.close()
        if errors:
            stalls = [e for e in errors if isinstance(e, StageStalled)]
            raise (stalls[0] if stalls else errors[0])
        if not finished:
            raise PipelineError(f"pipeline did not finish within {timeout:.1f}s: {_culprit(stages).describe()}; counts {_counts(stages)}")
        ids = sorted(seen)
        counts = _counts(stages)
        dup = sorted(i for i, n in Counter(seen).items() if n > 1)
        missing = sorted(set(range(len(items))) - set(ids))
        return PipelineResult(
            produced=len(items),
            consumed=len(seen),
            ids=ids,
            missing=missing,
            duplicates=dup,
            seconds=time.monotonic() - t0,
            counts=counts,
            outputs=sorted(outputs, key=lambda p: p[0]),
        )


_WAITING = frozenset({"idle", "read", "done"})  # states of a stage that waits for its input (or has finished)


def _culprit(stages: dict[str, StageState]) -> StageState:
    """The stage that holds a pipeline up: of the stages doing something (a forward, a consumer
    call, a put), the one longest without progress; one blocked putting into a queue waits for
    the stage downstream of it. A stage waiting for input is only its victim (the consumer
    waits from the start). When every stage waits, the one longest without progress."""
    order = list(stages)
    busy = [s for s in stages.values() if s.state not in _WAITING]
    if not busy:
        live = [s for s in stages.values() if s.state != "done"] or list(stages.values())
        return min(live, key=lambda s: s.last_progress)
    st = min(busy, key=lambda s: s.last_progress)
    while st.state.startswith("put:") and order.index(st.name) + 1 < len(order):
        st = stages[order[order.index(st.name) + 1]]
    return st


def _shutdown_workers(it: Any) -> None:
    """Stop the worker processes of a DataLoader iterator (there are none with num_workers=0);
    a second call does nothing."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def _counts(stages: dict[str, StageState]) -> dict[str, int]:
    out = {}
    for name, st in stages.items():
        out[f"{name}_in"] = st.items_in
        out[f"{name}_out"] = st.items_out
    return out


class _Stopped(Exception):
    """Internal: a stage saw the stop request."""
