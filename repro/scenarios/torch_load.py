"""Seed 000: ``torch.load`` of a fully pickled trunk, thread variables, and what replaces it.

The seed saw ``[mutex.cc : 452] RAW: Lock blocking`` once at ``torch.load(..., weights_only=False)``
(on macOS) and called it harmless PyTorch C++ initialisation. The text is abseil's raw logging;
a torch build prints it only if a library it loads carries abseil's mutex code. These
scenarios load the seed's three formats (full pickle, state dict, safetensors) of a split
GPT-2 trunk in fresh interpreters with the thread variables set before import, after import,
and ``torch.set_num_threads`` before the load, and record time, warnings and stderr
signatures; a probe scans every shared library the process has mapped for the message bytes.

Then the safety side the seed's code skipped: today's ``weights_only=True`` default refuses
the full pickle; a crafted pickle runs code under ``weights_only=False`` (hazard: it writes a
marker file in its own temporary directory, nothing else) and is refused by
``weights_only=True`` and by the safetensors loader (fix); a renamed model class breaks the
full pickle (hazard) but not the state dict (fix).

The two hazard scenarios report their reproduced symptom with ``ctx.symptom`` (FAIL) under
``ctx.only_symptoms_fail``: any other failed check there (the loader crashed, the load failed for
another reason) is an ERROR, never the hazard; no symptom is a PASS (the hazard did not show).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from repro.harness.spec import Outcome, fix, hazard, probe, scenario
from repro.scenarios._proc import run_python

SIGNATURES = {
    "raw_lock_blocking": r"RAW: Lock blocking",
    "mutex_cc": r"mutex\.cc",
    "omp_error": r"OMP: Error #\d+",
    "omp_warning": r"OMP: Warning #\d+",
    "weights_only_warning": r"weights_only",
    "traceback": r"Traceback \(most recent call last\)",
}
LOCK_MSG = b"RAW: Lock blocking"


def _signatures(text: str) -> dict[str, int]:
    return {k: len(re.findall(rx, text)) for k, rx in SIGNATURES.items() if re.search(rx, text)}


def _tmpdir(ctx) -> Path:
    base = Path(ctx.workdir)
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="torch_load-", dir=base))


def _save_trunk(ctx, d: Path) -> dict[str, str]:
    """Save the trunk of a split tiny GPT-2 in the three formats, and a reference output."""
    import torch
    from safetensors.torch import save_file

    from fixtures.models import tiny_model_dir
    from splitlearn import ModelFactory

    ctx.stage("build and save trunk")
    bottom, trunk, _ = ModelFactory.create_split_models(
        "gpt2", tiny_model_dir("gpt2"), 1, 3, device="cpu", parts=("bottom", "trunk")
    )
    ids = torch.randint(0, 250, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = bottom(ids).hidden_states
        out = trunk(h).hidden_states
    files = {
        "full": d / "gpt2_trunk_full.pt",
        "state_dict": d / "gpt2_trunk_state.pt",
        "safetensors": d / "gpt2_trunk.safetensors",
        "ref": d / "ref.pt",
    }
    torch.save(trunk, files["full"])
    sd = {k: v.contiguous() for k, v in trunk.state_dict().items()}
    torch.save(sd, files["state_dict"])
    save_file(sd, str(files["safetensors"]))
    torch.save({"input": h, "output": out}, files["ref"])
    ctx.record(file_bytes={k: os.path.getsize(v) for k, v in files.items()})
    return {k: str(v) for k, v in files.items()}


# --- loads in fresh interpreters ------------------------------------------------------------
@scenario(
    name="torch_load_threads",
    seed="000",
    claims=("000-mutex-harmless",),
    timeout=240,
    variants=[
        probe("env_before_import", params={"threads": "env_before_import"}),
        probe("env_after_import", params={"threads": "env_after_import"}),
        probe("set_num_threads", params={"threads": "set_num_threads"}),
    ],
)
def torch_load_threads(ctx):
    """Full pickle / state dict / safetensors loaded in fresh interpreters: time, warnings, stderr."""
    d = _tmpdir(ctx)
    try:
        files = _save_trunk(ctx, d)
        results = {}
        for mode in ("full", "state_dict", "safetensors"):
            ctx.stage(f"load {mode} in a fresh interpreter")
            out = d / f"{mode}.json"
            arg = json.dumps(
                {
                    "mode": mode,
                    "file": files[mode],
                    "ref": files["ref"],
                    "threads": ctx.params["threads"],
                    "out": str(out),
                }
            )
            env = {k: None for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")}
            rc, _, err, secs = run_python(
                ["-m", "repro.scenarios._load_child", arg], timeout=min(90.0, max(10.0, ctx.remaining() - 10)), env=env
            )
            res = json.loads(out.read_text()) if out.exists() else {}
            res.update(rc=rc, wall_s=round(secs, 3), stderr_signatures=_signatures(err), stderr_tail=err[-600:])
            results[mode] = res
            ctx.record(loads=results)
            ctx.check(rc == 0, f"{mode}: loader exited {rc}: {err[-800:]}")
            ctx.check(
                res.get("output_equal"), f"{mode}: loaded trunk gives different output ({res.get('max_abs_diff')})"
            )
        import torch

        # the variables only count when set before import; after it torch keeps its default
        expected_threads = torch.get_num_threads() if ctx.params["threads"] == "env_after_import" else 1
        ctx.record(expected_threads=expected_threads)
        for mode, res in results.items():
            ctx.check(
                res["torch_num_threads"] == expected_threads,
                f"{mode}: torch ran with {res['torch_num_threads']} threads, expected {expected_threads}",
            )
        lock = {m: r["stderr_signatures"].get("raw_lock_blocking", 0) for m, r in results.items()}
        ctx.record(raw_lock_blocking=lock)
        ctx.observe(
            f"{ctx.params['threads']}: "
            + "; ".join(
                f"{m} load {r['load_s']}s (import {r['import_torch_s']}s, threads {r['torch_num_threads']}), "
                f"warnings {len(r['warnings'])}, signatures {r['stderr_signatures']}"
                for m, r in results.items()
            )
        )
    finally:
        shutil.rmtree(d, ignore_errors=True)


@scenario(
    name="torch_load_lock_message",
    seed="000",
    claims=("000-mutex-harmless",),
    timeout=120,
    variants=[probe("scan_loaded_libraries", params={})],
)
def torch_load_lock_message(ctx):
    """Which mapped shared library could print abseil's 'RAW: Lock blocking' after a full-pickle load?"""
    d = _tmpdir(ctx)
    try:
        import torch

        files = _save_trunk(ctx, d)
        ctx.stage("load full pickle")
        torch.load(files["full"], map_location="cpu", weights_only=False)
        ctx.stage("scan mapped libraries")
        libs = sorted({line.split()[-1] for line in open("/proc/self/maps") if ".so" in line and "/" in line})
        holders, scanned, nbytes = [], 0, 0
        for lib in libs:
            try:
                data = Path(lib).read_bytes()
            except OSError:
                continue
            scanned += 1
            nbytes += len(data)
            if LOCK_MSG in data or b"mutex.cc" in data and b"absl" in data:
                holders.append(lib)
        ctx.record(
            libraries_scanned=scanned,
            bytes_scanned=nbytes,
            libraries_with_message=holders,
            torch_libs=[lib for lib in libs if "/torch/" in lib],
        )
        ctx.check(scanned > 5 and any("libtorch_cpu" in lib for lib in libs), f"scan saw too little: {libs}")
        ctx.observe(f"{scanned} mapped libraries ({nbytes >> 20} MiB): abseil lock message in {holders or 'none'}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- weights_only ----------------------------------------------------------------------------
@scenario(
    name="torch_load_weights_only",
    seed="000",
    claims=("000-weights-only",),
    timeout=120,
    variants=[
        fix("default_refuses_full_pickle", params={}),
    ],
)
def torch_load_weights_only(ctx):
    """torch.load's default (weights_only=True) refuses the seed's full pickle; the state dict and
    safetensors load."""
    import pickle

    import torch

    d = _tmpdir(ctx)
    try:
        files = _save_trunk(ctx, d)
        ctx.stage("default torch.load of the full pickle")
        err = None
        try:
            torch.load(files["full"], map_location="cpu")
        except pickle.UnpicklingError as exc:
            err = str(exc)
        ctx.record(default_error=err and err[:1500], torch=torch.__version__)
        ctx.check(err is not None, "torch.load's default loaded a full pickle (weights_only default is not True)")
        ctx.check("Weights only load failed" in err, f"unexpected refusal message: {err[:300]}")
        ctx.observe(
            f"default torch.load refuses: {err.splitlines()[0]} ... "
            + next((ln.strip() for ln in err.splitlines() if "Unsupported global" in ln), "")
        )
        ctx.stage("state dict and safetensors")
        from safetensors.torch import load_file

        from fixtures.models import tiny_model_dir
        from splitlearn import ModelFactory

        ref = torch.load(files["ref"])
        for mode in ("state_dict", "safetensors"):
            _, trunk, _ = ModelFactory.create_split_models("gpt2", tiny_model_dir("gpt2"), 1, 3, parts=("trunk",))
            with torch.no_grad():
                for prm in trunk.parameters():
                    prm.zero_()
            sd = torch.load(files[mode]) if mode == "state_dict" else load_file(files[mode])
            trunk.load_state_dict(sd, strict=True)
            with torch.no_grad():
                ok = torch.equal(trunk(ref["input"]).hidden_states, ref["output"])
            ctx.check(ok, f"{mode} replacement gives a different output")
        ctx.record(replacements_ok=["state_dict (weights_only=True)", "safetensors"])
    finally:
        shutil.rmtree(d, ignore_errors=True)


class _Payload:
    """Pickles to a call of exec: what a hostile 'model' file can carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran at unpickling')",))


@scenario(
    name="torch_load_malicious",
    seed="000",
    claims=("000-weights-only",),
    timeout=60,
    variants=[
        hazard(
            "weights_only_false",
            params={"loader": "weights_only_false"},
            expect=(Outcome.FAIL, "weights_only=False unpickles arbitrary callables on every torch"),
        ),
        fix("weights_only_true", params={"loader": "weights_only_true"}),
        fix("safetensors", params={"loader": "safetensors"}),
    ],
)
def torch_load_malicious(ctx):
    """A crafted pickle in the shape of a model file: does loading run its code?"""
    import pickle

    import torch

    ctx.only_symptoms_fail()
    d = Path(tempfile.mkdtemp(prefix="malicious-"))  # its own temp dir: the only thing it may write into
    try:
        marker = d / "MARKER"
        path = d / "gpt2_trunk_full.pt"
        torch.save({"model": _Payload(str(marker))}, path)
        ctx.check(not marker.exists(), "saving ran the payload")
        loader = ctx.params["loader"]
        ctx.stage(f"load with {loader}")
        err = None
        try:
            if loader == "weights_only_false":
                torch.load(path, weights_only=False)
            elif loader == "weights_only_true":
                torch.load(path, weights_only=True)
            else:
                from safetensors.torch import load_file

                sfile = d / "gpt2_trunk.safetensors"
                shutil.copy(path, sfile)  # the same bytes offered to the safetensors loader
                load_file(str(sfile))
        except (pickle.UnpicklingError, Exception) as exc:  # noqa: BLE001 - the refusal is the point
            err = f"{type(exc).__name__}: {str(exc)[:600]}"
        ran = marker.exists()
        ctx.record(loader=loader, code_ran=ran, refused=err, files_in_tmp=sorted(p.name for p in d.iterdir()))
        ctx.observe(f"{loader}: code ran={ran}; refusal={err and err.splitlines()[0]}")
        if loader == "weights_only_false":
            if ran:
                ctx.symptom(f"torch.load(weights_only=False) executed the pickle's payload: {marker} written")
            ctx.check(err is None, f"the load failed before the payload could run: {err}")
            ctx.observe("weights_only=False loaded the file and the payload did not run: hazard not shown")
            return
        ctx.check(not ran, f"{loader} ran the payload")
        ctx.check(err is not None, f"{loader} accepted the malicious file")
        if loader == "weights_only_true":
            ctx.check("Weights only load failed" in err and "exec" in err, f"unexpected refusal: {err}")
        else:
            ctx.check(err.startswith("SafetensorError:"), f"unexpected refusal: {err}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- a model class moved or renamed ----------------------------------------------------------
_V1 = """
import torch
from torch import nn

class Trunk(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))
"""
_V2 = _V1.replace("class Trunk(", "class TrunkPart(")  # refactor: module and class renamed

_LOADER = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
mode, d = sys.argv[2], sys.argv[1]
ref = torch.load(d + "/ref.pt", weights_only=True)
try:
    if mode == "full":
        m = torch.load(d + "/trunk_full.pt", weights_only=False)
    else:
        from partmodels_v2 import TrunkPart
        m = TrunkPart()
        m.load_state_dict(torch.load(d + "/trunk_state.pt", weights_only=True))
    with torch.no_grad():
        res = {"ok": bool(torch.equal(m(ref["x"]), ref["y"]))}
except Exception as exc:
    res = {"error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(res))
"""


@scenario(
    name="torch_load_class_moved",
    seed="000",
    claims=("000-weights-only",),
    timeout=90,
    variants=[
        hazard(
            "full_pickle",
            params={"mode": "full"},
            expect=(Outcome.FAIL, "a full pickle names the class by module path: a rename breaks it on every build"),
        ),
        fix("state_dict", params={"mode": "state_dict"}),
    ],
)
def torch_load_class_moved(ctx):
    """Save with class partmodels_v1.Trunk, rename to partmodels_v2.TrunkPart, load in a fresh interpreter."""
    ctx.only_symptoms_fail()
    d = _tmpdir(ctx)
    try:
        (d / "partmodels_v1.py").write_text(_V1)
        sys.path.insert(0, str(d))
        try:
            import partmodels_v1  # noqa: F401 - generated above
            import torch

            torch.manual_seed(0)
            m = partmodels_v1.Trunk()
            x = torch.randn(3, 32)
            with torch.no_grad():
                y = m(x)
            torch.save(m, d / "trunk_full.pt")
            torch.save(m.state_dict(), d / "trunk_state.pt")
            torch.save({"x": x, "y": y}, d / "ref.pt")
        finally:
            sys.path.remove(str(d))
            sys.modules.pop("partmodels_v1", None)
        (d / "partmodels_v1.py").unlink()
        (d / "partmodels_v2.py").write_text(_V2)
        shutil.rmtree(d / "__pycache__", ignore_errors=True)
        ctx.stage(f"load {ctx.params['mode']} after the rename")
        rc, out, err, secs = run_python(
            ["-c", _LOADER, str(d), ctx.params["mode"]], timeout=max(10, ctx.remaining() - 5)
        )
        # the loader catches what a load raises: this is a crash or a timeout, never the hazard
        ctx.check(rc == 0, f"loader exited {rc}: {err[-800:]}")
        res = json.loads(out.strip().splitlines()[-1])
        ctx.record(result=res, seconds=round(secs, 3))
        ctx.observe(f"{ctx.params['mode']} after rename: {res}")
        if ctx.params["mode"] == "full":
            if "error" in res:
                ctx.check("partmodels_v1" in res["error"], f"full pickle failed for another reason: {res['error']}")
                ctx.symptom(f"full pickle no longer loads after the class moved: {res['error']}")
            ctx.check(res.get("ok") is True, f"full pickle loaded despite the rename, with another output: {res}")
            ctx.observe("the full pickle loaded despite the rename: hazard not shown")
            return
        ctx.check(res.get("ok") is True, f"state dict did not load into the renamed class: {res}")
    finally:
        shutil.rmtree(d, ignore_errors=True)
