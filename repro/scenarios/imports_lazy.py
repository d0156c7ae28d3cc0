"""Seed 001: nested imports of torch / transformers, eager vs lazy family imports, threads.

The seed blamed a deadlock on ``import torch`` repeated in nested model modules ("torch 第 2
次 ... MKL 还在初始化中 ... 死锁"). In CPython a module body runs once: a later ``import torch``
finds ``sys.modules['torch']`` and returns it (a dict lookup, plus the module lock only while
the module is still initialising). These scenarios measure exactly that: what every nested
import does after the first (time, modules added), what an eager package import costs against
a lazy one (``splitlearn``'s registry imports one family), and what happens when several threads
import transformers model modules for the first time at once (the manager's executor loading a
family while the main thread imports another).
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path

from repro.harness.spec import fix, load, probe, scenario
from repro.scenarios._proc import run_python

FAMILIES = ("gpt2", "qwen2", "gemma")

_MEASURE = r"""
import json, sys, time
mode = sys.argv[1]
before = set(sys.modules)
t0 = time.perf_counter()
if mode == "eager":
    # the seed's package: every family imported from __init__
    import splitlearn.models.gpt2, splitlearn.models.qwen2, splitlearn.models.gemma
    from splitlearn.models.registry import ModelRegistry
    classes = [ModelRegistry.get_part_classes(f) for f in ("gpt2", "qwen2", "gemma")]
elif mode == "lazy":
    import splitlearn
    t_pkg = time.perf_counter() - t0
    torch_after_pkg = "torch" in sys.modules
    classes = [splitlearn.ModelRegistry.get_part_classes("gpt2")]
else:
    raise SystemExit(f"unknown mode {mode}")
secs = time.perf_counter() - t0
new = set(sys.modules) - before
res = {
    "seconds": secs,
    "modules": len(new),
    "families": sorted(f for f in ("gpt2", "qwen2", "gemma") if f"splitlearn.models.{f}" in sys.modules),
    "hf_modeling": sorted(m.split(".")[2] for m in new if m.startswith("transformers.models.") and m.endswith(".modeling_" + m.split(".")[2]) and m.split(".")[2] != "auto"),
    "torch": "torch" in sys.modules,
}
if mode == "lazy":
    res.update(package_seconds=t_pkg, torch_after_package_import=torch_after_pkg)
print(json.dumps(res))
"""


@scenario(
    name="imports_eager_vs_lazy",
    seed="001",
    claims=("001-lazy-import-fix",),
    timeout=240,
    serial=True,
    variants=[load("eager_vs_lazy", params={"repeats": 3}, quick={"repeats": 1})],
)
def imports_eager_vs_lazy(ctx):
    """Fresh interpreters: import every family (eager) vs the registry importing one (lazy)."""
    repeats = int(ctx.params.get("repeats", 3))
    runs: dict[str, list[dict]] = {"eager": [], "lazy": []}

    def measure(mode: str, stage: str) -> dict:
        ctx.stage(stage)
        rc, out, err, _ = run_python(["-c", _MEASURE, mode], timeout=min(90.0, max(10.0, ctx.remaining() - 5)))
        ctx.check(rc == 0, f"{mode} import failed ({rc}): {err[-800:]}")
        return json.loads(out.strip().splitlines()[-1])

    for mode in ("lazy", "eager"):  # a warm-up of each, not counted: the first pays for a cold page cache
        measure(mode, f"{mode} warm-up")
    for i in range(repeats):
        # the order alternates, so that drift in machine load and whatever the first of a pair
        # pays hit both alike
        for mode in ("lazy", "eager") if i % 2 == 0 else ("eager", "lazy"):
            runs[mode].append(measure(mode, f"{mode} #{i}"))
            ctx.record(runs=runs)
    med = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
    # side by side: the median of the pairs' ratios
    pair_speedups = [e["seconds"] / z["seconds"] for e, z in zip(runs["eager"], runs["lazy"], strict=True) if z["seconds"]]
    mods = {m: statistics.median(r["modules"] for r in rs) for m, rs in runs.items()}
    lazy, eager = runs["lazy"][-1], runs["eager"][-1]
    ctx.record(
        median_seconds=med,
        median_modules=mods,
        speedup=round(statistics.median(pair_speedups), 3) if pair_speedups else None,
        lazy_families=lazy["families"],
        eager_families=eager["families"],
        lazy_hf_modeling=lazy["hf_modeling"],
        eager_hf_modeling=eager["hf_modeling"],
    )
    ctx.check(not any(r["torch_after_package_import"] for r in runs["lazy"]), "import splitlearn imported torch")
    ctx.check(lazy["families"] == ["gpt2"], f"lazy import loaded families {lazy['families']}")
    ctx.check(lazy["hf_modeling"] == ["gpt2"], f"lazy import loaded transformers modeling {lazy['hf_modeling']}")
    ctx.check(eager["families"] == sorted(FAMILIES), f"eager import loaded {eager['families']}")
    ctx.check(mods["lazy"] < mods["eager"], f"lazy loaded no fewer modules: {mods}")
    ctx.observe(
        f"eager {med['eager']:.2f}s / {mods['eager']:.0f} modules vs lazy {med['lazy']:.2f}s / {mods['lazy']:.0f} "
        f"modules (median of {repeats})"
    )


# --- repeated nested imports (the seed's package shape) -------------------------------------
_PART = """import torch
import torch.nn as nn
from transformers import PreTrainedModel, PretrainedConfig
import transformers

class {cls}(nn.Module):
    pass
"""


def _write_seed_package(root: Path) -> list[str]:
    """nestpkg/models/<family>/{bottom,trunk,top}.py, each importing torch and transformers."""
    names = []
    pkg = root / "nestpkg"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    for fam in FAMILIES:
        d = pkg / "models" / fam
        d.mkdir()
        (d / "__init__.py").write_text("")
        for part in ("bottom", "trunk", "top"):
            (d / f"{part}.py").write_text(_PART.format(cls=f"{fam.title()}{part.title()}"))
            names.append(f"nestpkg.models.{fam}.{part}")
    return names


@scenario(
    name="imports_nested_repeated",
    seed="001",
    claims=("001-nested-import-deadlock", "001-lazy-import-fix"),
    timeout=120,
    variants=[
        probe("nested_default", params={}),
        probe("nested_mkl_sequential", params={}, env={"MKL_THREADING_LAYER": "SEQUENTIAL", "MKL_DYNAMIC": "FALSE"}),
    ],
)
def imports_nested_repeated(ctx):
    """The seed's package shape: 9 model modules each importing torch and transformers again."""
    import importlib
    import tempfile

    ctx.check("torch" not in sys.modules, "torch was imported before the scenario")
    root = Path(tempfile.mkdtemp(prefix="nestpkg-", dir=str(ctx.workdir)))
    names = _write_seed_package(root)
    sys.path.insert(0, str(root))
    try:
        steps = []

        def step(label, fn):
            before = set(sys.modules)
            t0 = time.perf_counter()
            fn()
            secs = time.perf_counter() - t0
            new = sorted(set(sys.modules) - before)
            steps.append({"import": label, "seconds": round(secs, 6), "new_modules": len(new)})
            ctx.record(steps=steps)
            return new

        ctx.stage("first import torch")
        step("import torch (first)", lambda: importlib.import_module("torch"))
        ctx.stage("first import transformers")
        step("import transformers (first)", lambda: importlib.import_module("transformers"))
        for name in names:
            ctx.stage(f"import {name}")
            new = step(name, lambda n=name: importlib.import_module(n))
            steps[-1]["new_non_package_modules"] = len([m for m in new if not m.startswith("nestpkg")])

        # what a repeated `import torch` statement costs once torch is in sys.modules
        code = compile("import torch\nimport transformers\nfrom transformers import PreTrainedModel", "<again>", "exec")
        n = 2000
        before = set(sys.modules)
        t0 = time.perf_counter()
        for _ in range(n):
            exec(code, {})
        per = (time.perf_counter() - t0) / n
        repeat_new = len(set(sys.modules) - before)
        ctx.record(repeat_statement_us=round(per * 1e6, 3), repeat_new_modules=repeat_new)
        first_family = [s for s in steps if s["import"].startswith("nestpkg.models.gpt2.bottom")][0]
        later = [s for s in steps if s["import"].startswith("nestpkg.") and s is not first_family]
        ctx.record(
            first_family_module=first_family,
            later_nested_max_seconds=max(s["seconds"] for s in later),
            later_nested_new_non_package_modules=sum(s["new_non_package_modules"] for s in later),
        )
        import torch

        a = torch.randn(256, 256, dtype=torch.float64)
        ctx.check(torch.allclose(a @ torch.eye(256, dtype=torch.float64), a), "matmul wrong after the imports")
        ctx.check(repeat_new == 0, "a repeated import statement loaded new modules")
        ctx.observe(
            f"first torch {steps[0]['seconds']:.2f}s, first transformers {steps[1]['seconds']:.3f}s, first family module "
            f"{first_family['seconds']:.2f}s (+{first_family['new_non_package_modules']} modules); the 8 later nested "
            f"modules: max {max(s['seconds'] for s in later) * 1e3:.2f} ms, "
            f"{sum(s['new_non_package_modules'] for s in later)} new non-package modules; a repeated "
            f"`import torch; import transformers; from transformers import PreTrainedModel` costs {per * 1e6:.2f} us"
        )
    finally:
        sys.path.remove(str(root))


# --- first imports from several threads at once ----------------------------------------------
def _import_family(fam: str, barrier: threading.Barrier, results: dict, via: str) -> None:
    import importlib

    barrier.wait()
    t0 = time.perf_counter()
    try:
        if via == "registry":
            from splitlearn.models.registry import ModelRegistry

            ModelRegistry.get_part_classes(fam)
        else:
            importlib.import_module(f"transformers.models.{fam}.modeling_{fam}")
        results[fam] = {"ok": True, "seconds": round(time.perf_counter() - t0, 4)}
    except BaseException as exc:  # noqa: BLE001 - recorded, the scenario decides
        results[fam] = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "seconds": round(time.perf_counter() - t0, 4),
        }


@scenario(
    name="imports_threaded_first",
    seed="001",
    claims=("001-nested-import-deadlock",),
    timeout=120,
    variants=[
        fix(
            "transformers_modeling",
            params={"via": "transformers"},
            doc="3 threads + the main thread import transformers' gpt2/qwen2/gemma modeling modules at once",
        ),
        fix(
            "splitlearn_registry",
            params={"via": "registry"},
            doc="the manager's executor threads resolve families through the registry while the main thread does too",
        ),
    ],
)
def imports_threaded_first(ctx):
    """First imports of transformers model modules from several threads at once (torch not yet imported)."""
    ctx.check("torch" not in sys.modules, "torch was imported before the scenario")
    via = ctx.params["via"]
    barrier = threading.Barrier(len(FAMILIES) + 1)
    results: dict = {}
    threads = [
        threading.Thread(target=_import_family, args=(f, barrier, results, via), name=f"import-{f}", daemon=True)
        for f in FAMILIES
    ]
    for t in threads:
        t.start()
    ctx.stage("concurrent first imports")
    main = {}
    _import_family("gpt2", barrier, main, via)  # the main thread imports the same family concurrently
    deadline = time.monotonic() + max(5.0, ctx.remaining() - 10)
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    ctx.record(threads=results, main_thread=main.get("gpt2"), alive=alive)
    ctx.check(not alive, f"import threads still blocked: {alive}")
    bad = {f: r for f, r in results.items() if not r["ok"]}
    ctx.check(main["gpt2"]["ok"], f"main thread import failed: {main['gpt2']}")
    ctx.check(not bad, f"concurrent first imports failed: {bad}")
    ctx.observe(
        f"{via}: "
        + ", ".join(f"{f} {r['seconds']}s" for f, r in results.items())
        + f"; main {main['gpt2']['seconds']}s"
    )
