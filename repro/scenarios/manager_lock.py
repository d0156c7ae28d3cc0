"""Seed 004: is the event loop (and the manager) responsive while a model loads for seconds?

The slow load is the real :class:`splitlearn.model_loader.ModelLoader` path. ``workload=io``:
a ``pytorch`` TransformerEncoderLayer checkpoint preceded by ``load_s`` seconds of simulated
storage I/O (a wait inside the load body standing in for reading a large file). ``workload=real``:
a GPT-2-small-shaped checkpoint (~124M parameters, ~500 MB, from ``fixtures.models``) loaded
through ``AutoModelForCausalLM.from_pretrained`` and warmed up -- seconds of real work that
also competes for the GIL.

While it loads, a heartbeat task on the same loop ticks every 5 ms and a client task calls
``get_model`` on an already loaded model plus one forward pass every 10 ms. The scenario's
check is the responsiveness criterion: heartbeat max gap < ``gap_limit_ms`` and client max
latency < ``gap_limit_ms``; missing either is the hazards' symptom (``ctx.symptom``; for
``cold_real`` only the heartbeat's, see below), and any other failed check in a hazard variant
(``ctx.only_symptoms_fail``) is an ERROR.

* hazard ``loop``: the load runs on the loop thread under the manager lock -> the heartbeat stops
  for the whole load (FAIL everywhere).
* hazard ``lock``: the load runs in an executor but is awaited under the lock -> the loop ticks,
  but every ``get_model`` waits for the load (FAIL everywhere).
* fix ``placeholder``: :class:`splitlearn.manager.AsyncModelManager` -> PASS.
* hazard ``cold_real``: the placeholder pattern with a real GPT-2-small-sized load that is the
  process's first Hugging Face load: the worker's first-use imports (transformers' loading code,
  torch._dynamo, sympy...) and the cyclic garbage collector hold the GIL for 100-350 ms at a time,
  so the loop stalls although no lock is held (FAIL where measured: torch 2.13 / transformers 5).
  Its symptom is the loop stall alone: the process must be on a CPU through the longest stall
  (``heartbeat_max_gap_cpu_share``, process CPU-seconds per second, >= 0.5; a stall spent waiting
  for a core is contention, an ERROR), and a slow client request without such a stall is only
  observed (its forward shares the cores with the loading thread). The heartbeat also records,
  for the longest stall, the loop thread's own CPU share (low: it waited for the GIL while
  another thread held it; high: the loop's thread did the work itself) and the cyclic
  collections inside it (``gc.callbacks``: time, generation, thread), which tests the seed's
  "the collector holds the GIL" diagnosis without deciding the verdict.
* load ``placeholder_real``: the same load after a tiny model of the family went through the same
  path at startup (a rehearsal before serving) and ``gc.freeze()`` ended startup. Recorded as a
  figure against the limit, not a verdict: 15-40 ms on a quiet machine, 66-580 ms when the
  2 cores are shared (matrix cells), so it is no fix that holds on every build.
"""

from __future__ import annotations

from repro.harness.spec import Outcome, fix, hazard, load, scenario

_COMMON = {"load_s": 2.5, "gap_limit_ms": 50.0, "heartbeat_ms": 5.0, "client_pause_ms": 10.0, "min_load_s": 1.0}


@scenario(
    name="manager_lock",
    seed="004",
    claims=("004-placeholder-lock",),
    timeout=120.0,
    serial=True,
    variants=[
        hazard(
            "loop",
            params={**_COMMON, "pattern": "loop", "workload": "io"},
            expect=Outcome.FAIL,
            doc="load on the loop thread under the lock: the heartbeat stalls for the load time",
        ),
        hazard(
            "lock",
            params={**_COMMON, "pattern": "lock", "workload": "io"},
            expect=Outcome.FAIL,
            doc="load in an executor awaited under the lock: get_model of another model waits for the load",
        ),
        fix(
            "placeholder",
            params={**_COMMON, "pattern": "placeholder", "workload": "io"},
            doc="placeholder under a short lock, load in a thread pool",
        ),
        hazard(
            "cold_real",
            params={**_COMMON, "pattern": "placeholder", "workload": "real", "warm_family": False},
            expect=Outcome.FAIL,
            markers=("slow",),
            doc="placeholder pattern, but the process's first load of a Hugging Face model: the worker's "
            "lazy imports and the cyclic GC hold the GIL for 100-350 ms at a time and stall the loop",
        ),
        load(
            "placeholder_real",
            params={
                **_COMMON,
                "pattern": "placeholder",
                "workload": "real",
                "warm_family": True,
                "gc_freeze": True,
                "check_limit": False,
            },
            markers=("slow",),
            doc="placeholder pattern with a real GPT-2-small-sized load (~124M parameters), after a tiny model "
            "of the same family went through the same load path at startup, and gc.freeze() after startup. "
            "A figure, not a verdict: measured 15-40 ms on a quiet machine but 66-580 ms in matrix cells "
            "sharing 2 cores, so the 50 ms limit is reported as a target (see docs/BENCHMARKS.md)",
        ),
    ],
)
def manager_lock(ctx) -> None:
    """Heartbeat and get_model latency on the loop while a multi-second load runs."""
    ctx.only_symptoms_fail()
    import asyncio
    import gc
    import time

    import torch

    from repro.scenarios._manager_common import (
        Heartbeat,
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
    pattern, workload = p["pattern"], p["workload"]
    limit_ms = float(p["gap_limit_ms"])

    ctx.stage("prepare checkpoints")
    resident_kw = write_encoder_checkpoint(ctx.workdir, "resident", d_model=64)
    if workload == "io":
        slow_kw = write_encoder_checkpoint(ctx.workdir, "slow", d_model=256)
        slow_cfg = ModelConfig("slow", **slow_kw, metadata={"io_seconds": float(p["load_s"])})
    elif workload == "real":
        from fixtures.models import built_elsewhere

        # in another interpreter: building the checkpoint here would run transformers' modeling
        # code in this process first, and cold_real's first load would then be a warm one
        # (whether the cache held the model would decide the verdict)
        t0 = time.perf_counter()
        path = built_elsewhere("gpt2_small_dir", sharded=True)
        ctx.record(checkpoint_build_s=round(time.perf_counter() - t0, 3))
        slow_cfg = ModelConfig(
            "slow",
            "huggingface",
            str(path),
            warmup=True,
            warmup_steps=int(p.get("warmup_steps", 6)),
            warmup_seq_len=int(p.get("warmup_seq_len", 128)),
        )
    else:
        raise ValueError(f"unknown workload {workload!r}")
    resident_cfgs = [ModelConfig("resident", **resident_kw)]
    if p.get("warm_family"):
        # Startup rehearsal: a tiny model of the family through the same path imports and
        # exercises the code the big load runs, before serving (and measuring) begins.
        from fixtures.models import tiny_model_dir

        resident_cfgs.append(ModelConfig("tiny-family", "huggingface", str(tiny_model_dir("gpt2")), warmup=True))
    x = torch.randn(1, 16, 64)

    loader = StagedLoader()
    if pattern == "placeholder":
        mgr = AsyncModelManager(loader, max_workers=1)
    elif pattern in ("loop", "lock"):
        mgr = LockedLoadManager(loader, on_loop=(pattern == "loop"))
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    ctx.observe(
        f"pattern={pattern} workload={workload} manager={type(mgr).__name__} torch_threads={torch.get_num_threads()}"
    )

    async def main() -> dict:
        t_startup = time.perf_counter()
        for cfg in resident_cfgs:
            await mgr.load_model(cfg)
        if p.get("gc_freeze"):
            # Startup objects (modules, classes, resident models) leave the collector's view, so
            # a full collection during the load no longer walks them while holding the GIL.
            gc.collect()
            gc.freeze()
        ctx.record(
            startup_load_s=round(time.perf_counter() - t_startup, 3),
            residents=[c.model_id for c in resident_cfgs],
            gc_frozen=gc.get_freeze_count(),
        )
        hb = Heartbeat(p["heartbeat_ms"] / 1e3)
        hb.start()
        stop, first = asyncio.Event(), asyncio.Event()
        samples: list[tuple[float, float]] = []
        errors: list[str] = []
        ctask = asyncio.create_task(
            client(
                mgr.get_model, ["resident"], {"resident": x}, stop, p["client_pause_ms"] / 1e3, samples, errors, first
            )
        )
        await first.wait()  # the first forward pays one-off costs: keep it out of the figures
        hb.reset()
        samples.clear()
        # Baseline: the heartbeat's and client's figures with no load running.
        await asyncio.sleep(0.3)  # a measurement window of idle ticks, not synchronisation
        base = {**hb.summary("idle_heartbeat"), **latency_summary(samples, "idle_client")}
        hb.reset()
        samples.clear()
        ctx.stage(f"slow load ({pattern})")
        t0 = time.perf_counter()
        await mgr.load_model(slow_cfg)
        t_end = time.perf_counter()
        load_s = t_end - t0
        stop.set()
        await ctask  # a request that was waiting for the lock finishes: it counts too
        await hb.stop()
        await mgr.shutdown()
        return {
            "load_s": round(load_s, 3),
            **base,
            **hb.summary(),
            **latency_summary(samples, "client", t0, t_end),
            "client_errors": errors[:5],
            "pattern": pattern,
            "workload": workload,
        }

    ctx.stage("run")
    figures = asyncio.run(main())
    ctx.record(**figures)
    ctx.observe(
        f"load {figures['load_s']} s; heartbeat max gap {figures['heartbeat_max_gap_ms']} ms "
        f"({figures['heartbeat_ticks']} ticks); get_model+forward max {figures.get('client_max_ms')} ms "
        f"p50 {figures.get('client_p50_ms')} ms over {figures.get('client_n')} requests"
    )
    if figures["load_s"] < p["min_load_s"]:
        raise RuntimeError(
            f"the load took {figures['load_s']} s < {p['min_load_s']} s: too short to test responsiveness"
        )
    if figures["client_errors"]:
        raise RuntimeError(f"client requests failed: {figures['client_errors']}")
    if not p.get("check_limit", True):
        ctx.record(
            limit_ms=limit_ms,
            heartbeat_gap_target={
                "value": figures["heartbeat_max_gap_ms"],
                "target": f"<{limit_ms:g}",  # a strict bound: at the bound itself it is missed
                "met": figures["heartbeat_max_gap_ms"] < limit_ms,
            },
        )
        return
    share = figures["heartbeat_max_gap_cpu_share"]
    if workload == "real":
        # evidence on the seed's diagnosis, not a verdict: who ran during the longest stall, and
        # how much of it was the cyclic collector
        ctx.observe(
            f"longest stall {figures['heartbeat_max_gap_ms']} ms: process {share} CPU-s/s, of which the loop's "
            f"thread {figures['heartbeat_max_gap_loop_cpu_share']}; {figures['heartbeat_max_gap_gc_n']} "
            f"collection(s) in it for {figures['heartbeat_max_gap_gc_ms']} ms (highest generation "
            f"{figures['heartbeat_max_gap_gc_max_generation']}, {figures['heartbeat_max_gap_gc_on_loop_ms']} ms "
            f"on the loop's thread); {figures['heartbeat_gc_n']} collections, {figures['heartbeat_gc_ms']} ms "
            "in all during the load"
        )
    if workload == "real" and figures["heartbeat_max_gap_ms"] >= limit_ms:
        # the claim is that the loading thread holds the GIL (imports, the collector): the process
        # computes through the stall. A stall it spent mostly off the CPUs is other processes'
        # doing, not this load's, and must not count as the hazard.
        ctx.check(
            share is not None and share >= 0.5,
            f"the loop stalled {figures['heartbeat_max_gap_ms']} ms while the process used {share} CPU-s per s: "
            "it was not running (contention from other processes), not held up by the loading thread",
        )
    if figures["heartbeat_max_gap_ms"] >= limit_ms:
        ctx.symptom(
            f"event loop blocked: heartbeat max gap {figures['heartbeat_max_gap_ms']} ms >= {limit_ms} ms "
            f"during a {figures['load_s']} s load"
        )
    ctx.check(figures.get("client_n", 0) > 0, f"no client request completed during a {figures['load_s']} s load")
    if figures["client_max_ms"] >= limit_ms and workload == "real":
        # in a real load the claim is the loop stall (the GIL held by the loading thread), which the
        # heartbeat measures with its CPU share; a slow request alone may be its forward sharing
        # the cores with the loading thread, or two shorter stalls around an await: no symptom
        ctx.observe(
            f"get_model+forward took up to {figures['client_max_ms']} ms >= {limit_ms} ms, but the loop never "
            f"stalled that long (heartbeat max gap {figures['heartbeat_max_gap_ms']} ms): not counted"
        )
    elif figures["client_max_ms"] >= limit_ms:
        ctx.symptom(
            f"manager blocked: get_model+forward of another model took up to {figures['client_max_ms']} ms "
            f">= {limit_ms} ms during a {figures['load_s']} s load"
        )
