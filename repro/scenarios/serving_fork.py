"""Seed 002: the inference server started by fork after the parent used torch.

The seed: ``train.py`` used torch (model init, weight copies), then started its
InferenceServer with fork; the server child hung at ``XiangqiNet(**model_kwargs)`` and
``ready_event`` was never set. Fix: spawn.

What reproduces here: the parent runs parallel intra-op work (matmul, Linear) with more than
one thread on GNU libgomp; the forked server's first parallel region (the model's weight
init) waits forever for the parent's thread team, which does not exist in the child. The
parent waits for the ready message without a timeout, as the seed did: the whole tree sits in
untimed waits (HANG, with the stacks). ``spawn`` starts a fresh interpreter and is ready in
seconds. ``fork_bounded`` shows the second half of the fix: with a start timeout, the same
hang becomes a clear ``ServerStartError`` and the child is killed and reaped.
"""

from __future__ import annotations

import time

from repro.harness import predict
from repro.harness.spec import fix, frame, hazard, scenario, together

MODEL = "splitlearn.serving.demo_models:DemoNet"
KW = {"in_features": 64, "hidden": 1024, "depth": 4, "out_features": 16}


def _parent_uses_torch(ctx):
    import torch

    ctx.stage("parent uses torch (parallel intra-op work)")
    with torch.no_grad():
        a = torch.randn(512, 512)
        s = float((a @ a).sum())
        net = torch.nn.Linear(1024, 1024)
        y = net(torch.randn(64, 1024))
    ctx.record(parent_torch_threads=torch.get_num_threads(), parent_checksum=round(s + float(y.sum()), 3))


@scenario(
    name="serving_fork",
    seed="002",
    claims=("002-fork-deadlock",),
    timeout=90,
    variants=[
        hazard(
            "fork",
            params={"method": "fork", "start_timeout": None},
            expect=predict.gomp_fork_hang,
            requires=predict.fork_available,
            # the parent waits for readiness; the server child hangs in its warm-up forward, in libgomp
            hang_where=(
                frame("splitlearn/serving/server.py", "_wait_ready"),
                together(frame("splitlearn/serving/server.py", "server_main"), "native:libgomp"),
            ),
            doc="fork after torch use, ready wait without timeout (the seed's code)",
        ),
        fix("spawn", params={"method": "spawn", "start_timeout": 60}, doc="spawn: ready within its timeout, answers"),
        fix(
            "fork_bounded",
            params={"method": "fork", "start_timeout": 10},
            requires=predict.fork_available,
            doc="fork with a start timeout: ready, or a clear ServerStartError and a reaped child",
        ),
    ],
)
def serving_fork(ctx):
    import psutil
    import torch

    from splitlearn.serving import InferenceServer, ServerStartError

    p = ctx.params
    _parent_uses_torch(ctx)
    srv = InferenceServer(MODEL, KW, start_method=p["method"], start_timeout=p["start_timeout"])
    ctx.stage(f"start server ({p['method']}, start_timeout={p['start_timeout']})")
    t0 = time.monotonic()
    try:
        try:
            srv.start()
        except ServerStartError as exc:
            waited = time.monotonic() - t0
            ctx.observe(f"ServerStartError after {waited:.2f}s: {exc}")
            ctx.record(start_error=str(exc).splitlines()[0], start_wait_s=round(waited, 3))
            ctx.check(p["start_timeout"] is not None, "an untimed start raised instead of waiting")
            ctx.check(waited < p["start_timeout"] + 5, f"start timeout {p['start_timeout']}s overrun: {waited:.1f}s")
            ctx.check("not ready within" in str(exc) or "died" in str(exc), f"unclear start error: {exc}")
            ctx.check(srv.pid is None, "the failed server was not reaped")
            children = [
                c for c in psutil.Process().children(recursive=True) if "resource_tracker" not in " ".join(c.cmdline())
            ]
            ctx.check(not children, f"processes left behind: {[c.pid for c in children]}")
            return
        ready_s = time.monotonic() - t0
        ctx.record(ready_s=round(ready_s, 3), server_pid=srv.pid, server_info=srv.info)
        ctx.observe(f"server ready after {ready_s:.2f}s ({p['method']})")
        ctx.stage("request through the server")
        x = torch.randn(2, 64)
        with srv.client(timeout=30) as c:
            y = c.infer(x)
        ctx.check(tuple(y.shape) == (2, 16), f"bad answer shape {tuple(y.shape)}")
        if p["start_timeout"] is not None:
            ctx.check(ready_s < p["start_timeout"], f"ready after {ready_s:.1f}s > {p['start_timeout']}s")
    finally:
        ctx.stage("stop server")
        srv.close()
