"""Seed 004: are other, already loaded models served while a slow load runs?

Three models are resident: a ``pytorch`` TransformerEncoderLayer, a tiny GPT-2 through the
``huggingface`` path, and the bottom part of a tiny split GPT-2. Two client tasks on the loop
send requests (``get_model`` + one forward pass under ``inference_mode``) round-robin, first for
an idle window, then while a GPT-2-small-shaped checkpoint (~124M parameters) loads and warms up
in the manager's pool. Latency p50 / p95 / max before and during the load are the figures.

Check: requests were served during the load, none failed, and none waited for the load
(max latency during the load below a quarter of the load time). Too few served or one that
waited is the hazard's symptom (``ctx.symptom``); anything else that fails is an ERROR.

* load ``placeholder``: :class:`splitlearn.manager.AsyncModelManager` -> PASS, with figures.
* hazard ``lock_held``: the load is awaited under the manager lock, so every ``get_model``
  waits for it -> FAIL everywhere.
"""

from __future__ import annotations

from repro.harness.spec import Outcome, hazard, load, scenario

_COMMON = {"idle_s": 1.0, "clients": 2, "client_pause_ms": 5.0}


@scenario(
    name="manager_serving",
    seed="004",
    claims=("004-placeholder-lock",),
    timeout=180.0,
    serial=True,
    variants=[
        load("placeholder", params={**_COMMON, "pattern": "placeholder"}, markers=("slow",)),
        hazard(
            "lock_held",
            params={**_COMMON, "pattern": "lock"},
            expect=Outcome.FAIL,
            markers=("slow",),
            doc="the load is awaited under the manager lock: requests for other models wait for it",
        ),
    ],
)
def manager_serving(ctx) -> None:
    """get_model + forward latency of resident models while a ~124M-parameter model loads."""
    ctx.only_symptoms_fail()
    import asyncio
    import time

    import torch

    from fixtures.models import gpt2_small_dir, tiny_model_dir
    from repro.scenarios._manager_common import (
        LockedLoadManager,
        StagedLoader,
        client,
        latency_summary,
        setup_logging,
        write_encoder_checkpoint,
    )
    from splitlearn.manager import AsyncModelManager
    from splitlearn.model_loader import ModelConfig

    setup_logging()
    p = ctx.params
    ctx.stage("prepare checkpoints")
    t0 = time.perf_counter()
    big = gpt2_small_dir(sharded=True)
    tiny = tiny_model_dir("gpt2")
    ctx.record(checkpoint_prepare_s=round(time.perf_counter() - t0, 3))
    residents = [
        ModelConfig("encoder", **write_encoder_checkpoint(ctx.workdir, "encoder", d_model=128)),
        ModelConfig("lm", "huggingface", str(tiny), warmup=True),
        ModelConfig("bottom", "gpt2", str(tiny), component="bottom", split_points=(2, 4), warmup=True),
    ]
    slow = ModelConfig("gpt2-small", "huggingface", str(big), warmup=True, warmup_steps=6, warmup_seq_len=128)
    g = torch.Generator().manual_seed(0)
    inputs = {
        "encoder": torch.randn(1, 16, 128, generator=g),
        "lm": torch.randint(0, 256, (1, 16), generator=g),
        "bottom": torch.randint(0, 256, (1, 16), generator=g),
    }
    loader = StagedLoader()
    mgr = (
        AsyncModelManager(loader, max_workers=1)
        if p["pattern"] == "placeholder"
        else LockedLoadManager(loader, on_loop=False)
    )
    ctx.observe(f"pattern={p['pattern']} manager={type(mgr).__name__} torch_threads={torch.get_num_threads()}")

    async def main() -> dict:
        for cfg in residents:
            await mgr.load_model(cfg)
        ids = [c.model_id for c in residents]
        stop, first = asyncio.Event(), asyncio.Event()
        samples: list[tuple[float, float]] = []
        errors: list[str] = []
        clients = [
            asyncio.create_task(
                client(
                    mgr.get_model, ids[i:] + ids[:i], inputs, stop, p["client_pause_ms"] / 1e3, samples, errors, first
                )
            )
            for i in range(int(p["clients"]))
        ]
        await first.wait()
        samples.clear()  # first forwards pay one-off costs
        await asyncio.sleep(p["idle_s"])  # the idle measurement window, not synchronisation
        idle = latency_summary(samples, "idle")
        samples.clear()
        ctx.stage("slow load")
        t0 = time.perf_counter()
        await mgr.load_model(slow)
        t_end = time.perf_counter()
        load_s = t_end - t0
        stop.set()
        await asyncio.gather(*clients)  # requests that were waiting finish: they count too
        during = latency_summary(samples, "during_load", t0, t_end)
        await mgr.shutdown()
        return {"load_s": round(load_s, 3), **idle, **during, "errors": errors[:5], "pattern": p["pattern"]}

    ctx.stage("serve")
    out = asyncio.run(main())
    ctx.record(**out)
    ctx.observe(
        f"load {out['load_s']} s; idle p50 {out.get('idle_p50_ms')} ms max {out.get('idle_max_ms')} ms; "
        f"during load n={out.get('during_load_n')} p50 {out.get('during_load_p50_ms')} ms "
        f"p95 {out.get('during_load_p95_ms')} ms max {out.get('during_load_max_ms')} ms"
    )
    if out["errors"]:
        raise RuntimeError(f"requests failed: {out['errors']}")
    if out["load_s"] < 0.5:
        raise RuntimeError(f"the load took {out['load_s']} s: too short to measure serving during it")
    bound_ms = out["load_s"] * 1e3 / 4
    served_min = 5
    if out.get("during_load_n", 0) < served_min:
        ctx.symptom(
            f"only {out.get('during_load_n', 0)} requests served during a {out['load_s']} s load (expected >= {served_min})"
        )
    if out["during_load_max_ms"] >= bound_ms:
        ctx.symptom(
            f"a request waited {out['during_load_max_ms']} ms during a {out['load_s']} s load (bound {bound_ms:.0f} ms): "
            "requests for other models queued behind the load"
        )
