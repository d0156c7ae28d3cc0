"""The async model manager of seed 004: a placeholder under a short lock, the slow load in a
thread pool, a short lock again to swap the real model in.

State machine of one model id (all transitions run on the event loop thread)::

    (absent) --load_model--> LOADING (LoadingPlaceholder, generation g)
    LOADING  --worker returns, placeholder still current--> READY (ManagedModel)
    LOADING  --worker raises / timeout / caller cancelled / unload_model--> (absent) + failure record
    READY    --unload_model--> (absent)

* ``load_model`` validates the config and estimates its memory **outside** the lock (the
  estimate in a thread: for split families it reads checkpoint headers and may import
  transformers); under the lock it only refuses duplicates (loading or loaded), checks memory
  (estimate plus the estimates of loads in flight against ``psutil.virtual_memory().available``)
  and inserts the placeholder.
  The load runs in a ``ThreadPoolExecutor``; the lock is taken again only to swap it in.
* Every placeholder carries a generation number. The swap-in happens only if the placeholder in
  the table is still that one; otherwise (timeout, cancellation, unload, a retry that replaced it)
  the loaded model is dropped and never registered.
* A caller that gives up (``asyncio.wait_for``, task cancellation, ``load_timeout``) removes the
  placeholder at once, so a retry can be accepted, and sets the load's cancel event: a load that
  has not started is withdrawn from the pool, a running one stops at its next checkpoint (see
  :class:`~splitlearn.model_loader.ModelLoader`), and one that finishes anyway has its result
  dropped in the worker thread (logged, counted in ``stats()["orphans_dropped"]``).
* Such a load is *abandoned but running* until its worker returns: Python cannot stop a thread
  inside ``from_pretrained`` or a C call, and the memory it holds is real. Until then its
  estimate still counts against the memory budget of every load (``stats()["abandoned_running"]``
  counts them), and a retry of the **same id waits** for that worker to end before its own load
  starts, so two copies of one model never load at once. The retry is accepted at once (its
  placeholder, ``status`` ``loading`` with ``waiting_for_generation`` set, refuses duplicates as
  usual) and its time limit covers the wait; a retry that times out, is cancelled or is unloaded
  while waiting leaves like any other load. Waiting rather than refusing: the retry needs no
  polling by its caller, and it costs no lock time (the wait, like the load, is outside the lock).
* A failed or cancelled load leaves a failure record: ``status(id)`` reports ``failed`` with the
  error until a new load of that id starts. It does not block the retry.

The critical sections contain no ``await``, so the lock is never held while anything slow runs;
``get_model`` takes it too, and stays fast while a load is in flight. ``status`` and
``list_models`` are plain reads on the loop thread. Use one manager from one event loop.

The pool thread still shares the GIL with the loop. Measured (repro scenario ``manager_lock``):
a process's *first* Hugging Face load stalls the loop for 100-600 ms at a time although no lock is
held -- the worker's first-use imports and the cyclic garbage collector hold the GIL. Loading a
tiny model of the family at startup (a rehearsal of the code path) and ``gc.freeze()`` once
startup is done keep the loop's gaps under ~40 ms during a 124M-parameter load.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from splitlearn.errors import SplitLearnError
from splitlearn.model_loader import LoadCancelled, ModelConfig, ModelLoader, param_bytes

log = logging.getLogger("splitlearn.manager")


class ModelManagerError(SplitLearnError):
    """Base class of the manager's errors."""


class DuplicateModelError(ModelManagerError, ValueError):
    """A load of a model id that is already loading or loaded."""


class InsufficientResourcesError(ModelManagerError, RuntimeError):
    """The memory estimate of a load does not fit the available memory."""


class ModelNotFoundError(ModelManagerError, LookupError):
    """No model of that id is loaded or loading."""


class ModelNotReadyError(ModelManagerError):
    """The model is still loading."""


class LoadTimeoutError(ModelManagerError, TimeoutError):
    """The load did not finish within its timeout; its placeholder was removed."""


class ModelStatus(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


def _info(entry: Any, **fields: Any) -> dict[str, Any]:
    """The status row every registry entry (placeholder, model, failed load) reports."""
    row = {
        "model_id": entry.model_id,
        "status": entry.status.value,
        "generation": entry.generation,
        "model_type": entry.config.model_type,
        "component": entry.config.component,
        "elapsed_s": None,
        "load_seconds": None,
        "estimated_bytes": entry.estimated_bytes,
        "param_bytes": None,
        "error": None,
        "waiting_for_generation": None,
    }
    row.update(fields)
    return row


@dataclass
class LoadingPlaceholder:
    """Stands in the table for a model while its load runs."""

    model_id: str
    config: ModelConfig
    generation: int
    estimated_bytes: int
    started: float = field(default_factory=time.monotonic)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    future: concurrent.futures.Future | None = None  # the worker's job
    waiter: asyncio.Future | None = None  # the loop-side view of ``future``
    aborted: asyncio.Future | None = None  # set by unload_model / shutdown with the reason
    # an abandoned load of the same id whose worker still runs: this load starts when it has ended
    waits_for: LoadingPlaceholder | None = None
    # set (on the loop) when the worker of this load, abandoned while running, has returned
    worker_ended: asyncio.Future | None = None
    status: ModelStatus = ModelStatus.LOADING

    def info(self) -> dict[str, Any]:
        return _info(
            self,
            elapsed_s=round(time.monotonic() - self.started, 6),
            waiting_for_generation=self.waits_for.generation if self.waits_for is not None else None,
        )


@dataclass
class ManagedModel:
    """A loaded model and what is known about its load."""

    model_id: str
    config: ModelConfig
    model: Any
    generation: int
    load_seconds: float
    estimated_bytes: int
    param_bytes: int
    loaded_at: float = field(default_factory=time.time)
    requests: int = 0
    status: ModelStatus = ModelStatus.READY

    def info(self) -> dict[str, Any]:
        return _info(
            self, load_seconds=round(self.load_seconds, 6), param_bytes=self.param_bytes, requests=self.requests
        )


@dataclass
class FailedLoad:
    """The last failed (or cancelled) load of an id; cleared when a new load starts."""

    model_id: str
    config: ModelConfig
    generation: int
    error: str
    seconds: float
    estimated_bytes: int
    status: ModelStatus = ModelStatus.FAILED

    def info(self) -> dict[str, Any]:
        return _info(self, load_seconds=round(self.seconds, 6), error=self.error)


def _available_memory() -> int:
    return int(psutil.virtual_memory().available)


def _seconds(value: Any, what: str) -> float | None:
    """``value`` as a time limit: ``None``, or a positive finite number of seconds (NaN, zero or
    a negative number timed a load out at once; infinity is ``None``'s job)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds or None, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive finite number of seconds or None, got {value!r}")
    return value


class AsyncModelManager:
    """Load, serve and unload models from one asyncio event loop.

    ``max_workers`` sizes the load pool (loads beyond it queue). ``default_timeout`` applies to
    loads whose config has no ``load_timeout``. ``memory_reserve_bytes`` is kept free on top of
    every estimate; ``check_resources=False`` disables the memory check. ``available_memory`` may
    replace the psutil probe (a callable returning bytes).
    """

    def __init__(
        self,
        loader: ModelLoader | None = None,
        *,
        max_workers: int = 2,
        default_timeout: float | None = None,
        check_resources: bool = True,
        memory_reserve_bytes: int = 256 << 20,
        available_memory: Callable[[], int] | None = None,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.loader = loader if loader is not None else ModelLoader()
        self.default_timeout = _seconds(default_timeout, "default_timeout")
        self.check_resources = check_resources
        self.memory_reserve_bytes = int(memory_reserve_bytes)
        self._available_memory = available_memory or _available_memory
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="model-load")
        self._lock = asyncio.Lock()
        self._entries: dict[str, LoadingPlaceholder | ManagedModel] = {}
        self._failures: dict[str, FailedLoad] = {}
        # generation -> placeholder of a load given up while its worker still runs (loop thread only)
        self._abandoned: dict[int, LoadingPlaceholder] = {}
        self._generations = itertools.count(1)
        self._stats_lock = threading.Lock()
        self._stats = {
            "loads_started": 0,
            "loads_ready": 0,
            "loads_failed": 0,
            "loads_cancelled": 0,
            "orphans_dropped": 0,
            "duplicates_refused": 0,
            "workers_running": 0,
        }
        self._closed = False

    # -- context management -------------------------------------------------------------
    async def __aenter__(self) -> AsyncModelManager:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.shutdown()

    async def shutdown(self, wait: bool = True) -> None:
        """Cancel loads in flight, drop every model and stop the pool (waiting for running
        workers in a thread when ``wait``, so the loop stays free)."""
        self._closed = True
        async with self._lock:
            for entry in list(self._entries.values()):
                if isinstance(entry, LoadingPlaceholder):
                    self._cancel_placeholder(entry, "manager shut down")
            self._entries.clear()
        if wait:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: self._executor.shutdown(wait=True, cancel_futures=True)
            )
        else:
            self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("manager shut down")

    # -- loading --------------------------------------------------------------------------
    async def load_model(self, config: ModelConfig, *, timeout: float | None = None) -> ManagedModel:
        """Load ``config`` and register it; return the :class:`ManagedModel`.

        Raises :class:`~splitlearn.model_loader.ConfigError` (bad config, nothing registered),
        :class:`DuplicateModelError`, :class:`InsufficientResourcesError`,
        :class:`LoadTimeoutError`, the loader's error, or ``CancelledError`` when the caller is
        cancelled. In every failing case the placeholder is gone when this returns.

        If an earlier load of this id was given up but its worker still runs, this load waits
        for that worker to end before it starts (see the module notes); the time limit covers
        the wait.
        """
        if self._closed:
            raise ModelManagerError("manager is shut down")
        config.validate()  # outside the lock: fast, may stat files
        # Outside the lock and off the loop: a split family's estimate reads the checkpoint's
        # headers and, the first time, imports transformers and the family's module.
        estimate = await asyncio.get_running_loop().run_in_executor(None, self.loader.estimate_memory, config)
        model_id = config.model_id

        t_lock = time.perf_counter()
        async with self._lock:  # short: no await inside
            if self._closed:
                raise ModelManagerError("manager is shut down")
            self._refuse_duplicate(model_id)
            self._check_memory(model_id, estimate)
            ph = LoadingPlaceholder(model_id, config, next(self._generations), estimate)
            ph.waits_for = self._abandoned_of(model_id)
            self._entries[model_id] = ph
            self._failures.pop(model_id, None)

        t0 = time.perf_counter()
        # From here on the placeholder is in the table: everything that can raise (a time limit
        # that is not a number included) runs inside the try, so that _abandon removes it.
        try:
            log.info(
                "placeholder for %r (generation %d) inserted in %.3f ms; estimate %.1f MiB",
                model_id,
                ph.generation,
                (time.perf_counter() - t_lock) * 1e3,
                estimate / 2**20,
            )
            limit = _seconds(
                timeout
                if timeout is not None
                else (config.load_timeout if config.load_timeout is not None else self.default_timeout),
                "timeout",
            )
            loop = asyncio.get_running_loop()
            deadline = None if limit is None else loop.time() + limit
            ph.aborted = loop.create_future()
            if ph.waits_for is not None:
                await self._wait_for_abandoned(ph, limit)
            ph.future = self._executor.submit(self._run_load, ph)
            self._bump("loads_started")
            ph.waiter = asyncio.wrap_future(ph.future)
            left = None if deadline is None else max(0.0, deadline - loop.time())
            done, _ = await asyncio.wait({ph.waiter, ph.aborted}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if ph.aborted in done:  # unload_model / shutdown: their reason wins over the worker's
                raise LoadCancelled(f"load of {model_id!r} (generation {ph.generation}) stopped: {ph.aborted.result()}")
            elif ph.waiter in done:
                model = ph.waiter.result()  # the loader's exception, if any
            else:
                raise LoadTimeoutError(
                    f"load of {model_id!r} did not finish within {limit:g} s; its placeholder was removed "
                    "and the load was told to stop"
                )
            async with self._lock:  # short: no await inside
                if self._entries.get(model_id) is not ph:
                    raise LoadCancelled(
                        f"load of {model_id!r} (generation {ph.generation}) finished after it was unloaded or replaced"
                    )
                managed = ManagedModel(
                    model_id, config, model, ph.generation, time.perf_counter() - t0, estimate, param_bytes(model)
                )
                self._entries[model_id] = managed
                del model
        except BaseException as exc:
            self._abandon(ph, exc, time.perf_counter() - t0)
            raise
        finally:
            ph.future = ph.waiter = None  # the placeholder keeps no result alive
        self._bump("loads_ready")
        log.info(
            "model %r ready (generation %d) in %.3f s, %.1f MiB of parameters",
            model_id,
            ph.generation,
            managed.load_seconds,
            managed.param_bytes / 2**20,
        )
        return managed

    def _refuse_duplicate(self, model_id: str) -> None:
        entry = self._entries.get(model_id)
        if entry is None:
            return
        self._bump("duplicates_refused")
        log.info("duplicate load of %r refused (%s)", model_id, entry.status.value)
        if isinstance(entry, LoadingPlaceholder):
            raise DuplicateModelError(
                f"model {model_id!r} is already loading (generation {entry.generation}, "
                f"started {time.monotonic() - entry.started:.3f} s ago); wait for it or unload it first"
            )
        raise DuplicateModelError(
            f"model {model_id!r} is already loaded (generation {entry.generation}); unload it first"
        )

    def _check_memory(self, model_id: str, estimate: int) -> None:
        """Estimate + loads in flight + loads given up whose workers still run + reserve must fit
        the available memory. A load waiting for an abandoned one of its id never runs beside it,
        so the two count once, at the larger of their estimates."""
        if not self.check_resources:
            return
        available = self._available_memory()
        in_flight = sum(e.estimated_bytes for e in self._entries.values() if isinstance(e, LoadingPlaceholder))
        abandoned = 0
        for old in self._abandoned.values():
            if old.model_id == model_id:
                successor = estimate  # the load being checked will wait for it
            else:
                entry = self._entries.get(old.model_id)
                successor = entry.estimated_bytes if isinstance(entry, LoadingPlaceholder) and entry.waits_for is old else 0
            abandoned += max(0, old.estimated_bytes - successor)
        needed = estimate + in_flight + abandoned + self.memory_reserve_bytes
        if needed > available:
            raise InsufficientResourcesError(
                f"not enough memory to load {model_id!r}: estimate {estimate / 2**20:.1f} MiB + loads in flight "
                f"{in_flight / 2**20:.1f} MiB + loads given up but still running {abandoned / 2**20:.1f} MiB + "
                f"reserve {self.memory_reserve_bytes / 2**20:.1f} MiB > available {available / 2**20:.1f} MiB"
            )

    def _abandoned_of(self, model_id: str) -> LoadingPlaceholder | None:
        """The latest load of ``model_id`` given up while its worker still runs, if any."""
        olds = [old for old in self._abandoned.values() if old.model_id == model_id]
        return max(olds, key=lambda old: old.generation) if olds else None

    async def _wait_for_abandoned(self, ph: LoadingPlaceholder, limit: float | None) -> None:
        """Hold ``ph`` (no worker yet) until the worker of the abandoned load it follows has
        ended, within ``limit``; an unload or shutdown meanwhile stops it as usual."""
        old = ph.waits_for
        assert old is not None and old.worker_ended is not None and ph.aborted is not None
        log.info(
            "load of %r (generation %d) waits for generation %d: given up, but still running in its worker "
            "(%.3f s since it started)",
            ph.model_id,
            ph.generation,
            old.generation,
            time.monotonic() - old.started,
        )
        done, _ = await asyncio.wait({old.worker_ended, ph.aborted}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        if ph.aborted in done:
            raise LoadCancelled(
                f"load of {ph.model_id!r} (generation {ph.generation}) stopped before it started: {ph.aborted.result()}"
            )
        if not done:
            raise LoadTimeoutError(
                f"load of {ph.model_id!r} did not finish within {limit:g} s: it did not even start, as the earlier "
                f"load of that id (generation {old.generation}), given up, was still running in its worker "
                f"({time.monotonic() - old.started:.1f} s after it started); its placeholder was removed"
            )
        ph.waits_for = None
        log.info("load of %r (generation %d) starts: generation %d has ended", ph.model_id, ph.generation, old.generation)

    def _track_abandoned(self, ph: LoadingPlaceholder) -> None:
        """On the loop thread, for a load whose placeholder is being removed: if its worker is
        still running, count it as abandoned-but-running until the worker returns."""
        fut = ph.future
        if fut is None or fut.done() or ph.generation in self._abandoned:
            return
        loop = asyncio.get_running_loop()
        ph.worker_ended = loop.create_future()
        self._abandoned[ph.generation] = ph

        def ended(_: concurrent.futures.Future) -> None:  # in the worker thread (or here, if already done)
            try:
                loop.call_soon_threadsafe(self._abandoned_ended, ph)
            except RuntimeError:  # the loop is closed: nobody is left to wait or to count
                pass

        fut.add_done_callback(ended)
        log.info(
            "load of %r (generation %d) abandoned while its worker runs; its %.1f MiB still count until it ends",
            ph.model_id,
            ph.generation,
            ph.estimated_bytes / 2**20,
        )

    def _abandoned_ended(self, ph: LoadingPlaceholder) -> None:
        if self._abandoned.pop(ph.generation, None) is None:
            return
        if ph.worker_ended is not None and not ph.worker_ended.done():
            ph.worker_ended.set_result(None)
        log.info("worker of the abandoned load of %r (generation %d) has ended", ph.model_id, ph.generation)

    def _run_load(self, ph: LoadingPlaceholder) -> Any:
        """In a worker thread. A result produced after the caller gave up is dropped here."""
        with self._stats_lock:
            self._stats["workers_running"] += 1
        try:
            if ph.cancel_event.is_set():
                raise LoadCancelled(f"load of {ph.model_id!r} cancelled before it started")
            log.info("worker loading %r (generation %d)", ph.model_id, ph.generation)
            model = self.loader.load_from_config(ph.config, cancel_event=ph.cancel_event)
            if ph.cancel_event.is_set():
                del model  # the only reference: nothing registers it
                self._bump("orphans_dropped")
                log.warning(
                    "load of %r (generation %d) finished after its caller gave up; result dropped",
                    ph.model_id,
                    ph.generation,
                )
                raise LoadCancelled(f"load of {ph.model_id!r} finished after its caller gave up; result dropped")
            return model
        finally:
            with self._stats_lock:
                self._stats["workers_running"] -= 1

    def _cancel_placeholder(self, ph: LoadingPlaceholder, why: str) -> None:
        """Tell a load to stop: withdraw it if it has not started, set its cancel event (checked
        by the loader between stages), count it as abandoned-but-running if its worker is
        already running, and wake its ``load_model`` caller. Called wherever a placeholder
        leaves the table before its load has finished."""
        ph.cancel_event.set()
        if ph.future is not None and ph.future.cancel():
            log.info("load of %r (generation %d) withdrawn before it started: %s", ph.model_id, ph.generation, why)
        self._track_abandoned(ph)
        if ph.aborted is not None and not ph.aborted.done():
            ph.aborted.set_result(why)

    def _abandon(self, ph: LoadingPlaceholder, exc: BaseException, seconds: float) -> None:
        """Synchronous, on the loop thread (no await, so it completes even while the caller is
        being cancelled): stop the load, remove the placeholder if it is still ours, drop a
        result nobody will register, record the failure."""
        cancelled = isinstance(exc, (asyncio.CancelledError, LoadTimeoutError, LoadCancelled))
        self._cancel_placeholder(ph, f"caller gave up ({type(exc).__name__})")
        fut = ph.future
        if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
            # The worker had already returned: its model exists but will never be registered.
            self._bump("orphans_dropped")
            log.warning(
                "load of %r (generation %d) finished but is not registered (%s); result dropped",
                ph.model_id,
                ph.generation,
                type(exc).__name__,
            )
        if ph.waiter is not None and not ph.waiter.done():
            ph.waiter.cancel()  # no "exception never retrieved" later; the worker result is discarded
        if self._entries.get(ph.model_id) is ph:
            del self._entries[ph.model_id]
        if ph.model_id not in self._entries:
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._failures[ph.model_id] = FailedLoad(
                ph.model_id, ph.config, ph.generation, message, seconds, ph.estimated_bytes
            )
        self._bump("loads_cancelled" if cancelled else "loads_failed")
        log.log(
            logging.INFO if cancelled else logging.ERROR,
            "load of %r (generation %d) %s after %.3f s: %s: %s",
            ph.model_id,
            ph.generation,
            "cancelled" if cancelled else "failed",
            seconds,
            type(exc).__name__,
            exc,
        )

    # -- serving --------------------------------------------------------------------------
    async def get_model(self, model_id: str) -> Any:
        """The loaded module. Raises :class:`ModelNotReadyError` while it loads and
        :class:`ModelNotFoundError` when absent (naming the last failure, if any)."""
        async with self._lock:  # short
            entry = self._entries.get(model_id)
            if isinstance(entry, ManagedModel):
                entry.requests += 1
                return entry.model
        if isinstance(entry, LoadingPlaceholder):
            raise ModelNotReadyError(
                f"model {model_id!r} is still loading ({time.monotonic() - entry.started:.3f} s so far)"
            )
        failure = self._failures.get(model_id)
        if failure is not None:
            raise ModelNotFoundError(f"model {model_id!r} is not loaded: its last load failed: {failure.error}")
        raise ModelNotFoundError(f"model {model_id!r} is not loaded (known: {sorted(self._entries)})")

    def status(self, model_id: str) -> dict[str, Any]:
        """loading / ready / failed, with load time and memory; ModelNotFoundError if unknown."""
        entry = self._entries.get(model_id) or self._failures.get(model_id)
        if entry is None:
            raise ModelNotFoundError(
                f"no model {model_id!r} (known: {sorted(set(self._entries) | set(self._failures))})"
            )
        return entry.info()

    def list_models(self) -> list[dict[str, Any]]:
        """Status of every model loading, ready, or whose last load failed, sorted by id."""
        rows = {k: v.info() for k, v in self._failures.items()}
        rows.update({k: v.info() for k, v in self._entries.items()})
        return [rows[k] for k in sorted(rows)]

    def stats(self) -> dict[str, int]:
        """Counters; ``abandoned_running``: loads given up whose workers have not returned yet."""
        with self._stats_lock:
            out = dict(self._stats)
        out["abandoned_running"] = len(self._abandoned)
        return out

    def _bump(self, key: str) -> None:
        with self._stats_lock:
            self._stats[key] += 1

    # -- unloading ------------------------------------------------------------------------
    async def unload_model(self, model_id: str) -> bool:
        """Remove a ready model, or cancel a loading one (its ``load_model`` raises
        :class:`~splitlearn.model_loader.LoadCancelled`). Returns False if there was none;
        also clears a failure record."""
        async with self._lock:  # short
            entry = self._entries.pop(model_id, None)
            had_failure = self._failures.pop(model_id, None) is not None
        if isinstance(entry, LoadingPlaceholder):
            self._cancel_placeholder(entry, "unloaded while loading")
            log.info("unloaded %r while loading (generation %d)", model_id, entry.generation)
            return True
        if isinstance(entry, ManagedModel):
            entry.model = None  # drop the manager's reference
            log.info("unloaded %r (generation %d)", model_id, entry.generation)
            return True
        return had_failure
