"""Seed 003's pipeline: producer -> bounded queue -> DataLoader-fed split model -> consumer.

The seed saw "队列满": the upstream queue filled and the producer blocked for 60 s before an
error that did not say which stage had stopped. Here the model stage is a real split GPT-2
(bottom -> trunk -> top from ``splitlearn``) fed by a DataLoader over the bounded queue.

Hazard: the stage stops taking items (it blocks inside its forward, as a deadlocked worker
would); the producer's ``put`` times out after ``put_timeout`` and the run ends with
``StageStalled`` naming the stage, with the counts of every stage. The scenario verifies that
exact symptom (stage name, wait ~= put_timeout, counts consistent) and reports it with
``ctx.symptom`` (verdict FAIL); a stall with the wrong details, or (``ctx.only_symptoms_fail``)
a thread or worker left behind in a stall variant, is an ERROR; no stall is a PASS.

Fix: the same pipeline with a working stage drains N items, every sequence id exactly once,
each output equal to a direct call of the split model on the same input.
After every variant: no pipeline thread alive, no worker process left (zombie or orphan).
"""

from __future__ import annotations

import threading
import time

from repro.harness.spec import Outcome, fix, hazard, scenario
from repro.scenarios._proc import check_reaped, stacks_of

SEQ_LEN = 8


def _split_model(ctx):
    from fixtures.models import tiny_model_dir
    from splitlearn import ModelFactory

    ctx.stage("build split model")
    path = tiny_model_dir("gpt2")
    bottom, trunk, top = ModelFactory.create_split_models("gpt2", path, 1, 3, device="cpu")
    return bottom, trunk, top


def _forward(parts, input_ids):
    import torch

    bottom, trunk, top = parts
    with torch.no_grad():
        h = bottom(input_ids).hidden_states
        h = trunk(h).hidden_states
        logits = top(h).logits
    return logits[:, -1, :].argmax(-1).tolist()


@scenario(
    name="pipeline_backpressure",
    seed="003",
    claims=("003-queue-full", "003-zombies", "003-fork-share-lock"),
    timeout=90,
    variants=[
        hazard(
            "stage_stalls",
            params={"n": 30, "stall_after": 6, "put_timeout": 2.0, "workers": 0},
            expect=(Outcome.FAIL, "the stalled stage stops taking items on every build: the producer's put times out"),
        ),
        hazard(
            "stage_stalls_fork_workers",
            params={"n": 30, "stall_after": 6, "put_timeout": 2.0, "workers": 2, "method": "fork"},
            expect=(Outcome.FAIL, "same stall with the stage's DataLoader reading through 2 fork workers"),
        ),
        fix("drain", params={"n": 48, "put_timeout": 30.0, "workers": 0}),
        fix("drain_fork_workers", params={"n": 48, "put_timeout": 30.0, "workers": 2, "method": "fork"}),
        fix("drain_spawn_workers", params={"n": 48, "put_timeout": 30.0, "workers": 2, "method": "spawn"}),
    ],
)
def pipeline_backpressure(ctx):
    """Bounded-queue pipeline around a DataLoader-fed split model: stall names the stage; drain counts."""
    import torch

    from splitlearn.pipeline import Pipeline, PipelineError, StageStalled

    ctx.only_symptoms_fail()
    p = ctx.params
    n = int(p["n"])
    parts = _split_model(ctx)
    gen = torch.Generator().manual_seed(0)
    items = [torch.randint(0, 250, (SEQ_LEN,), generator=gen) for _ in range(n)]
    ctx.stage("reference outputs")
    reference = _forward(parts, torch.stack(items))

    gate = threading.Event()
    stall_after = p.get("stall_after")
    pipe: Pipeline | None = None

    def model_fn(batch):
        if stall_after is not None and pipe.stages["model"].items_in > int(stall_after):
            gate.wait()  # the stage stops taking items (untimed, like a deadlocked stage)
        return _forward(parts, batch)

    pipe = Pipeline(
        model_fn,
        batch_size=4,
        queue_size=4,
        put_timeout=float(p["put_timeout"]),
        num_workers=int(p.get("workers", 0)),
        multiprocessing_context=p.get("method"),
        keep_outputs=True,
    )
    ctx.stage("run pipeline")
    wall0 = time.time()
    t0 = time.monotonic()
    stalled: StageStalled | None = None
    result = None
    try:
        result = pipe.run(items, timeout=max(5.0, ctx.remaining() - 20), join_timeout=2.0)
    except StageStalled as exc:
        stalled = exc
    except PipelineError:
        # not a stall we made: keep where every thread and worker was before anything is released
        ctx.record(unexpected_stall_stacks=stacks_of(pipe.worker_pids, own_threads=True))
        raise
    elapsed = time.monotonic() - t0
    if stalled is not None and stall_after is None:
        ctx.record(unexpected_stall_stacks=stacks_of(pipe.worker_pids, own_threads=True))

    ctx.stage("release and reap")
    gate.set()  # let a stalled stage return; it then sees the stop request and shuts down
    for t in pipe.threads:
        t.join(10)
    alive = [t.name for t in pipe.threads if t.is_alive()]
    ctx.record(threads_alive_after=alive, worker_pids=pipe.worker_pids, counts=pipe.counts(), seconds=round(elapsed, 3))
    check_reaped(ctx, pipe.worker_pids, since=wall0)  # in a stall variant a leak is an ERROR: not the stall
    ctx.check(not alive, f"pipeline threads still alive: {alive}")

    if stalled is not None:
        ctx.record(
            stalled_stage=stalled.stage,
            stalled_queue=stalled.queue_name,
            put_blocked_s=round(stalled.waited, 3),
            error=str(stalled),
            stuck_threads_at_error=pipe.stuck_threads,
        )
        put_timeout = float(p["put_timeout"])
        problems = []
        if stall_after is None:
            problems.append("a stage stalled although none was made to")
        if stalled.stage != "model" or stalled.queue_name != "model_in":
            problems.append(f"wrong stage named: {stalled.stage!r} / {stalled.queue_name!r}")
        if not (put_timeout <= stalled.waited < put_timeout + 2.0):
            problems.append(f"put blocked {stalled.waited:.2f}s, timeout was {put_timeout}s")
        c = stalled.counts
        if not (c["consumer_out"] <= c["model_out"] <= c["model_in"] <= c["producer_out"] <= n):
            problems.append(f"inconsistent counts {c}")
        if problems:
            raise RuntimeError(f"stall reported with wrong details: {problems}: {stalled}")
        ctx.observe(f"producer blocked {stalled.waited:.2f}s (put_timeout {put_timeout}s): {stalled}")
        ctx.symptom(str(stalled))

    assert result is not None
    outputs = [out for _, out in result.outputs]
    ctx.record(
        produced=result.produced,
        consumed=result.consumed,
        missing=result.missing,
        duplicates=result.duplicates,
        items_per_s=round(result.produced / result.seconds, 1) if result.seconds else None,
    )
    ctx.check(result.ok, f"items lost or duplicated: missing {result.missing}, duplicates {result.duplicates}")
    ctx.check(result.ids == list(range(n)), "sequence ids differ from those produced")
    ctx.check(outputs == reference, "pipeline outputs differ from a direct call of the split model")
    ctx.observe(f"drained {result.consumed}/{n} items in {result.seconds:.2f}s, counts {result.counts}")
