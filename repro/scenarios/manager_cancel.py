"""Seed 004: a load that raises, and a load whose caller gives up (``asyncio.wait_for``).

After each, no placeholder may be left behind (the id is not "loading"), a retry must succeed,
and no worker may go on with work nobody waits for -- or, where Python cannot stop it, its
result must be dropped, not registered. Which of the two happened is recorded.

* fix ``raises``: the checkpoint is truncated -> ``ModelLoadError``; status ``failed``; the
  file is repaired; the retry loads.
* fix ``timeout``: the load's fetch (simulated storage I/O, 30 s) checks the cancel event;
  ``wait_for(..., 0.3)`` gives up -> the worker stops within milliseconds, the retry loads.
* fix ``orphan``: the fetch blocks on a gate this scenario holds (like a C call Python cannot
  interrupt) and the loader ignores cancellation; the caller gives up and retries the same id at
  once: the retry is accepted (status ``loading``) but waits for the orphan's worker instead of
  loading a second copy beside it; the gate opens: the orphan's model is dropped in its worker,
  never registered, and freed (weak reference dead), and only then does the retry load.
* hazard ``seed_raises`` / ``seed_timeout``: seed 004's manager as written, which has no cleanup
  on either path -> its placeholder stays and the retry is refused (FAIL everywhere). The leaked
  placeholder is the symptom (``ctx.symptom``); under ``ctx.only_symptoms_fail`` any other
  failed check there is an ERROR: the seed manager's abandoned worker runs on, for one, and
  must never stand in for the placeholder it is about.
"""

from __future__ import annotations

from repro.harness.spec import Outcome, fix, hazard, scenario


@scenario(
    name="manager_cancel",
    seed="004",
    claims=("004-placeholder-lock", "004-duplicate-refused"),
    timeout=90.0,
    variants=[
        fix("raises", params={"mode": "raises", "manager": "fixed"}),
        fix("timeout", params={"mode": "timeout", "manager": "fixed", "io_seconds": 30.0, "give_up_s": 0.3}),
        fix("orphan", params={"mode": "orphan", "manager": "fixed", "give_up_s": 0.3}),
        hazard(
            "seed_raises",
            params={"mode": "raises", "manager": "seed"},
            expect=Outcome.FAIL,
            doc="seed manager: a load that raises leaves its placeholder; the retry is refused",
        ),
        hazard(
            "seed_timeout",
            params={"mode": "timeout", "manager": "seed", "io_seconds": 2.0, "give_up_s": 0.3},
            expect=Outcome.FAIL,
            doc="seed manager: a caller that gives up leaves the placeholder; the retry is refused",
        ),
    ],
)
def manager_cancel(ctx) -> None:
    """Failed and abandoned loads leave nothing behind; the retry works."""
    import asyncio
    import gc
    import shutil
    import threading
    import time
    from pathlib import Path

    from repro.scenarios._manager_common import (
        SeedPlaceholderManager,
        StagedLoader,
        setup_logging,
        write_encoder_checkpoint,
    )
    from splitlearn.manager import AsyncModelManager, DuplicateModelError, ModelNotFoundError
    from splitlearn.model_loader import ModelConfig, ModelLoadError

    setup_logging()
    ctx.only_symptoms_fail()
    p = ctx.params
    mode, which = p["mode"], p["manager"]
    ctx.stage("prepare")
    base = write_encoder_checkpoint(ctx.workdir, "model", d_model=64)
    good = Path(base["model_path"])
    gate = threading.Event()
    loader = StagedLoader(gates={"held": gate})
    mgr = AsyncModelManager(loader, max_workers=2) if which == "fixed" else SeedPlaceholderManager(loader)
    ctx.observe(f"mode={mode} manager={type(mgr).__name__}")

    def state(model_id: str) -> str:
        if isinstance(mgr, AsyncModelManager):
            try:
                return mgr.status(model_id)["status"]
            except ModelNotFoundError:
                return "absent"
        entry = mgr.models.get(model_id)
        return (
            "absent"
            if entry is None
            else ("loading" if isinstance(entry, SeedPlaceholderManager.Placeholder) else "ready")
        )

    async def retry(cfg: ModelConfig) -> tuple[bool, str]:
        try:
            await asyncio.wait_for(mgr.load_model(cfg), timeout=max(5.0, ctx.remaining() / 3))
            return True, "loaded"
        except DuplicateModelError as exc:
            return False, f"refused: {exc}"

    async def raises() -> dict:
        broken = Path(ctx.workdir) / "broken.safetensors"
        broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a truncated download
        cfg = ModelConfig("m", **{**base, "model_path": str(broken)})
        first = None
        try:
            await mgr.load_model(cfg)
        except ModelLoadError as exc:
            first = f"{type(exc).__name__}: {exc}"
        after_failure = state("m")
        shutil.copyfile(good, broken)  # repaired
        ok, how = await retry(cfg)
        return {
            "first_error": first,
            "state_after_failure": after_failure,
            "retry_ok": ok,
            "retry": how,
            "state_after_retry": state("m"),
        }

    async def timeout() -> dict:
        slow = ModelConfig("m", **base, metadata={"io_seconds": float(p["io_seconds"])})
        t0 = time.perf_counter()
        gave_up = None
        try:
            await asyncio.wait_for(mgr.load_model(slow), timeout=p["give_up_s"])
        except asyncio.TimeoutError:
            gave_up = time.perf_counter()
        if gave_up is None:
            raise RuntimeError("the slow load finished before the caller gave up")
        after = state("m")
        ok, how = await retry(ModelConfig("m", **base))
        rec = loader.calls("m")[0]
        # Wait (off the loop) for the abandoned worker, bounded: does it stop, or run on?
        stopped = await asyncio.get_running_loop().run_in_executor(None, rec.done.wait, float(p["io_seconds"]) + 5)
        return {
            "gave_up_after_ms": round((gave_up - t0) * 1e3, 3),
            "state_after_give_up": after,
            "retry_ok": ok,
            "retry": how,
            "state_after_retry": state("m"),
            "abandoned_worker_outcome": rec.outcome,
            "abandoned_worker_ran_ms_after_give_up": round(((rec.ended or time.perf_counter()) - gave_up) * 1e3, 3),
            "abandoned_worker_stopped": stopped,
        }

    async def orphan() -> dict:
        held = ModelConfig("m", **base, metadata={"gate": "held", "ignore_cancel": True})
        try:
            await asyncio.wait_for(mgr.load_model(held), timeout=p["give_up_s"])
            raise RuntimeError("the held load finished before the caller gave up")
        except asyncio.TimeoutError:
            pass
        after = state("m")
        # The retry is accepted but must not load beside the orphan, which still waits on the gate:
        # it waits for the orphan's worker. Its state is polled (bounded): it shows the wait.
        retry_task = asyncio.create_task(retry(ModelConfig("m", **base)))
        deadline = time.monotonic() + 10.0
        while not retry_task.done() and time.monotonic() < deadline and loader.started < 2:
            if mgr.status("m").get("waiting_for_generation") is not None:
                break
            await asyncio.sleep(0.01)
        retry_waiting = mgr.status("m") if not retry_task.done() else None
        started_before_gate = loader.started
        gate.set()
        rec = loader.calls("m")[0]
        stopped = await asyncio.get_running_loop().run_in_executor(None, rec.done.wait, 30.0)
        ok, how = await retry_task
        status_after_retry = mgr.status("m")
        ready_after_retry = [m["model_id"] for m in mgr.list_models() if m["status"] == "ready"]
        second = loader.calls("m")[1] if len(loader.calls("m")) > 1 else None
        # shutdown(wait=True) joins the pool's threads: after it, the orphan's worker has ended
        await mgr.shutdown()
        gc.collect()
        return {
            "state_after_give_up": after,
            "retry_ok": ok,
            "retry": how,
            "state_after_retry": status_after_retry["status"],
            "generation_after_retry": status_after_retry["generation"],
            "orphan_loader_outcome": rec.outcome,
            "orphan_worker_stopped": stopped,
            "workers_running_after_shutdown": mgr.stats()["workers_running"],
            "orphan_model_freed": rec.model_ref is not None and rec.model_ref() is None,
            "orphans_dropped": mgr.stats()["orphans_dropped"],
            "ready_models": ready_after_retry,
            "retry_waited_for_orphan": retry_waiting is not None
            and retry_waiting["status"] == "loading"
            and retry_waiting.get("waiting_for_generation") == 1,
            "loads_started_before_gate": started_before_gate,
            "retry_started_after_orphan_ended": second is not None
            and rec.ended is not None
            and second.started >= rec.ended,
        }

    async def main() -> dict:
        try:
            return await {"raises": raises, "timeout": timeout, "orphan": orphan}[mode]()
        finally:
            gate.set()
            await mgr.shutdown()

    ctx.stage(mode)
    out = asyncio.run(main())
    if isinstance(mgr, AsyncModelManager):
        out["stats"] = mgr.stats()
    ctx.record(**out)
    ctx.observe(", ".join(f"{k}={v}" for k, v in out.items()))

    if mode == "raises":
        if out["first_error"] is None:
            raise RuntimeError("the truncated checkpoint did not fail to load")
        if out["state_after_failure"] == "loading":
            ctx.symptom(f"placeholder leaked after a failed load; the retry: {out['retry']}")
    elif out["state_after_give_up"] == "loading":
        ctx.symptom(f"placeholder leaked after the caller gave up; the retry: {out['retry']}")
    ctx.check(out["retry_ok"], f"retry after the failed/abandoned load did not load: {out['retry']}")
    ctx.check(out["state_after_retry"] == "ready", f"state after retry is {out['state_after_retry']}")
    if mode == "timeout":
        ctx.check(
            out["abandoned_worker_stopped"] and out["abandoned_worker_outcome"] == "cancelled",
            f"abandoned worker did not stop: outcome {out['abandoned_worker_outcome']}, "
            f"ran {out['abandoned_worker_ran_ms_after_give_up']} ms after the caller gave up",
        )
        ctx.check(
            out["abandoned_worker_ran_ms_after_give_up"] < 1000,
            f"abandoned worker ran on {out['abandoned_worker_ran_ms_after_give_up']} ms after the caller gave up",
        )
    if mode == "orphan":
        ctx.check(
            out["orphan_worker_stopped"] and out["workers_running_after_shutdown"] == 0,
            "the orphaned worker did not finish after the gate opened",
        )
        ctx.check(
            out["generation_after_retry"] == 2,
            f"the registered model is generation {out['generation_after_retry']}, not the retry's (2): "
            "the orphan's late result was registered",
        )
        ctx.check(out["orphans_dropped"] == 1, f"orphans_dropped = {out['orphans_dropped']} (expected 1)")
        ctx.check(
            out["retry_waited_for_orphan"] and out["loads_started_before_gate"] == 1,
            f"the retry did not wait for the orphan's worker ({out['loads_started_before_gate']} loads started "
            "while the orphan was held)",
        )
        ctx.check(
            out["retry_started_after_orphan_ended"],
            "the retry's load started before the orphan's worker ended: two copies loaded at once",
        )
        ctx.check(out["orphan_model_freed"], "the orphan's model is still alive after it was dropped")
        ctx.check(out["ready_models"] == ["m"], f"ready models {out['ready_models']}")
