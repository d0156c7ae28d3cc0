"""Seed 004: concurrent ``load_model`` of one model id from many tasks.

``tasks`` coroutines call ``load_model`` with the same config at once. The load body first waits
on a gate (a ``threading.Event`` this scenario opens) so the first load is certainly still in
flight while the others arrive; the gate opens once every task has either returned or reached
the loader. Then a further load of the id, after it is ready, must be refused as well.

Check: the loader ran exactly once, one task got the model, every other task got
``DuplicateModelError`` saying the model is already loading, and the late load is refused as
already loaded.

* fix ``placeholder``: :class:`splitlearn.manager.AsyncModelManager` -> PASS.
* hazard ``check_then_act``: the duplicate check reads the table of *finished* loads, with the
  load's await between check and insert and no placeholder -> every task loads (FAIL everywhere).
  More than one load of the id is the symptom (``ctx.symptom``); under ``ctx.only_symptoms_fail``
  any other failed check there (one load, but a wrong count of refusals) is an ERROR.
"""

from __future__ import annotations

from repro.harness.spec import Outcome, fix, hazard, scenario


@scenario(
    name="manager_duplicate",
    seed="004",
    claims=("004-duplicate-refused",),
    timeout=90.0,
    variants=[
        fix("placeholder", params={"pattern": "placeholder", "tasks": 32}),
        hazard(
            "check_then_act",
            params={"pattern": "check_then_act", "tasks": 32},
            expect=Outcome.FAIL,
            doc="no placeholder: the check passes for every task before any load finishes",
        ),
    ],
)
def manager_duplicate(ctx) -> None:
    """Many tasks load the same id at once: one load, the rest refused."""
    import asyncio
    import threading
    import time

    from repro.scenarios._manager_common import (
        CheckThenActManager,
        StagedLoader,
        setup_logging,
        write_encoder_checkpoint,
    )
    from splitlearn.manager import AsyncModelManager, DuplicateModelError
    from splitlearn.model_loader import ModelConfig

    setup_logging()
    ctx.only_symptoms_fail()
    n = int(ctx.params["tasks"])
    pattern = ctx.params["pattern"]
    ctx.stage("prepare")
    cfg = ModelConfig("shared", **write_encoder_checkpoint(ctx.workdir, "shared", d_model=64), metadata={"gate": "go"})
    gate = threading.Event()

    async def main() -> dict:
        loop = asyncio.get_running_loop()
        settled = asyncio.Event()
        tasks: list[asyncio.Task] = []

        def check_settled() -> None:
            if tasks and sum(t.done() for t in tasks) + loader.started >= n:
                settled.set()

        loader = StagedLoader(gates={"go": gate}, on_start=lambda: loop.call_soon_threadsafe(check_settled))
        mgr = AsyncModelManager(loader) if pattern == "placeholder" else CheckThenActManager(loader, max_workers=n)
        t0 = time.perf_counter()
        tasks.extend(asyncio.create_task(mgr.load_model(cfg), name=f"load-{i}") for i in range(n))
        for t in tasks:
            t.add_done_callback(lambda _t: check_settled())
        try:
            await asyncio.wait_for(settled.wait(), timeout=max(5.0, ctx.remaining() / 3))
        except asyncio.TimeoutError:
            raise RuntimeError(
                f"tasks never settled: {sum(t.done() for t in tasks)} done, {loader.started} loads started"
            ) from None
        settle_ms = (time.perf_counter() - t0) * 1e3
        refused_early = sum(1 for t in tasks if t.done() and isinstance(t.exception(), DuplicateModelError))
        ctx.observe(
            f"settled in {settle_ms:.1f} ms: {refused_early} refused before the gate opened, {loader.started} loads started"
        )
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        late: BaseException | None = None
        try:
            await mgr.load_model(cfg)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            late = exc
        status = mgr.status("shared") if isinstance(mgr, AsyncModelManager) else None
        await mgr.shutdown()
        return {
            "results": results,
            "late": late,
            "status": status,
            "loads": loader.started,
            "settle_ms": settle_ms,
            "refused_early": refused_early,
        }

    ctx.stage("concurrent loads")
    out = asyncio.run(main())
    results = out["results"]
    ok = [r for r in results if not isinstance(r, BaseException)]
    dup = [r for r in results if isinstance(r, DuplicateModelError)]
    other = [
        f"{type(r).__name__}: {r}"
        for r in results
        if isinstance(r, BaseException) and not isinstance(r, DuplicateModelError)
    ]
    ctx.record(
        tasks=n,
        loads=out["loads"],
        succeeded=len(ok),
        refused=len(dup),
        other_errors=other[:5],
        refused_before_gate=out["refused_early"],
        settle_ms=round(out["settle_ms"], 3),
        refusal_message=str(dup[0]) if dup else None,
        late_error=repr(out["late"]),
        status=out["status"],
    )
    ctx.observe(
        f"{n} tasks: {out['loads']} loads ran, {len(ok)} succeeded, {len(dup)} refused; late load: {out['late']!r}"
    )
    if other:
        raise RuntimeError(f"unexpected errors: {other[:3]}")
    if out["loads"] > 1:
        ctx.symptom(f"{out['loads']} loads of one id ran for {n} concurrent requests (expected exactly 1)")
    ctx.check(out["loads"] == 1, f"no load ran for {n} concurrent requests")
    ctx.check(
        len(ok) == 1 and len(dup) == n - 1,
        f"{len(ok)} tasks got the model and {len(dup)} were refused (expected 1 and {n - 1})",
    )
    ctx.check(
        all("already loading" in str(e) for e in dup),
        f"refusals do not say the model is loading: {str(dup[0]) if dup else ''}",
    )
    ctx.check(
        isinstance(out["late"], DuplicateModelError) and "already loaded" in str(out["late"]),
        f"a load after the model was ready was not refused as already loaded: {out['late']!r}",
    )
