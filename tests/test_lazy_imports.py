"""``import splitlearn`` imports neither torch nor transformers; asking for one family imports
that family's module only (seed 001). Checked in fresh interpreters through sys.modules, with
the import times measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "transformers", "safetensors", "numpy")

PROBE = textwrap.dedent(
    """
    import json, sys, time
    HEAVY = {heavy!r}
    def heavy():
        return sorted(m for m in HEAVY if m in sys.modules)
    def families():
        return sorted(m for m in sys.modules if m.startswith("splitlearn.models.") and m not in ("splitlearn.models.registry",))
    out = {{}}
    t = time.perf_counter(); import splitlearn; out["import_s"] = time.perf_counter() - t
    out["after_import"] = heavy()
    from splitlearn import (ModelFactory, ModelRegistry, load_split_model, SplitLearnError, InvalidSplitPoints,
                            UnknownModelType, ConfigMismatch, CorruptWeights, MissingShard, ModelNotFound)
    import splitlearn.models, splitlearn.factory, splitlearn.quickstart, splitlearn.loading, fixtures
    out["after_names"] = heavy()
    out["known"] = ModelRegistry.known()
    try:
        ModelRegistry.get_model_class("llama", "trunk")
    except UnknownModelType as exc:
        out["unknown"] = str(exc)
    out["after_registry"] = heavy()
    out["families_before"] = families()
    t = time.perf_counter(); cls = ModelRegistry.get_model_class({family!r}, "trunk"); out["family_s"] = time.perf_counter() - t
    out["cls"] = cls.__name__
    out["families_after"] = families()
    out["after_family"] = heavy()
    print("RESULT " + json.dumps(out))
    """
)


def run_probe(family: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY, family=family)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.mark.parametrize(
    "family,cls", [("gpt2", "GPT2TrunkModel"), ("qwen2", "Qwen2TrunkModel"), ("gemma", "GemmaTrunkModel")]
)
def test_lazy_imports_in_fresh_interpreter(family, cls):
    out = run_probe(family)
    print(f"import splitlearn: {out['import_s'] * 1e3:.1f} ms; first {family} part class: {out['family_s']:.2f} s")
    assert out["after_import"] == []
    assert out["after_names"] == []  # factory, quickstart, loading, errors, fixtures: all torch-free
    assert out["after_registry"] == []
    assert out["known"] == ["gemma", "gpt2", "qwen2"]
    assert "known model types: gemma, gpt2, qwen2" in out["unknown"]
    assert out["families_before"] == []
    assert out["cls"] == cls
    assert out["families_after"] == ["splitlearn.models.base", f"splitlearn.models.{family}"]
    assert "torch" in out["after_family"] and "transformers" in out["after_family"]
    assert out["import_s"] < 0.5, f"import splitlearn took {out['import_s']:.3f}s"
