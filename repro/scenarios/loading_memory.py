"""Load scenario: peak memory of loading only the trunk of a GPT-2-small-shaped model.

Seed 004's ``ModelFactory`` loaded the whole model (``AutoModelForCausalLM.from_pretrained``)
and then split it, even on a trunk server that needs layers [2, 10) only. The incremental path
reads only the trunk's tensors from the shards. This scenario measures both in fresh
interpreters, alternating, a few times each: peak RSS (``VmHWM``) of the whole process, and
the part of it due to loading (peak minus RSS once torch, transformers and the family module are
imported), measured after the trunk's first forward pass: safetensors tensors are
memory-mapped on both paths (transformers 5 maps the checkpoint too), so a weight costs resident
memory only once touched, and a trunk is not usable until its weights are. The target is
incremental <= 0.5x traditional, checked on that figure; the load-only and whole-process figures
are recorded beside it. A second variant loads the fp32 checkpoint as bfloat16: a conversion
materialises every tensor it converts, so there the traditional path pays for the whole model.

No torch at module level: the harness parent imports this module.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from repro.harness.spec import load, scenario

SPLIT = (2, 10)
TARGET_RATIO = 0.5


def _fp32_expectation(build):
    """Measured here (transformers 5.23, torch 2.13): the fp32 ratio is ~0.99, not <= 0.5.
    transformers 5 memory-maps the safetensors checkpoint, so the traditional path only makes
    resident the weights the split copies out; both paths then pay for the same trunk."""
    major = str(build["transformers"] or "0").split(".")[0]
    if major.isdigit() and int(major) >= 5:
        return (
            "FAIL",
            "transformers>=5 loads safetensors memory-mapped: the traditional path no longer "
            "materialises the whole fp32 model, so the 0.5x target is missed (finding)",
        )
    return "PASS", "transformers<5 materialises the whole model on the traditional path"


def _peak_rss_kib() -> int:
    """This process's peak RSS: ``VmHWM``, the high-water mark of its own address space. Not
    ``ru_maxrss``: subprocess starts a child by vfork, and exec carries the parent's high-water
    mark into the child's ``ru_maxrss`` (a scenario that had just built the fixture gave an
    incremental worker its 956 MiB peak)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _worker(mode: str, model_dir: str, dtype_name: str = "") -> dict:
    """Runs in a fresh interpreter: import, then load the trunk through one path; report memory."""
    import psutil

    proc = psutil.Process()
    rss_start = proc.memory_info().rss
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import splitlearn.models.gpt2  # noqa: F401
    from splitlearn.factory import ModelFactory

    dtype = getattr(torch, dtype_name) if dtype_name else None
    rss_imported = proc.memory_info().rss
    _, trunk, _ = ModelFactory.create_split_models(
        "gpt2", model_dir, SPLIT[0], SPLIT[1], parts=("trunk",), low_memory=(mode == "incremental"), dtype=dtype
    )
    load_peak_kib = _peak_rss_kib()
    info = ModelFactory.last_load_info() or {}
    # safetensors tensors are memory-mapped: pages count once touched. One forward pass touches
    # every trunk weight, which is what a serving trunk does first.
    with torch.no_grad():
        trunk(torch.zeros(1, 8, trunk.config.hidden_size, dtype=next(trunk.parameters()).dtype))
    peak_kib = _peak_rss_kib()
    mb = 1e6  # the figures are named and shown in MB (VmHWM is in KiB, RSS in bytes)
    return {
        "mode": mode,
        "rss_start_mb": rss_start / mb,
        "rss_imported_mb": rss_imported / mb,
        "peak_rss_mb": peak_kib * 1024 / mb,
        "load_peak_mb": (peak_kib * 1024 - rss_imported) / mb,
        "load_only_peak_mb": (load_peak_kib * 1024 - rss_imported) / mb,
        "rss_after_mb": proc.memory_info().rss / mb,
        "trunk_params": sum(p.numel() for p in trunk.parameters()),
        "trunk_layers": len(trunk.layers),
        "opened_files": info.get("opened_files"),
        "all_files": info.get("all_files"),
    }


def _run_worker(mode: str, model_dir: str, timeout: float, dtype_name: str = "") -> dict:
    code = (
        "import json, sys; from repro.scenarios.loading_memory import _worker; "
        "print('RESULT ' + json.dumps(_worker(sys.argv[1], sys.argv[2], sys.argv[3])))"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", code, mode, model_dir, dtype_name],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} worker exited {proc.returncode}: {proc.stderr[-2000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{mode} worker printed no result: {proc.stdout[-1000:]} {proc.stderr[-1000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


@scenario(
    name="loading_memory",
    seed="004",
    timeout=900.0,
    serial=True,
    markers=("slow",),
    variants=[
        load(
            "trunk_gpt2_small",
            params={"repeats": 3},
            quick={"repeats": 1},
            expect=_fp32_expectation,
            doc="trunk (2, 10) of a 12x768 fp32 GPT-2, loaded in its own dtype: incremental vs traditional peak RSS",
        ),
        load(
            "trunk_gpt2_small_bf16",
            params={"repeats": 3, "dtype": "bfloat16"},
            quick={"repeats": 1},
            doc="the same, loaded as bfloat16: the traditional path converts (materialises) the whole model",
        ),
    ],
)
def loading_memory(ctx) -> None:
    """Peak RSS of loading only the trunk (split 2, 10) of a GPT-2-small-shaped model:
    incremental (only the trunk's tensors from the shards) vs traditional (full model, then split)."""
    from fixtures.models import gpt2_small_dir

    repeats = int(ctx.params.get("repeats", 3))
    dtype_name = str(ctx.params.get("dtype") or "")
    ctx.stage("build fixture")
    model_dir = str(gpt2_small_dir(sharded=True))
    ctx.record(model_dir=model_dir)
    runs: dict[str, list[dict]] = {"incremental": [], "traditional": []}
    for i in range(repeats):
        order = ("incremental", "traditional") if i % 2 == 0 else ("traditional", "incremental")
        for mode in order:
            ctx.stage(f"{mode} #{i + 1}")
            per_run = max(60.0, ctx.remaining() / max(1, 2 * (repeats - i)))
            result = _run_worker(mode, model_dir, per_run, dtype_name)
            runs[mode].append(result)
            ctx.observe(
                f"{mode} #{i + 1}: peak {result['peak_rss_mb']:.0f} MB, after imports "
                f"{result['rss_imported_mb']:.0f} MB, loading {result['load_peak_mb']:.0f} MB"
            )
    med = {
        mode: {
            key: statistics.median(r[key] for r in rs)
            for key in ("peak_rss_mb", "rss_imported_mb", "load_peak_mb", "load_only_peak_mb")
        }
        for mode, rs in runs.items()
    }
    inc, trad = med["incremental"], med["traditional"]
    ratio_load = inc["load_peak_mb"] / trad["load_peak_mb"]
    ratio_process = inc["peak_rss_mb"] / trad["peak_rss_mb"]
    ctx.record(
        repeats=repeats,
        split=list(SPLIT),
        dtype=dtype_name or "checkpoint (float32)",
        incremental_peak_rss_mb=round(inc["peak_rss_mb"], 1),
        traditional_peak_rss_mb=round(trad["peak_rss_mb"], 1),
        incremental_load_mb=round(inc["load_peak_mb"], 1),
        traditional_load_mb=round(trad["load_peak_mb"], 1),
        baseline_after_imports_mb=round(
            statistics.median([r["rss_imported_mb"] for rs in runs.values() for r in rs]), 1
        ),
        ratio=round(ratio_load, 4),
        ratio_whole_process=round(ratio_process, 4),
        incremental_load_only_mb=round(inc["load_only_peak_mb"], 1),
        traditional_load_only_mb=round(trad["load_only_peak_mb"], 1),
        ratio_load_only=round(inc["load_only_peak_mb"] / max(trad["load_only_peak_mb"], 1e-9), 4),
        target_ratio=TARGET_RATIO,
        incremental_opened_files=runs["incremental"][0]["opened_files"],
        all_files=runs["incremental"][0]["all_files"],
        trunk_params=runs["incremental"][0]["trunk_params"],
        runs=runs,
    )
    if not (
        runs["incremental"][0]["trunk_params"] == runs["traditional"][0]["trunk_params"]
        and runs["incremental"][0]["trunk_layers"] == SPLIT[1] - SPLIT[0]
    ):  # figures of two different trunks: an ERROR, never the FAIL the fp32 variant expects of its ratio
        raise RuntimeError("the two paths built different trunks")
    ctx.check(
        ratio_load <= TARGET_RATIO,
        f"incremental trunk load peaks at {ratio_load:.2f}x the traditional one "
        f"({inc['load_peak_mb']:.0f} MB vs {trad['load_peak_mb']:.0f} MB above the import baseline); target <= {TARGET_RATIO}",
    )
