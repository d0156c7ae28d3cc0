"""What the harness itself costs, measured by a harness parent running inside a scenario.

* ``harness_overhead:import-torch`` (probe): the trivial scenario, ``import torch`` and pass.
* ``harness_overhead:startup`` (load): alternates a full ``run_variant`` of that trivial scenario
  (child start, sampling of the tree, result file, clean-up) with a bare
  ``subprocess.run([python, "-c", "import torch"])``, ``rounds`` pairs after one warm-up of each,
  the order within a pair alternating; the figure is the median of the pairs' ratios. Target: at
  most ``max_ratio`` (1.15x).
* ``harness_overhead:hang-latency`` (load): runs ``fork_after_threads:fork`` ``rounds`` times and
  measures how long after the hang's onset (the child entering its parallel op, i.e. the
  scenario's last stage) the HANG verdict comes, against the deadline one would otherwise wait.
  Target: median at most ``max_latency_s`` (3 s).

The scenario process never imports torch itself: it is a harness parent.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from repro.harness.spec import load, probe, scenario


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 4)


def _startup(ctx) -> None:
    from repro.harness.runner import child_env, run_variant
    from repro.harness.spec import REGISTRY, Build

    sc = REGISTRY["harness_overhead"]
    trivial = sc.variant("import-torch")
    rounds = int(ctx.params.get("rounds", 5))
    build = Build({}, {})  # the trivial variant's expectation needs no fingerprint
    env = child_env()
    def through_harness() -> float:
        t = time.perf_counter()
        r = run_variant(sc, trivial, build=build, timeout=min(120.0, ctx.remaining()))
        took = time.perf_counter() - t
        ctx.check(r.outcome == "PASS", f"trivial scenario was {r.outcome}: {r.summary()}")
        return took

    def bare_import() -> float:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], env=env, check=True, timeout=ctx.remaining())
        return time.perf_counter() - t

    harness, bare = [], []
    ctx.stage("warm-up")  # each side once, not counted: the first of either pays for a cold cache
    through_harness()
    bare_import()
    for i in range(rounds):
        ctx.stage(f"round-{i + 1}")
        if i % 2:  # the order alternates, so that whatever the first of a pair pays hits both alike
            bare.append(bare_import())
            harness.append(through_harness())
        else:
            harness.append(through_harness())
            bare.append(bare_import())
    # side by side: each round's ratio, then their median
    ratio = statistics.median(h / b for h, b in zip(harness, bare, strict=True))
    ctx.record(
        harness_s=[round(x, 4) for x in harness],
        bare_import_s=[round(x, 4) for x in bare],
        harness_median_s=_median(harness),
        bare_median_s=_median(bare),
        overhead_ratio=round(ratio, 4),
        target_ratio=ctx.params["max_ratio"],
    )
    ctx.check(
        ratio <= ctx.params["max_ratio"],
        f"harness run costs {ratio:.3f}x a bare `import torch` (target {ctx.params['max_ratio']}x)",
    )


def _hang_latency(ctx) -> None:
    from repro.harness.fingerprint import get_fingerprint
    from repro.harness.runner import run_variant
    from repro.harness.spec import Build
    from repro.scenarios import load_catalogue

    sc = load_catalogue()["fork_after_threads"]
    v = sc.variant("fork")
    fp = get_fingerprint()
    build = Build(fp, v.env)
    expected, reason = v.expected(build)
    if "HANG" not in {o.value for o in expected}:
        ctx.observe(f"the fork hazard is not predicted to hang on this build ({reason}): nothing to time")
        ctx.record(predicted=sorted(o.value for o in expected))
        return
    rounds = int(ctx.params.get("rounds", 5))
    deadline = float(ctx.params.get("deadline_s", 60.0))
    after_stage, after_start = [], []
    for i in range(rounds):
        ctx.stage(f"round-{i + 1}")
        r = run_variant(sc, v, build=build, timeout=deadline)
        ctx.check(r.outcome == "HANG", f"fork hazard was {r.outcome}: {r.summary()}")
        hang = r.evidence["hang"]
        after_stage.append(hang["after_last_stage_s"])
        after_start.append(hang["detected_after_s"])
    med = statistics.median(after_stage)
    ctx.record(
        latency_after_onset_s=after_stage,
        detected_after_start_s=after_start,
        median_latency_s=round(med, 3),
        deadline_s=deadline,
        window_s=r.evidence["hang"]["window_s"],
        saved_vs_deadline_s=round(deadline - statistics.median(after_start), 3),
    )
    ctx.check(med <= ctx.params["max_latency_s"], f"median HANG latency {med:.2f}s > {ctx.params['max_latency_s']}s")


@scenario(
    name="harness_overhead",
    serial=True,
    timeout=600.0,
    variants=[
        probe("import-torch", params={"what": "import-torch"}, timeout=120.0, doc="import torch, then pass"),
        load(
            "startup",
            params={"what": "startup", "rounds": 5, "max_ratio": 1.15},
            quick={"rounds": 3},
            doc="harness run vs bare import torch",
        ),
        load(
            "hang-latency",
            params={"what": "hang-latency", "rounds": 5, "max_latency_s": 3.0, "deadline_s": 60.0},
            quick={"rounds": 2},
            markers=("slow",),
            doc="HANG verdict latency on fork_after_threads:fork",
        ),
    ],
)
def harness_overhead(ctx) -> None:
    """The harness's own costs: start-up overhead and HANG verdict latency."""
    what = ctx.params["what"]
    if what == "import-torch":
        import torch  # noqa: F401

        return
    if what == "startup":
        _startup(ctx)
    elif what == "hang-latency":
        _hang_latency(ctx)
    else:
        ctx.fail(f"unknown measurement {what!r}")
