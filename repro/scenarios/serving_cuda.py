"""Seed 002: CUDA and the server's start method (needs a CUDA device; skipped elsewhere).

* ``fork_after_cuda`` (hazard): the parent initialises CUDA, then starts the server with fork
  on ``cuda``. The child's first CUDA call raises "Cannot re-initialize CUDA in forked
  subprocess"; the server reports it and the parent raises ``ServerStartError`` carrying the
  message. The scenario checks that it is this error and reports it with ``ctx.symptom``
  (FAIL): the hazard reproduced as predicted. Under ``ctx.only_symptoms_fail`` any other failed
  check there (another start error; a server that started and then answered wrongly) is an
  ERROR, and a server that started and answered right is a PASS: the hazard did not show.
* ``spawn`` (fix): same parent, spawn: the server initialises CUDA itself, answers on the GPU
  (matching the parent's own forward), and the serving process holds the GPU (its pid is in
  the device's compute processes where ``nvidia-smi`` can tell).
"""

from __future__ import annotations

import shutil
import subprocess

from repro.harness import predict
from repro.harness.spec import Outcome, fix, hazard, scenario

MODEL = "splitlearn.serving.demo_models:DemoNet"
KW = {"in_features": 64, "hidden": 256, "depth": 2, "out_features": 16}
SIGNATURE = "Cannot re-initialize CUDA in forked subprocess"


def _gpu_pids() -> list[int] | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-compute-apps=pid", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [int(x) for x in out.stdout.split() if x.strip().isdigit()]


@scenario(
    name="serving_cuda",
    seed="002",
    claims=("002-cuda-fork",),
    timeout=180,
    markers=("cuda",),
    variants=[
        hazard(
            "fork_after_cuda",
            params={"method": "fork"},
            expect=(Outcome.FAIL, f"CUDA state does not survive fork: '{SIGNATURE}' in the server child"),
            requires=lambda b: predict.needs_cuda(b) or predict.fork_available(b),
        ),
        fix("spawn", params={"method": "spawn"}, requires=predict.needs_cuda),
    ],
)
def serving_cuda(ctx):
    import torch

    from splitlearn.serving import InferenceServer, ServerStartError
    from splitlearn.serving.demo_models import DemoNet

    ctx.only_symptoms_fail()
    ctx.stage("parent initialises CUDA")
    torch.manual_seed(0)
    with torch.device("cuda"):  # build on the GPU: no CPU parallel region (libgomp team) in the parent before fork
        model = DemoNet(**KW).eval()
    x = torch.randn(4, 64, device="cuda")
    with torch.inference_mode():
        ref = model(x).cpu()
    ctx.record(parent_cuda_initialized=torch.cuda.is_initialized(), device_name=torch.cuda.get_device_name(0))
    srv = InferenceServer(
        MODEL, KW, state_dict=model.state_dict(), device="cuda", start_method=ctx.params["method"], start_timeout=120
    )
    ctx.stage(f"start server ({ctx.params['method']}) on cuda")
    try:
        try:
            srv.start()
        except ServerStartError as exc:
            ctx.observe(f"ServerStartError: {str(exc).splitlines()[0]}")
            # not the hazard: an ERROR in the hazard variant, never the FAIL that reports it
            ctx.check(SIGNATURE in str(exc), f"the server failed, but not with the CUDA fork error: {exc}")
            ctx.symptom(f"server could not start after fork: {SIGNATURE}")
        ctx.record(server_info=srv.info)
        ctx.check(srv.info.get("cuda_initialized"), "the server did not initialise CUDA")
        with srv.client(timeout=60) as c:
            y = c.infer(x.cpu())
        ctx.check(torch.allclose(y, ref, atol=1e-4), "GPU server answer differs from the parent's forward")
        pids = _gpu_pids()
        ctx.record(gpu_compute_pids=pids)
        if pids is not None:
            ctx.check(srv.pid in pids, f"server pid {srv.pid} not among the GPU's compute processes {pids}")
    finally:
        srv.close()
