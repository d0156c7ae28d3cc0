"""Shared pieces of the seed-004 manager scenarios (imported only inside scenario functions,
in the child: this module imports torch lazily too, but keep it out of the parent anyway).

* :class:`StagedLoader` -- the real :class:`~splitlearn.model_loader.ModelLoader` preceded by a
  *fetch* stage that stands in for reading a large checkpoint from slow storage. The fetch is a
  workload, not synchronisation: ``io_seconds`` of waiting that is interruptible by the load's
  cancel event (a chunked read that checks for cancellation) or not (a blocking read), or a
  wait on a gate ``threading.Event`` the scenario controls. Every call is recorded
  (start, end, outcome, a weak reference to the model it produced).
* The broken managers the hazard variants run: the whole load under the lock (on the loop, or
  awaited in an executor while the lock is held), check-then-act without a placeholder, and the
  seed's placeholder manager verbatim (no cleanup when the load raises or its caller gives up).
* A heartbeat task and a client task that measure the loop's and the manager's responsiveness.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import math
import statistics
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitlearn.manager import DuplicateModelError, ModelNotFoundError
from splitlearn.model_loader import LoadCancelled, ModelConfig, ModelLoader

log = logging.getLogger("repro.scenarios.manager")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.1f %(threadName)s %(name)s: %(message)s")


# -- the loader --------------------------------------------------------------------------
@dataclass
class LoadRecord:
    model_id: str
    n: int
    started: float
    ended: float | None = None
    outcome: str | None = None  # "model" | "cancelled" | "error:<Type>"
    model_ref: Any = None  # weakref.ref to the produced module
    done: threading.Event = field(default_factory=threading.Event)


class StagedLoader(ModelLoader):
    """``config.metadata`` drives the fetch stage: ``io_seconds`` (float), ``interruptible``
    (bool, default True) and ``gate`` (name of an event in ``self.gates``); ``ignore_cancel``
    hides the cancel event from the real loader too (a load Python cannot stop)."""

    def __init__(
        self, gates: dict[str, threading.Event] | None = None, on_start: Any = None, gate_timeout: float = 60.0
    ) -> None:
        self.gates = dict(gates or {})
        self.gate_timeout = gate_timeout
        self.on_start = on_start
        self.records: list[LoadRecord] = []
        self._lock = threading.Lock()

    @property
    def started(self) -> int:
        with self._lock:
            return len(self.records)

    def calls(self, model_id: str) -> list[LoadRecord]:
        with self._lock:
            return [r for r in self.records if r.model_id == model_id]

    def load_from_config(self, config: ModelConfig, cancel_event: threading.Event | None = None) -> Any:
        with self._lock:
            rec = LoadRecord(config.model_id, len(self.records) + 1, time.perf_counter())
            self.records.append(rec)
        if self.on_start is not None:
            self.on_start()
        try:
            self._fetch(config, cancel_event)
            honour = not (config.metadata or {}).get("ignore_cancel", False)
            model = super().load_from_config(config, cancel_event=cancel_event if honour else None)
            rec.outcome = "model"
            rec.model_ref = weakref.ref(model)
            return model
        except LoadCancelled:
            rec.outcome = "cancelled"
            raise
        except BaseException as exc:
            rec.outcome = f"error:{type(exc).__name__}"
            raise
        finally:
            rec.ended = time.perf_counter()
            rec.done.set()

    def _fetch(self, config: ModelConfig, cancel_event: threading.Event | None) -> None:
        meta = config.metadata or {}
        gate_name = meta.get("gate")
        if gate_name:
            log.info("fetch of %r waits on gate %r (not cancellable)", config.model_id, gate_name)
            # Bounded only as a safety net: a test that fails before opening the gate must not
            # leave a worker that blocks interpreter exit forever.
            if not self.gates[gate_name].wait(self.gate_timeout):
                raise RuntimeError(f"gate {gate_name!r} was not opened within {self.gate_timeout} s")
        io = float(meta.get("io_seconds", 0.0))
        if io > 0:
            if meta.get("interruptible", True) and cancel_event is not None:
                log.info("fetch of %r: %.2f s of simulated I/O, stops on cancel", config.model_id, io)
                if cancel_event.wait(io):
                    raise LoadCancelled(f"fetch of {config.model_id!r} cancelled")
            else:
                log.info("fetch of %r: %.2f s of simulated blocking I/O", config.model_id, io)
                time.sleep(io)  # workload: stands in for a blocking read of a large file


def write_encoder_checkpoint(workdir: Path, name: str = "encoder", d_model: int = 128, seed: int = 0) -> dict[str, Any]:
    """A real ``torch.nn.TransformerEncoderLayer`` state dict in safetensors; returns the
    ModelConfig keyword arguments that load it."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    kwargs = {"d_model": d_model, "nhead": 4, "dim_feedforward": 4 * d_model, "batch_first": True, "dropout": 0.0}
    layer = torch.nn.TransformerEncoderLayer(**kwargs)
    path = Path(workdir) / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(path))
    return {
        "model_type": "pytorch",
        "model_path": str(path),
        "model_class": "torch.nn:TransformerEncoderLayer",
        "model_kwargs": kwargs,
        "warmup": True,
        "warmup_input_shape": [1, 16, d_model],
    }


def write_gpt2_checkpoint(
    workdir: Path, name: str = "gpt2", n_layer: int = 4, n_embd: int = 64, vocab: int = 512, n_positions: int = 128
) -> dict[str, Any]:
    """A randomly initialised GPT-2 saved with ``save_pretrained``; returns ModelConfig kwargs
    for the ``huggingface`` path."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(workdir) / name
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        cfg = GPT2Config(
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=max(1, n_embd // 64) if n_embd >= 64 else 1,
            vocab_size=vocab,
            n_positions=n_positions,
        )
        GPT2LMHeadModel(cfg).save_pretrained(str(path))
    return {"model_type": "huggingface", "model_path": str(path), "warmup": True, "warmup_seq_len": 16}


# -- broken managers (hazard variants) -----------------------------------------------------
class LockedLoadManager:
    """The load runs under the manager lock: on the loop thread (``on_loop=True``: the loop is
    blocked) or in an executor awaited while the lock is held (the loop runs, the manager does not)."""

    def __init__(self, loader: ModelLoader, on_loop: bool) -> None:
        self.loader = loader
        self.on_loop = on_loop
        self.lock = asyncio.Lock()
        self.models: dict[str, Any] = {}
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="naive-load")

    async def load_model(self, config: ModelConfig) -> Any:
        config.validate()
        async with self.lock:
            if config.model_id in self.models:
                raise DuplicateModelError(f"model {config.model_id!r} already loaded")
            if self.on_loop:
                model = self.loader.load_from_config(config)
            else:
                model = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.loader.load_from_config, config
                )
            self.models[config.model_id] = model
        return model

    async def get_model(self, model_id: str) -> Any:
        async with self.lock:
            if model_id not in self.models:
                raise ModelNotFoundError(f"model {model_id!r} is not loaded")
            return self.models[model_id]

    async def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class CheckThenActManager:
    """Refuses a duplicate only if the first load has *finished*: the check and the insert are
    separated by the load's await, with no placeholder in between."""

    def __init__(self, loader: ModelLoader, max_workers: int) -> None:
        self.loader = loader
        self.models: dict[str, Any] = {}
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="naive-load")

    async def load_model(self, config: ModelConfig) -> Any:
        config.validate()
        if config.model_id in self.models:
            raise DuplicateModelError(f"model {config.model_id!r} already loaded")
        model = await asyncio.get_running_loop().run_in_executor(self.executor, self.loader.load_from_config, config)
        self.models[config.model_id] = model
        return model

    async def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class SeedPlaceholderManager:
    """Seed 004's AsyncModelManager as written: placeholder under the lock, load in an executor,
    swap-in under the lock -- and nothing that removes the placeholder when the load raises or
    its caller gives up."""

    class Placeholder:
        def __init__(self, model_id: str) -> None:
            self.model_id = model_id

    def __init__(self, loader: ModelLoader) -> None:
        self.loader = loader
        self.lock = asyncio.Lock()
        self.models: dict[str, Any] = {}
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="seed-load")

    async def load_model(self, config: ModelConfig) -> Any:
        config.validate()
        async with self.lock:
            if config.model_id in self.models:
                raise DuplicateModelError(f"Model {config.model_id!r} already loaded")
            self.models[config.model_id] = self.Placeholder(config.model_id)
        model = await asyncio.get_running_loop().run_in_executor(self.executor, self.loader.load_from_config, config)
        async with self.lock:
            self.models[config.model_id] = model
        return model

    async def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


# -- measuring -----------------------------------------------------------------------------
class Heartbeat:
    """A task on the loop that ticks every ``interval`` s and keeps the gaps between ticks.

    With each gap it keeps the CPU time the whole process used during it (``time.process_time``,
    every thread) and the part of it the loop's own thread used (``time.thread_time``): a loop
    stalled because another thread of this process holds the GIL and computes shows about one
    CPU-second per second for the process and little for the loop thread; a loop that computes
    itself (a collection or an import run on the loop thread) shows it on the loop thread; a
    loop stalled because the process was not scheduled (other processes on the cores), or waits
    in a blocking call, shows little for either.

    While it runs it also times every cyclic garbage collection (``gc.callbacks``: start, end,
    generation, whether it ran on the loop's thread), so a stall can be set against the
    collections inside it -- the seed's diagnosis of the first-load stalls names the collector.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.gaps: list[float] = []
        self.ends: list[float] = []
        self.cpu: list[float] = []
        self.loop_cpu: list[float] = []
        # (start, end, generation, on the loop thread) of each collection while the task runs
        self.collections: list[tuple[float, float, int, bool]] = []
        self._gc_started: dict[int, tuple[float, int]] = {}
        self._loop_thread: int | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def _on_gc(self, phase: str, info: dict) -> None:
        # called by the collector in whichever thread collects, with the GIL held
        tid = threading.get_ident()
        if phase == "start":
            self._gc_started[tid] = (time.perf_counter(), int(info.get("generation", -1)))
        elif tid in self._gc_started:
            t0, gen = self._gc_started.pop(tid)
            self.collections.append((t0, time.perf_counter(), gen, tid == self._loop_thread))

    def start(self) -> None:
        self._loop_thread = threading.get_ident()
        gc.callbacks.append(self._on_gc)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="heartbeat")

    async def _run(self) -> None:
        last, last_cpu, last_loop = time.perf_counter(), time.process_time(), time.thread_time()
        while not self._stop.is_set():
            await asyncio.sleep(self.interval)
            now, now_cpu, now_loop = time.perf_counter(), time.process_time(), time.thread_time()
            self.gaps.append(now - last)
            self.ends.append(now)
            self.cpu.append(now_cpu - last_cpu)
            self.loop_cpu.append(now_loop - last_loop)
            last, last_cpu, last_loop = now, now_cpu, now_loop

    def reset(self) -> None:
        self.gaps.clear()
        self.ends.clear()
        self.cpu.clear()
        self.loop_cpu.clear()
        self.collections.clear()

    def _longest(self) -> int | None:
        if not self.gaps:
            return None
        return max(range(len(self.gaps)), key=self.gaps.__getitem__)

    def max_gap_cpu_share(self) -> float | None:
        """Process CPU seconds per wall second during the longest gap (None before any tick)."""
        i = self._longest()
        return round(self.cpu[i] / self.gaps[i], 3) if i is not None and self.gaps[i] > 0 else None

    def max_gap_loop_cpu_share(self) -> float | None:
        """The loop thread's own CPU seconds per wall second during the longest gap."""
        i = self._longest()
        return round(self.loop_cpu[i] / self.gaps[i], 3) if i is not None and self.gaps[i] > 0 else None

    def max_gap_collections(self) -> dict[str, Any]:
        """The collections that overlapped the longest gap: their time inside it, the highest
        generation, and how much of that time ran on the loop's own thread."""
        i = self._longest()
        if i is None:
            return {"ms": 0.0, "n": 0, "max_generation": None, "on_loop_ms": 0.0}
        end = self.ends[i]
        start = end - self.gaps[i]
        inside = [(max(a, start), min(b, end), gen, on_loop) for a, b, gen, on_loop in self.collections]
        inside = [c for c in inside if c[1] > c[0]]
        return {
            "ms": round(sum(b - a for a, b, _, _ in inside) * 1e3, 3),
            "n": len(inside),
            "max_generation": max((gen for _, _, gen, _ in inside), default=None),
            "on_loop_ms": round(sum(b - a for a, b, _, on_loop in inside if on_loop) * 1e3, 3),
        }

    async def stop(self) -> None:
        self._stop.set()
        try:
            if self._task is not None:
                await self._task
        finally:  # also when the task failed or was cancelled: the collector stops reporting here
            if self._on_gc in gc.callbacks:
                gc.callbacks.remove(self._on_gc)

    def summary(self, prefix: str = "heartbeat") -> dict[str, Any]:
        g = sorted(self.gaps) or [0.0]
        in_gap = self.max_gap_collections()
        return {
            f"{prefix}_max_gap_cpu_share": self.max_gap_cpu_share(),
            f"{prefix}_max_gap_loop_cpu_share": self.max_gap_loop_cpu_share(),
            f"{prefix}_max_gap_gc_ms": in_gap["ms"],
            f"{prefix}_max_gap_gc_n": in_gap["n"],
            f"{prefix}_max_gap_gc_max_generation": in_gap["max_generation"],
            f"{prefix}_max_gap_gc_on_loop_ms": in_gap["on_loop_ms"],
            f"{prefix}_gc_n": len(self.collections),
            f"{prefix}_gc_ms": round(sum(b - a for a, b, _, _ in self.collections) * 1e3, 3),
            f"{prefix}_ticks": len(self.gaps),
            f"{prefix}_interval_ms": round(self.interval * 1e3, 3),
            f"{prefix}_max_gap_ms": round(g[-1] * 1e3, 3),
            f"{prefix}_p99_gap_ms": round(nearest_rank(g, 99) * 1e3, 3),
            f"{prefix}_p50_gap_ms": round(statistics.median(g) * 1e3, 3),
        }


def nearest_rank(sorted_xs: list[float], q: float) -> float:
    """The ``q``-th percentile of ascending ``sorted_xs`` by nearest rank: the smallest sample
    with at least ``q`` % of them at or below it (of 20 samples the p95 is the 19th, of 100 the
    p99 the 99th, not the largest)."""
    k = math.ceil(q / 100 * len(sorted_xs) - 1e-9)
    return sorted_xs[min(len(sorted_xs), max(1, k)) - 1]


def latency_summary(
    samples: list[tuple[float, float]], prefix: str, start: float = float("-inf"), end: float = float("inf")
) -> dict[str, Any]:
    """p50 / p95 / max of the latencies of requests that *started* in ``[start, end]``."""
    s = sorted(lat for t, lat in samples if start <= t <= end)
    if not s:
        return {f"{prefix}_n": 0}
    return {
        f"{prefix}_n": len(s),
        f"{prefix}_p50_ms": round(statistics.median(s) * 1e3, 3),
        f"{prefix}_p95_ms": round(nearest_rank(s, 95) * 1e3, 3),
        f"{prefix}_max_ms": round(s[-1] * 1e3, 3),
    }


async def client(
    get_model: Any,
    model_ids: list[str],
    inputs: dict[str, Any],
    stop: asyncio.Event,
    pause: float,
    samples: list[tuple[float, float]],
    errors: list[str],
    first_done: asyncio.Event | None = None,
) -> None:
    """Round-robin ``get_model`` + one forward pass per request; ``samples`` gets
    ``(start, latency)`` of each (``time.perf_counter`` seconds). ``pause`` paces the client (a
    request rate), it synchronises nothing."""
    import torch

    i = 0
    while not stop.is_set():
        mid = model_ids[i % len(model_ids)]
        i += 1
        t0 = time.perf_counter()
        try:
            model = await get_model(mid)
            if inputs.get(mid) is not None:
                with torch.inference_mode():
                    model(inputs[mid])
        except Exception as exc:  # recorded, checked by the scenario
            errors.append(f"{mid}: {type(exc).__name__}: {exc}")
        samples.append((t0, time.perf_counter() - t0))
        if first_done is not None:
            first_done.set()
        await asyncio.sleep(pause)
