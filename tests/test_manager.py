"""AsyncModelManager: the state machine of one model id, duplicates, resources, failures,
timeouts, cancellation, unload, and late results. Loads are real (a torch.nn.Linear state dict in
safetensors through ModelLoader); slow loads block on events the test controls."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from repro.scenarios._manager_common import StagedLoader
from splitlearn.errors import SplitLearnError
from splitlearn.manager import (
    AsyncModelManager,
    DuplicateModelError,
    InsufficientResourcesError,
    LoadTimeoutError,
    ModelManagerError,
    ModelNotFoundError,
    ModelNotReadyError,
    ModelStatus,
)
from splitlearn.model_loader import ConfigError, LoadCancelled, ModelConfig, ModelLoadError

pytestmark = pytest.mark.timeout(120)
LIN_KW = {"in_features": 4, "out_features": 2}


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "lin.safetensors"
    save_file(torch.nn.Linear(**LIN_KW).state_dict(), str(path))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:30])
    return path, broken


def cfg(path, model_id="m", **kw):
    return ModelConfig(model_id, "pytorch", str(path), model_class="torch.nn:Linear", model_kwargs=dict(LIN_KW), **kw)


def run(coro):
    return asyncio.run(coro)


class Gates:
    """Events the test opens; every one is opened at teardown so no worker outlives a test."""

    def __init__(self):
        self.events: dict[str, threading.Event] = {}

    def __getitem__(self, name):
        return self.events.setdefault(name, threading.Event())

    def open_all(self):
        for e in self.events.values():
            e.set()


@pytest.fixture()
def gates():
    g = Gates()
    yield g
    g.open_all()


class Watch:
    """Wakes waiters when poked from any thread (loader starts, task completions); waiting is
    event-driven with a deadline, never a timed poll."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.cond = asyncio.Condition()

    def poke(self, *_):
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._notify()))

    async def _notify(self):
        async with self.cond:
            self.cond.notify_all()

    async def until(self, predicate, what, timeout=10.0):
        try:
            async with self.cond:
                await asyncio.wait_for(self.cond.wait_for(predicate), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"timed out waiting for {what}") from None


def watched_loader(gates, names=("g",)):
    """A StagedLoader whose load starts poke a Watch of the running loop."""
    watch = Watch()
    return StagedLoader(gates={n: gates[n] for n in names}, on_start=watch.poke, gate_timeout=20.0), watch


class _PokeOnLog(logging.Handler):
    def __init__(self, watch):
        super().__init__(logging.DEBUG)
        self.watch = watch

    def emit(self, record):
        self.watch.poke()


@contextlib.contextmanager
def manager_logs_poke(watch):
    """Every record the manager logs (a load parked, a worker ended...) pokes ``watch``: a wait
    on manager state is woken by the manager's own events."""
    logger = logging.getLogger("splitlearn.manager")
    handler, level = _PokeOnLog(watch), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def waiting_for(mgr, model_id):
    try:
        return mgr.status(model_id).get("waiting_for_generation")
    except ModelNotFoundError:
        return None


async def give_up_a_held_load(mgr, path, model_id="m", **kw):
    """Load ``model_id`` in a worker held at gate "g" that ignores cancellation, and give the
    load up after 0.1 s: the caller gets LoadTimeoutError, the worker runs on until the gate opens."""
    held = cfg(path, model_id, metadata={"gate": "g", "ignore_cancel": True}, **kw)
    with pytest.raises(LoadTimeoutError):
        await mgr.load_model(held, timeout=0.1)


def start_load(mgr, watch, config):
    """``mgr.load_model(config)`` as a task whose end pokes ``watch``."""
    task = asyncio.create_task(mgr.load_model(config))
    task.add_done_callback(watch.poke)
    return task


# -- happy path --------------------------------------------------------------------------
def test_load_get_status_list_unload(ckpt):
    path, _ = ckpt

    async def main():
        async with AsyncModelManager() as mgr:
            managed = await mgr.load_model(cfg(path))
            assert managed.status is ModelStatus.READY and managed.generation == 1
            model = await mgr.get_model("m")
            assert isinstance(model, torch.nn.Linear) and not model.training
            st_ = mgr.status("m")
            assert st_["status"] == "ready" and st_["load_seconds"] > 0
            assert st_["param_bytes"] == (8 + 2) * 4 and st_["estimated_bytes"] == 2 * path.stat().st_size
            assert st_["requests"] == 1
            assert [r["model_id"] for r in mgr.list_models()] == ["m"]
            assert await mgr.unload_model("m") is True
            assert await mgr.unload_model("m") is False
            with pytest.raises(ModelNotFoundError, match="'m' is not loaded"):
                await mgr.get_model("m")
            with pytest.raises(ModelNotFoundError):
                mgr.status("m")
            assert mgr.list_models() == []
            # a fresh load after unload gets a new generation
            assert (await mgr.load_model(cfg(path))).generation == 2

    run(main())


def test_bad_config_registers_nothing(tmp_path):
    async def main():
        async with AsyncModelManager() as mgr:
            with pytest.raises(ConfigError, match="is not a file"):
                await mgr.load_model(cfg(tmp_path / "missing.safetensors"))
            with pytest.raises(ConfigError, match="split_points"):
                await mgr.load_model(ModelConfig("s", "gpt2", tmp_path, component="top", split_points=[3, 1]))
            assert mgr.list_models() == [] and mgr.stats()["loads_started"] == 0

    run(main())


# -- duplicates ------------------------------------------------------------------------------
def test_duplicate_refused_while_loading_and_when_loaded(ckpt, gates):
    path, _ = ckpt

    async def main():
        loader, watch = watched_loader(gates)
        async with AsyncModelManager(loader) as mgr:
            first = asyncio.create_task(mgr.load_model(cfg(path, metadata={"gate": "g"})))
            await watch.until(lambda: loader.started == 1, "the first load to start")
            assert mgr.status("m")["status"] == "loading"
            with pytest.raises(DuplicateModelError, match="'m' is already loading") as ei:
                await mgr.load_model(cfg(path))
            assert isinstance(ei.value, ValueError) and isinstance(ei.value, SplitLearnError)
            with pytest.raises(ModelNotReadyError, match="still loading"):
                await mgr.get_model("m")
            gates["g"].set()
            await first
            with pytest.raises(DuplicateModelError, match="'m' is already loaded"):
                await mgr.load_model(cfg(path))
            assert loader.started == 1 and mgr.stats()["duplicates_refused"] == 2

    run(main())


def test_many_concurrent_loads_one_runs(ckpt, gates):
    path, _ = ckpt

    async def main():
        loader, watch = watched_loader(gates)
        async with AsyncModelManager(loader) as mgr:
            tasks = [asyncio.create_task(mgr.load_model(cfg(path, metadata={"gate": "g"}))) for _ in range(20)]
            for t in tasks:
                t.add_done_callback(watch.poke)
            await watch.until(lambda: sum(t.done() for t in tasks) == 19 and loader.started == 1, "19 refusals and one load")
            gates["g"].set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert sum(isinstance(r, DuplicateModelError) for r in results) == 19
            assert loader.started == 1

    run(main())


def test_other_models_served_while_one_loads(ckpt, gates):
    """The lock is not held across the load: get_model/list_models/status of another model
    complete while the load is blocked (no timing involved: the gate is still closed)."""
    path, _ = ckpt

    async def main():
        loader, watch = watched_loader(gates)
        async with AsyncModelManager(loader) as mgr:
            await mgr.load_model(cfg(path, "ready"))
            slow = asyncio.create_task(mgr.load_model(cfg(path, "slow", metadata={"gate": "g"})))
            await watch.until(lambda: loader.started == 2, "the slow load to start")
            model = await asyncio.wait_for(mgr.get_model("ready"), 5)
            assert model(torch.ones(1, 4)).shape == (1, 2)
            assert {r["model_id"]: r["status"] for r in mgr.list_models()} == {"ready": "ready", "slow": "loading"}
            assert not slow.done()
            gates["g"].set()
            await slow

    run(main())


# -- resources -------------------------------------------------------------------------------
def test_resource_check_refuses_and_counts_loads_in_flight(ckpt, gates):
    path, _ = ckpt
    mib = 1 << 20

    async def main():
        loader, watch = watched_loader(gates)
        async with AsyncModelManager(loader, available_memory=lambda: 10 * mib, memory_reserve_bytes=mib) as mgr:
            with pytest.raises(InsufficientResourcesError, match=r"not enough memory to load 'huge'.*estimate 20.0 MiB"):
                await mgr.load_model(cfg(path, "huge", memory_estimate_bytes=20 * mib))
            assert mgr.list_models() == []
            a = asyncio.create_task(mgr.load_model(cfg(path, "a", memory_estimate_bytes=5 * mib, metadata={"gate": "g"})))
            await watch.until(lambda: loader.started == 1, "load a to start")
            with pytest.raises(InsufficientResourcesError, match=r"loads in flight 5.0 MiB"):
                await mgr.load_model(cfg(path, "b", memory_estimate_bytes=5 * mib))
            gates["g"].set()
            await a
            await mgr.load_model(cfg(path, "b", memory_estimate_bytes=5 * mib))  # a is no longer in flight

    run(main())


def test_memory_check_of_a_split_part_counts_the_part_not_the_checkpoint():
    """The trunk of a sharded checkpoint loaded incrementally fits in less than the whole
    checkpoint: a budget below 2x the checkpoint (the former estimate) admits it."""
    from fixtures.models import tiny_model_dir
    from splitlearn.model_loader import ModelLoader

    tiny = tiny_model_dir("gpt2", sharded=True)
    whole = sum(f.stat().st_size for f in tiny.glob("*.safetensors"))
    trunk = ModelConfig("trunk", "gpt2", str(tiny), component="trunk", split_points=[2, 4], low_memory=True)
    part = ModelLoader().estimate_memory(trunk)
    assert part < whole

    async def main():
        async with AsyncModelManager(available_memory=lambda: whole, memory_reserve_bytes=0) as mgr:
            managed = await mgr.load_model(trunk)
            assert managed.estimated_bytes == part == mgr.status("trunk")["estimated_bytes"]
            assert managed.param_bytes <= part

    run(main())


def test_real_psutil_check_refuses_an_absurd_estimate(ckpt):
    path, _ = ckpt

    async def main():
        async with AsyncModelManager() as mgr:
            with pytest.raises(InsufficientResourcesError, match="available"):
                await mgr.load_model(cfg(path, memory_estimate_bytes=1 << 55))
            async with AsyncModelManager(check_resources=False) as unchecked:
                await unchecked.load_model(cfg(path, memory_estimate_bytes=1 << 55))

    run(main())


# -- failures, timeouts, cancellation -----------------------------------------------------------
def test_failed_load_leaves_failure_record_and_retry_works(ckpt):
    path, broken = ckpt

    async def main():
        async with AsyncModelManager() as mgr:
            with pytest.raises(ModelLoadError, match="cannot read safetensors"):
                await mgr.load_model(cfg(broken))
            await _failed_then_reloads(mgr, path, "ModelLoadError")
            assert mgr.stats()["loads_failed"] == 1

    run(main())


async def _failed_then_reloads(mgr, path, error):
    """Model "m"'s last load failed with ``error``: its status and get_model say so, and a new
    load of it (generation 2) is taken and ends ready."""
    st_ = mgr.status("m")
    assert st_["status"] == "failed" and error in st_["error"], st_
    with pytest.raises(ModelNotFoundError, match=f"its last load failed: {error}"):
        await mgr.get_model("m")
    managed = await mgr.load_model(cfg(path))
    assert managed.generation == 2 and mgr.status("m")["status"] == "ready"


@pytest.mark.parametrize(
    "bad,error",
    [("5", TypeError), ([1.0], TypeError), (float("nan"), ValueError), (0, ValueError), (-1.0, ValueError)],
    ids=["str", "list", "nan", "zero", "negative"],
)
def test_error_right_after_the_placeholder_is_inserted_removes_it(ckpt, bad, error):
    """A time limit that is not a number, or not a positive finite one (NaN, zero and negative
    limits timed the load out at once, as if it had been slow), fails once the placeholder is in
    the table: the placeholder must still be removed (load_model's promise: in every failing
    case it is gone), or every later load of the id is refused as a duplicate and get_model
    says "still loading"."""
    path, _ = ckpt

    async def main():
        async with AsyncModelManager() as mgr:
            with pytest.raises(error, match="timeout must be"):
                await mgr.load_model(cfg(path), timeout=bad)
            await _failed_then_reloads(mgr, path, error.__name__)
            assert mgr.stats()["workers_running"] == 0

    run(main())


@pytest.mark.parametrize("how", ["load_timeout", "timeout_arg", "default_timeout"])
def test_timeout_removes_placeholder_and_stops_the_worker(ckpt, how):
    path, _ = ckpt

    async def main():
        loader = StagedLoader()
        kw = {"default_timeout": 0.2} if how == "default_timeout" else {}
        async with AsyncModelManager(loader, **kw) as mgr:
            slow = cfg(path, metadata={"io_seconds": 60.0}, **({"load_timeout": 0.2} if how == "load_timeout" else {}))
            with pytest.raises(LoadTimeoutError, match="did not finish within 0.2 s") as ei:
                await mgr.load_model(slow, **({"timeout": 0.2} if how == "timeout_arg" else {}))
            assert isinstance(ei.value, TimeoutError)
            assert mgr.status("m")["status"] == "failed"
            rec = loader.calls("m")[0]
            assert await asyncio.get_running_loop().run_in_executor(None, rec.done.wait, 10)
            assert rec.outcome == "cancelled"  # the fetch saw the cancel event
            assert (await mgr.load_model(cfg(path))).generation == 2

    run(main())


def test_caller_cancelled_by_wait_for(ckpt):
    path, _ = ckpt

    async def main():
        loader = StagedLoader()
        async with AsyncModelManager(loader) as mgr:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(mgr.load_model(cfg(path, metadata={"io_seconds": 60.0})), 0.2)
            assert mgr.status("m")["status"] == "failed" and "CancelledError" in mgr.status("m")["error"]
            rec = loader.calls("m")[0]
            assert await asyncio.get_running_loop().run_in_executor(None, rec.done.wait, 10)
            assert rec.outcome == "cancelled"
            await mgr.load_model(cfg(path))
            assert mgr.stats()["loads_cancelled"] == 1 and mgr.stats()["workers_running"] == 0

    run(main())


def test_queued_load_given_up_before_it_starts_never_runs(ckpt, gates):
    path, _ = ckpt

    async def main():
        loader, watch = watched_loader(gates)
        async with AsyncModelManager(loader, max_workers=1) as mgr:
            busy = asyncio.create_task(mgr.load_model(cfg(path, "busy", metadata={"gate": "g"})))
            await watch.until(lambda: loader.started == 1, "the pool's only worker to be busy")
            with pytest.raises(LoadTimeoutError):
                await mgr.load_model(cfg(path, "queued"), timeout=0.1)  # still queued behind "busy"
            gates["g"].set()
            await busy
            assert [r.model_id for r in loader.records] == ["busy"]  # the queued load never ran
            assert mgr.status("queued")["status"] == "failed"
            await mgr.load_model(cfg(path, "queued"))

    run(main())


def test_late_result_after_caller_gave_up_is_dropped_not_registered(ckpt, gates):
    """A load that cannot be interrupted finishes after its caller gave up and after a retry
    registered the id: the late model is dropped in the worker and freed."""
    path, _ = ckpt

    async def main():
        loader, watch = watched_loader(gates)
        mgr = AsyncModelManager(loader, max_workers=2)
        await give_up_a_held_load(mgr, path)
        with manager_logs_poke(watch):
            retry_task = start_load(mgr, watch, cfg(path))
            # the retry is accepted but waits for the orphan's worker (never two copies at once)
            await watch.until(lambda: waiting_for(mgr, "m") == 1 or loader.started == 2, "the retry to wait")
            assert loader.started == 1
            gates["g"].set()
            retry = await asyncio.wait_for(retry_task, 10)
        assert retry.generation == 2
        await mgr.shutdown()  # joins the pool: the orphan has finished
        gc.collect()
        orphan = loader.calls("m")[0]
        assert orphan.outcome == "model" and orphan.model_ref() is None
        assert mgr.stats()["orphans_dropped"] == 1
        return retry

    retry = run(main())
    assert retry.generation == 2


def test_unload_while_loading_wakes_the_caller_and_drops_the_result(ckpt, gates):
    path, _ = ckpt

    async def main():
        loader, watch = watched_loader(gates)
        async with AsyncModelManager(loader) as mgr:
            task = asyncio.create_task(mgr.load_model(cfg(path, metadata={"gate": "g", "ignore_cancel": True})))
            await watch.until(lambda: loader.started == 1, "the load to start")
            assert await mgr.unload_model("m") is True
            with pytest.raises(LoadCancelled, match="unloaded while loading"):
                await asyncio.wait_for(task, 5)  # woken at once, while the worker is still blocked
            assert not loader.calls("m")[0].done.is_set()
            with manager_logs_poke(watch):
                # the id is free again: a new load is accepted, and starts once the old worker has ended
                retry = start_load(mgr, watch, cfg(path))
                await watch.until(lambda: waiting_for(mgr, "m") == 1 or loader.started == 2, "the new load to wait")
                assert loader.started == 1 and mgr.status("m")["status"] == "loading"
                gates["g"].set()
                assert (await asyncio.wait_for(retry, 10)).generation == 2
            assert loader.calls("m")[0].done.is_set()
        assert mgr.stats()["orphans_dropped"] == 1

    run(main())


# -- loads given up while their worker still runs ----------------------------------------------
def test_retry_waits_for_the_given_up_load_still_in_its_worker(ckpt, gates):
    """A load Python cannot interrupt is given up (timeout); an immediate retry of the same id is
    accepted but does not start a second copy while the first worker still runs."""
    path, _ = ckpt

    async def main():
        loader, watch = watched_loader(gates)
        async with AsyncModelManager(loader, max_workers=2) as mgr:
            await give_up_a_held_load(mgr, path)
            with manager_logs_poke(watch):
                retry = start_load(mgr, watch, cfg(path))
                await watch.until(
                    lambda: retry.done() or loader.started == 2 or waiting_for(mgr, "m") == 1,
                    "the retry to wait, or to load beside the first",
                )
                assert loader.started == 1, "a second copy started loading while the first was still in its worker"
                assert mgr.stats()["abandoned_running"] == 1
                row = mgr.status("m")
                assert row["status"] == "loading" and row["generation"] == 2 and row["waiting_for_generation"] == 1
                with pytest.raises(DuplicateModelError, match="already loading"):
                    await mgr.load_model(cfg(path))
                gates["g"].set()  # the first worker returns; its late result is dropped
                managed = await asyncio.wait_for(retry, 10)
            first, second = loader.calls("m")
            assert first.ended <= second.started  # one copy at a time
            assert managed.generation == 2 and mgr.status("m")["waiting_for_generation"] is None
            assert mgr.stats()["abandoned_running"] == 0 and mgr.stats()["orphans_dropped"] == 1

    run(main())


def test_memory_of_a_given_up_load_counts_until_its_worker_ends(ckpt, gates):
    path, _ = ckpt
    mib = 1 << 20

    async def main():
        loader, watch = watched_loader(gates)
        async with AsyncModelManager(loader, available_memory=lambda: 10 * mib, memory_reserve_bytes=mib) as mgr:
            await give_up_a_held_load(mgr, path, "a", memory_estimate_bytes=5 * mib)
            assert mgr.status("a")["status"] == "failed"  # its placeholder is gone at once...
            with pytest.raises(InsufficientResourcesError, match=r"loads given up but still running 5.0 MiB"):
                await mgr.load_model(cfg(path, "b", memory_estimate_bytes=5 * mib))  # ...its memory is not
            assert mgr.list_models()[0]["model_id"] == "a" and len(mgr.list_models()) == 1
            # a retry of "a" never runs beside it, so the two count once: admitted, it waits
            with manager_logs_poke(watch):
                retry = start_load(mgr, watch, cfg(path, "a", memory_estimate_bytes=5 * mib))
                await watch.until(lambda: retry.done() or waiting_for(mgr, "a") == 1, "the retry of 'a' to wait")
                assert not retry.done()
                gates["g"].set()
                await asyncio.wait_for(retry, 10)
            assert mgr.stats()["abandoned_running"] == 0
            await mgr.load_model(cfg(path, "b", memory_estimate_bytes=5 * mib))  # the worker has ended

    run(main())


def test_retry_time_limit_covers_the_wait_for_the_earlier_worker(ckpt, gates):
    path, _ = ckpt

    async def main():
        loader, _ = watched_loader(gates)
        async with AsyncModelManager(loader) as mgr:
            await give_up_a_held_load(mgr, path)
            with pytest.raises(LoadTimeoutError, match=r"did not even start.*generation 1.*still running in its worker"):
                await mgr.load_model(cfg(path), timeout=0.2)
            assert loader.started == 1 and mgr.status("m")["status"] == "failed"
            assert mgr.stats()["abandoned_running"] == 1
            gates["g"].set()
            assert (await mgr.load_model(cfg(path))).generation == 3

    run(main())


def test_unload_of_a_waiting_retry_stops_it_before_it_starts(ckpt, gates):
    path, _ = ckpt

    async def main():
        loader, watch = watched_loader(gates)
        async with AsyncModelManager(loader) as mgr:
            await give_up_a_held_load(mgr, path)
            with manager_logs_poke(watch):
                retry = start_load(mgr, watch, cfg(path))
                await watch.until(lambda: retry.done() or waiting_for(mgr, "m") == 1, "the retry to wait")
            assert await mgr.unload_model("m") is True
            with pytest.raises(LoadCancelled, match="stopped before it started: unloaded while loading"):
                await asyncio.wait_for(retry, 5)
            assert loader.started == 1 and mgr.stats()["abandoned_running"] == 1
            gates["g"].set()

    run(main())


def test_shutdown_cancels_loads_and_refuses_new_ones(ckpt):
    path, _ = ckpt

    async def main():
        watch = Watch()
        loader = StagedLoader(on_start=watch.poke)
        mgr = AsyncModelManager(loader)
        task = asyncio.create_task(mgr.load_model(cfg(path, metadata={"io_seconds": 60.0})))
        await watch.until(lambda: loader.started == 1, "the load to start")
        await mgr.shutdown()
        with pytest.raises(LoadCancelled, match="manager shut down"):
            await task
        assert loader.calls("m")[0].outcome == "cancelled"
        with pytest.raises(ModelManagerError, match="shut down"):
            await mgr.load_model(cfg(path))

    run(main())


def test_manager_arguments():
    with pytest.raises(ValueError, match="max_workers"):
        AsyncModelManager(max_workers=0)


# -- state machine under random operation sequences --------------------------------------------
OPS = st.lists(
    st.tuples(st.sampled_from(["load", "load_fail", "load_timeout", "unload", "get"]), st.sampled_from(["a", "b"])),
    min_size=1,
    max_size=12,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_state_machine_matches_a_model(ckpt, ops):
    """After every operation the manager agrees with a plain dict model: ready ids are exactly
    those loaded and not unloaded; a failed/timed-out load leaves 'failed' (never 'loading')."""
    path, broken = ckpt

    async def main():
        async with AsyncModelManager(StagedLoader()) as mgr:
            model: dict[str, str] = {}
            for op, mid in ops:
                if op == "load":
                    if model.get(mid) == "ready":
                        with pytest.raises(DuplicateModelError):
                            await mgr.load_model(cfg(path, mid))
                    else:
                        await mgr.load_model(cfg(path, mid))
                        model[mid] = "ready"
                elif op in ("load_fail", "load_timeout"):
                    c = cfg(broken, mid) if op == "load_fail" else cfg(path, mid, metadata={"io_seconds": 30.0})
                    if model.get(mid) == "ready":
                        with pytest.raises(DuplicateModelError):
                            await mgr.load_model(c, timeout=0.05)
                    else:
                        with pytest.raises((ModelLoadError, LoadTimeoutError)):
                            await mgr.load_model(c, timeout=0.05 if op == "load_timeout" else None)
                        model[mid] = "failed"
                elif op == "unload":
                    assert await mgr.unload_model(mid) is (mid in model)
                    model.pop(mid, None)
                else:
                    if model.get(mid) == "ready":
                        await mgr.get_model(mid)
                    else:
                        with pytest.raises(ModelNotFoundError):
                            await mgr.get_model(mid)
                assert {r["model_id"]: r["status"] for r in mgr.list_models()} == model

    run(main())


@pytest.mark.parametrize("bad,error", [("5", TypeError), (float("nan"), ValueError), (0, ValueError), (float("inf"), ValueError)])
def test_a_default_timeout_that_is_no_time_limit_is_refused(bad, error):
    with pytest.raises(error, match="default_timeout must be"):
        AsyncModelManager(default_timeout=bad)
