"""Seed 001 on a dynamic-MKL build: import order of torch, mkl, numpy x MKL_THREADING_LAYER.

The seed's fix was ``MKL_THREADING_LAYER=SEQUENTIAL`` for a deadlock it put on MKL's
initialisation. What import order really changes on a build with pip's ``mkl``,
``intel-openmp`` and ``mkl-service`` beside torch's wheel (which carries static MKL and its own
GNU libgomp) is which OpenMP runtimes are loaded and which one torch's ``GOMP_*`` calls bind to:

* ``MKL_THREADING_LAYER=INTEL`` after torch loaded libgomp: MKL prints "MKL_THREADING_LAYER=INTEL
  is incompatible with libgomp.so.1" and calls ``exit(1)`` from native code (no Python
  unwinding, no result file: the runner's verdict is CRASH with termination kind
  ``deliberate-native-exit``: a refusal, not a signal);
* ``mkl`` imported before torch (layer unset or INTEL): libiomp5 is loaded first and libgomp
  beside it; torch's OpenMP calls resolve to libiomp5;
* ``mkl`` first with SEQUENTIAL: torch starts with a single intra-op thread.

Each variant imports in its order, records the runtimes (threadpoolctl), the thread counts and
an exact matmul check (integer-valued float64, torch and numpy against int64), and then runs the
fork hazard: a parallel op in the parent, a forked child's next parallel op. A child that sits
in untimed futex waits is the hazard reproduced (``ctx.symptom`` under ``ctx.only_symptoms_fail``:
the only FAIL); every other failed check (the layer not set, a wrong matmul or parallel op in
parent or child, a child that exits non-zero or is slow without being stuck) is an ERROR.
These variants need the dynamic-MKL build (the ``mkl`` extra, as in the matrix's ``mkl`` cells)
and skip elsewhere.
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys
import time

from repro.harness.spec import Build, Outcome, hazard, scenario
from repro.scenarios._proc import thread_states, untimed_futex_waiters

MODULES = ("torch", "mkl", "numpy")
LAYERS = (None, "INTEL", "GNU", "SEQUENTIAL")
INCOMPATIBLE = "MKL_THREADING_LAYER=INTEL is incompatible with libgomp.so.1"


def needs_mkl_build(build: Build) -> str | None:
    if build.mkl_build:
        return None
    return "needs pip's mkl + intel-openmp + mkl-service beside torch (the mkl build)"


def expect_for(order: tuple[str, ...], layer: str | None):
    """Expected outcome of one (import order, layer) on a build, with the reason."""

    def expect(build: Build):
        torch_first = order.index("torch") < order.index("mkl")
        if layer == "INTEL" and torch_first:
            return Outcome.CRASH, f"MKL's exit(1) at `import mkl`: '{INCOMPATIBLE}' (torch loaded libgomp first)"
        if not torch_first and layer in (None, "INTEL"):
            return Outcome.PASS, "mkl first loads libiomp5; torch's GOMP_* calls bind to it, and it survives fork"
        if not torch_first and layer == "SEQUENTIAL":
            return Outcome.PASS, "mkl first with SEQUENTIAL: torch starts with 1 intra-op thread, no team to inherit"
        if build.gomp and build.intra_threads > 1:
            return (
                Outcome.FAIL,
                f"torch's intra-op pool is libgomp with {build.intra_threads} threads: the forked child hangs",
            )
        return Outcome.PASS, f"no libgomp team (gomp={build.gomp}, intra_threads={build.intra_threads})"

    return expect


def _fork_child() -> None:
    import torch

    x = torch.ones(1 << 20)
    sys.exit(0 if float(x.add(1).sum()) == 2.0 * (1 << 20) else 3)


def _variants():
    out = []
    for order in itertools.permutations(MODULES):
        for layer in LAYERS:
            name = f"{'-'.join(order)}_{layer or 'unset'}"
            env = {"MKL_THREADING_LAYER": layer} if layer else {}
            out.append(
                hazard(
                    name,
                    params={"order": list(order), "layer": layer},
                    env=env,
                    expect=expect_for(order, layer),
                    requires=needs_mkl_build,
                    doc=f"import {', '.join(order)} with MKL_THREADING_LAYER={layer or 'unset'}, then fork after a parallel op",
                )
            )
    return out


@scenario(
    name="mkl_import_order",
    seed="001",
    claims=("001-mkl-sequential-fix", "001-nested-import-deadlock"),
    timeout=60,
    variants=_variants(),
)
def mkl_import_order(ctx):
    """Import order x MKL_THREADING_LAYER on the dynamic-MKL build: runtimes, matmul, fork hazard."""
    ctx.only_symptoms_fail()
    p = ctx.params
    layer = p["layer"]
    got = os.environ.get("MKL_THREADING_LAYER")
    ctx.check(got == layer, f"MKL_THREADING_LAYER is {got!r}, variant wants {layer!r}")
    for name in p["order"]:
        ctx.stage(f"import {name}")  # MKL's exit(1) leaves this stage as the last one
        importlib.import_module(name)
    import multiprocessing as mp

    import mkl
    import numpy as np
    import threadpoolctl
    import torch

    ctx.stage("runtimes")
    info = threadpoolctl.threadpool_info()
    runtimes = sorted({d["prefix"] for d in info})
    ctx.record(
        runtimes=runtimes,
        threadpools=[
            {k: d.get(k) for k in ("prefix", "internal_api", "threading_layer", "num_threads", "version")} for d in info
        ],
        torch_threads=torch.get_num_threads(),
        mkl_service_max_threads=mkl.get_max_threads(),
        openmp_runtimes=sorted(d["prefix"] for d in info if d["internal_api"] == "openmp"),
    )

    ctx.stage("matmul")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-4, 5, (192, 192), generator=g)
    b = torch.randint(-4, 5, (192, 192), generator=g)
    exact = a @ b  # int64: no BLAS
    t_ok = torch.equal((a.double() @ b.double()).round().long(), exact)
    t32_ok = torch.equal((a.float() @ b.float()).round().long(), exact)
    n_ok = np.array_equal(
        np.rint(a.numpy().astype(np.float64) @ b.numpy().astype(np.float64)).astype(np.int64), exact.numpy()
    )
    ctx.record(matmul={"torch_f64": t_ok, "torch_f32": t32_ok, "numpy_f64": bool(n_ok)})
    ctx.check(t_ok and t32_ok and n_ok, f"matmul wrong: torch f64 {t_ok}, torch f32 {t32_ok}, numpy {n_ok}")

    ctx.stage("fork after a parallel op")
    x = torch.ones(1 << 22)
    ctx.check(float(x.add(1).sum()) == 2.0 * (1 << 22), "parent parallel op wrong")
    proc = mp.get_context("fork").Process(target=_fork_child)
    t0 = time.monotonic()
    proc.start()
    proc.join(5.0)
    waited = time.monotonic() - t0
    hung = proc.is_alive()
    states = thread_states(proc.pid) if hung else []
    untimed, nthreads = untimed_futex_waiters(proc.pid) if hung else (0, 0)
    if hung:
        proc.kill()
    proc.join(10)
    ctx.record(
        fork_child={
            "hung": hung,
            "exitcode": proc.exitcode,
            "waited_s": round(waited, 3),
            "untimed_futex": untimed,
            "threads": nthreads,
            "states": states,
        }
    )
    ctx.check(not proc.is_alive(), "forked child survived SIGKILL")
    if hung:
        ctx.check(nthreads > 0 and untimed == nthreads, f"forked child slow but not quiescent: {states}")
        ctx.observe(
            f"{'-'.join(p['order'])} layer={layer}: runtimes {runtimes}, torch threads {torch.get_num_threads()}: fork child hung"
        )
        ctx.symptom(
            f"forked child's parallel op hangs ({untimed}/{nthreads} threads in untimed futex waits); runtimes {runtimes}"
        )
    # 3: its parallel op was wrong; 1: it raised (traceback on stderr)
    ctx.check(proc.exitcode == 0, f"forked child exited {proc.exitcode}")
    ctx.observe(
        f"{'-'.join(p['order'])} layer={layer}: runtimes {runtimes}, torch threads {torch.get_num_threads()}: fork child ok"
    )
