"""ModelLoader / ModelConfig: every load path against real checkpoints, and bad configs."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fixtures.models import tiny_model_dir
from splitlearn.errors import InvalidSplitPoints, SplitLearnError
from splitlearn.model_loader import (
    ConfigError,
    LoadCancelled,
    ModelConfig,
    ModelLoader,
    ModelLoadError,
    configure_threads,
    import_string,
    param_bytes,
)

LIN_KW = {"in_features": 6, "out_features": 3}


@pytest.fixture()
def linear(tmp_path):
    torch.manual_seed(1)
    lin = torch.nn.Linear(**LIN_KW)
    st = tmp_path / "lin.safetensors"
    pt = tmp_path / "lin.pt"
    save_file(lin.state_dict(), str(st))
    torch.save(lin.state_dict(), str(pt))
    return lin, st, pt


def lin_cfg(path, **kw):
    return ModelConfig("lin", "pytorch", str(path), model_class="torch.nn:Linear", model_kwargs=dict(LIN_KW), **kw)


# -- config validation ---------------------------------------------------------------------
def test_valid_configs_pass(linear, tmp_path):
    _, st, _ = linear
    tiny = tiny_model_dir("gpt2")
    assert lin_cfg(st).validate() is not None
    ModelConfig("hf", "huggingface", tiny).validate()
    ModelConfig("b", "gpt2", tiny, component="bottom", split_points=[1, 3]).validate()


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"model_id": "", "model_type": "pytorch"}, "model_id must be a non-empty string"),
        ({"model_id": "x", "model_type": "onnx"}, "model_type 'onnx' is not one of"),
        ({"model_id": "x", "model_type": "pytorch", "model_class": "torch.nn:Linear"}, "needs model_path"),
        ({"model_id": "x", "model_type": "pytorch", "model_path": "/nonexistent/w.pt", "model_class": "torch.nn:Linear"}, "is not a file"),
        ({"model_id": "x", "model_type": "huggingface"}, "needs model_path: a local directory"),
        ({"model_id": "x", "model_type": "huggingface", "model_path": "/nonexistent"}, "is not a directory with a config.json"),
        ({"model_id": "x", "model_type": "gpt2", "model_path": "/nonexistent", "component": "bottom", "split_points": [1, 2]}, "is not a directory"),
        ({"model_id": "x", "model_type": "pytorch", "device": "tpu"}, "device 'tpu'"),
    ],
)
def test_bad_configs_are_refused_with_the_reason(kwargs, fragment):
    with pytest.raises(ConfigError, match="invalid model config") as ei:
        ModelConfig(**kwargs).validate()
    assert fragment in str(ei.value)
    assert isinstance(ei.value, SplitLearnError) and isinstance(ei.value, ValueError)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"model_class": None}, "needs model_class"),
        ({"model_class": "torch.nn.Linear"}, "must look like 'package.module:Class'"),
        ({"model_class": "torch.nn:Lin ear"}, "must look like"),
        ({"model_kwargs": [1, 2]}, "model_kwargs must be a mapping"),
        ({"warmup": True}, "needs warmup_input_shape"),
        ({"warmup_input_shape": [2, 0]}, "warmup_input_shape must be positive integers"),
        ({"num_threads": 0}, "num_threads must be None or an integer >= 1"),
        ({"num_threads": True}, "num_threads must be"),
        ({"interop_threads": -1}, "interop_threads must be"),
        ({"warmup_steps": 0}, "warmup_steps must be an integer >= 1"),
        ({"load_timeout": 0}, "load_timeout must be None or a positive finite number"),
        ({"load_timeout": float("nan")}, "load_timeout must be None or a positive finite number"),
        ({"load_timeout": float("inf")}, "load_timeout must be None or a positive finite number"),
        ({"memory_estimate_bytes": -5}, "memory_estimate_bytes must be"),
        ({"dtype": "int7"}, "dtype 'int7' is not one of"),
    ],
)
def test_bad_pytorch_fields(linear, override, fragment):
    _, st, _ = linear
    cfg = lin_cfg(st)
    for k, v in override.items():
        setattr(cfg, k, v)
    with pytest.raises(ConfigError) as ei:
        cfg.validate()
    assert fragment in str(ei.value)


def test_wrong_suffix_refused(tmp_path):
    f = tmp_path / "weights.npz"
    f.write_bytes(b"x")
    with pytest.raises(ConfigError, match="must end in one of"):
        ModelConfig("x", "pytorch", f, model_class="torch.nn:Linear").validate()


@pytest.mark.parametrize(
    "split_points, fragment",
    [(None, "two integers"), ([3], "two integers"), ("12", "two integers"), ([1.0, 2.0], "two integers"),
     ([True, 2], "two integers"), ([3, 1], "0 < s1 < s2"), ([0, 2], "0 < s1 < s2"), ([2, 2], "0 < s1 < s2")],
)
def test_bad_split_points(split_points, fragment):
    cfg = ModelConfig("x", "gpt2", tiny_model_dir("gpt2"), component="trunk", split_points=split_points)
    with pytest.raises(ConfigError) as ei:
        cfg.validate()
    assert fragment in str(ei.value)


def test_bad_component_and_auto_class():
    tiny = tiny_model_dir("gpt2")
    with pytest.raises(ConfigError, match="component 'middle' is not one of"):
        ModelConfig("x", "qwen2", tiny, component="middle", split_points=[1, 2]).validate()
    with pytest.raises(ConfigError, match="auto_class 'seq2seq'"):
        ModelConfig("x", "huggingface", tiny, auto_class="seq2seq").validate()


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as ei:
        ModelConfig("x", "gpt2", "/nonexistent", component=None, split_points=[5, 1], num_threads=0).validate()
    msg = str(ei.value)
    for fragment in ("is not a directory", "component None", "0 < s1 < s2", "num_threads"):
        assert fragment in msg


def test_from_dict(linear):
    _, st, _ = linear
    cfg = ModelConfig.from_dict(lin_cfg(st).to_dict())
    assert cfg == lin_cfg(st)
    json.dumps(cfg.to_dict())  # serialisable
    with pytest.raises(ConfigError, match=r"unknown model config keys \['split_point'\]"):
        ModelConfig.from_dict({"model_id": "x", "model_type": "gpt2", "split_point": [1, 2]})
    with pytest.raises(ConfigError, match=r"lacks required keys \['model_type'\]"):
        ModelConfig.from_dict({"model_id": "x"})
    with pytest.raises(ConfigError, match="must be a mapping"):
        ModelConfig.from_dict(["model_id"])


# -- pytorch path --------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["safetensors", "pt"])
def test_pytorch_state_dict_loads_the_weights(linear, which):
    lin, st, pt = linear
    model = ModelLoader().load_from_config(lin_cfg(st if which == "safetensors" else pt))
    assert isinstance(model, torch.nn.Linear) and not model.training
    assert torch.equal(model.weight, lin.weight) and torch.equal(model.bias, lin.bias)
    x = torch.randn(2, 6)
    assert torch.equal(model(x), lin(x))


def test_pytorch_checkpoint_wrapper_and_dtype(linear, tmp_path):
    lin, _, _ = linear
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"state_dict": lin.state_dict(), "epoch": 3}, str(wrapped))
    model = ModelLoader().load_from_config(lin_cfg(wrapped, dtype="float64"))
    assert model.weight.dtype == torch.float64
    assert torch.equal(model.weight, lin.weight.double())


class _Boom:
    """Pickling this makes the unpickler call os.system: what weights_only must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_objects_are_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"weight": _Boom(marker)}, fh)
    with pytest.raises(ModelLoadError, match=r"weights_only=True.*Only tensors are accepted"):
        ModelLoader().load_from_config(lin_cfg(evil))
    assert not marker.exists()


def test_pickled_full_module_is_refused(tmp_path):
    full = tmp_path / "full.pt"
    torch.save(torch.nn.Linear(**LIN_KW), str(full))  # the seed's torch.save(model) pattern
    with pytest.raises(ModelLoadError, match="save\\s+model.state_dict"):
        ModelLoader().load_from_config(lin_cfg(full))


def test_not_a_state_dict(tmp_path):
    f = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], str(f))
    with pytest.raises(ModelLoadError, match="does not hold a state dict"):
        ModelLoader().load_from_config(lin_cfg(f))


def test_truncated_safetensors(linear, tmp_path):
    _, st, _ = linear
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(st.read_bytes()[:40])
    with pytest.raises(ModelLoadError, match="cannot read safetensors file"):
        ModelLoader().load_from_config(lin_cfg(bad))


def test_shape_mismatch_and_non_strict(linear, tmp_path):
    _, st, _ = linear
    cfg = lin_cfg(st)
    cfg.model_kwargs = {"in_features": 6, "out_features": 4}
    with pytest.raises(ModelLoadError, match="does not fit torch.nn:Linear"):
        ModelLoader().load_from_config(cfg)
    partial = tmp_path / "partial.safetensors"
    save_file({"weight": torch.ones(3, 6)}, str(partial))
    with pytest.raises(ModelLoadError, match="Missing key"):
        ModelLoader().load_from_config(lin_cfg(partial))
    model = ModelLoader().load_from_config(lin_cfg(partial, strict=False))
    assert torch.equal(model.weight, torch.ones(3, 6))


@pytest.mark.parametrize(
    "model_class, fragment",
    [("collections:OrderedDict", "is not a torch.nn.Module subclass"),
     ("no_such_module_xyz:Model", "cannot import module 'no_such_module_xyz'"),
     ("torch.nn:NoSuchLayer", "has no attribute 'NoSuchLayer'")],
)
def test_bad_model_class(linear, model_class, fragment):
    _, st, _ = linear
    cfg = lin_cfg(st)
    cfg.model_class = model_class
    with pytest.raises(ModelLoadError, match=fragment):
        ModelLoader().load_from_config(cfg)


def test_bad_model_kwargs(linear):
    _, st, _ = linear
    cfg = lin_cfg(st)
    cfg.model_kwargs = {"in_features": 6, "outs": 3}
    with pytest.raises(ModelLoadError, match="cannot build torch.nn:Linear"):
        ModelLoader().load_from_config(cfg)


def test_import_string():
    assert import_string("torch.nn:Linear") is torch.nn.Linear
    assert import_string("torch:nn.Linear") is torch.nn.Linear
    with pytest.raises(ConfigError):
        import_string("torch.nn.Linear")


def test_cuda_device_refused_without_cuda(linear):
    _, st, _ = linear
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        ModelLoader().load_from_config(lin_cfg(st, device="cuda:0"))


# -- warmup and cancellation ---------------------------------------------------------------
def test_warmup_runs_the_configured_passes(linear):
    _, st, _ = linear
    calls = []

    class Counting(ModelLoader):
        def warmup(self, model, config, cancel_event=None):
            model.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
            return super().warmup(model, config, cancel_event)

    Counting().load_from_config(lin_cfg(st, warmup=True, warmup_steps=3, warmup_input_shape=[4, 6]))
    assert calls == [(4, 6)] * 3


def test_warmup_with_wrong_shape_is_a_load_error(linear):
    _, st, _ = linear
    with pytest.raises(ModelLoadError, match=r"warmup forward of 'lin' failed on input \(4, 5\)"):
        ModelLoader().load_from_config(lin_cfg(st, warmup=True, warmup_input_shape=[4, 5]))


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_warmup_of_a_converted_pytorch_model_uses_its_dtype(linear, dtype):
    """dtype + warmup is a valid config: the sample input must be in the dtype the load
    converted the model to, not float32 (the warmup would fail on every such load)."""
    _, st, _ = linear
    calls = []

    class Recording(ModelLoader):
        def warmup(self, model, config, cancel_event=None):
            model.register_forward_hook(lambda m, i, o: calls.append(i[0].dtype))
            return super().warmup(model, config, cancel_event)

    model = Recording().load_from_config(lin_cfg(st, dtype=dtype, warmup=True, warmup_input_shape=[2, 6]))
    assert model.weight.dtype == getattr(torch, dtype)
    assert calls == [getattr(torch, dtype)] * 2


def test_cancel_before_start_and_during_warmup(linear):
    _, st, _ = linear
    ev = threading.Event()
    ev.set()
    with pytest.raises(LoadCancelled, match="before it started"):
        ModelLoader().load_from_config(lin_cfg(st), cancel_event=ev)

    ev = threading.Event()
    passes = []

    class CancelOnFirstPass(ModelLoader):
        def warmup(self, model, config, cancel_event=None):
            def hook(m, i, o):
                passes.append(1)
                ev.set()  # cancelled while the first pass runs

            model.register_forward_hook(hook)
            return super().warmup(model, config, cancel_event)

    with pytest.raises(LoadCancelled, match=r"during warmup \(pass 2/5\)"):
        CancelOnFirstPass().load_from_config(lin_cfg(st, warmup=True, warmup_steps=5, warmup_input_shape=[1, 6]), cancel_event=ev)
    assert passes == [1]


# -- huggingface and split paths -------------------------------------------------------------
def test_huggingface_causal_lm_and_base_model():
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel, GPT2Model

    tiny = tiny_model_dir("gpt2")
    model = ModelLoader().load_from_config(ModelConfig("hf", "huggingface", tiny, warmup=True))
    assert isinstance(model, GPT2LMHeadModel) and not model.training
    saved = load_file(str(Path(tiny) / "model.safetensors"))
    name = next(k for k in saved if k.endswith("h.0.attn.c_attn.weight"))
    assert torch.equal(dict(model.named_parameters())["transformer.h.0.attn.c_attn.weight"], saved[name])
    base = ModelLoader().load_from_config(ModelConfig("hf", "huggingface", tiny, auto_class="model"))
    assert isinstance(base, GPT2Model)


def test_huggingface_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text((tiny_model_dir("gpt2") / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="cannot load Hugging Face model"):
        ModelLoader().load_from_config(ModelConfig("hf", "huggingface", tmp_path))


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gemma"])
@pytest.mark.parametrize("component", ["bottom", "trunk", "top"])
def test_split_part_loads_and_warms_up(family, component):
    tiny = tiny_model_dir(family)
    model = ModelLoader().load_from_config(
        ModelConfig(f"{family}-{component}", family, tiny, component=component, split_points=[1, 3], warmup=True)
    )
    assert type(model).__name__.lower() == f"{family}{component}model"
    assert not model.training
    assert (model.start_layer, model.end_layer)[0 if component != "bottom" else 1] == {"bottom": 1, "trunk": 1, "top": 3}[component]


def test_split_part_matches_factory_output():
    from splitlearn import ModelFactory

    tiny = tiny_model_dir("qwen2")
    ours = ModelLoader().load_from_config(ModelConfig("t", "qwen2", tiny, component="trunk", split_points=[2, 4]))
    _, trunk, _ = ModelFactory.create_split_models("qwen2", str(tiny), 2, 4)
    a, b = ours.state_dict(), trunk.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_split_points_beyond_the_model_are_a_split_error():
    tiny = tiny_model_dir("gpt2")  # 5 layers
    with pytest.raises(InvalidSplitPoints):
        ModelLoader().load_from_config(ModelConfig("x", "gpt2", tiny, component="top", split_points=[2, 9]))


# -- memory estimate -------------------------------------------------------------------------
def test_memory_estimate(linear):
    lin, st, _ = linear
    loader = ModelLoader()
    assert loader.estimate_memory(lin_cfg(st)) == 2 * st.stat().st_size
    assert loader.estimate_memory(lin_cfg(st, memory_estimate_bytes=123)) == 123
    tiny = tiny_model_dir("gpt2", sharded=True)
    size = sum(f.stat().st_size for f in tiny.glob("*.safetensors"))
    assert loader.estimate_memory(ModelConfig("x", "huggingface", tiny)) == 2 * size
    assert param_bytes(lin) == (18 + 3) * 4


def test_pytorch_estimate_counts_the_weights_in_the_dtype_they_are_converted_to(tmp_path):
    """estimate_memory's contract for whole-model loads: with a dtype, the weights count at the
    larger of their size on disk and their converted size. A float32 state dict loaded as
    float64 holds twice its file's tensor bytes."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    st = tmp_path / "lin64.safetensors"
    save_file(lin.state_dict(), str(st))
    tensor_bytes = sum(t.numel() * t.element_size() for t in lin.state_dict().values())
    cfg = ModelConfig("x", "pytorch", str(st), model_class="torch.nn:Linear",
                      model_kwargs={"in_features": 64, "out_features": 64})
    loader = ModelLoader()
    assert loader.estimate_memory(cfg) == 2 * st.stat().st_size  # unchanged without a dtype
    cfg.dtype = "float64"
    assert loader.estimate_memory(cfg) == 2 * (2 * tensor_bytes)
    cfg.dtype = "bfloat16"  # narrowing: the file as read is the larger figure
    assert loader.estimate_memory(cfg) == 2 * st.stat().st_size


def test_pytorch_estimate_without_a_dtype_counts_the_weights_at_the_modules_dtype(tmp_path):
    """Without a dtype the module is built in torch's default dtype (float32) and the file's
    tensors are copied into it: a float16 state dict fills parameters twice its size. The
    estimate counts that (it counted the file's float16 bytes), and the load confirms it."""
    torch.manual_seed(0)
    half = {k: v.half() for k, v in torch.nn.Linear(64, 64).state_dict().items()}
    st = tmp_path / "lin64-f16.safetensors"
    save_file(half, str(st))
    cfg = ModelConfig("x", "pytorch", str(st), model_class="torch.nn:Linear",
                      model_kwargs={"in_features": 64, "out_features": 64})
    model = ModelLoader().load_from_config(cfg)
    held = _state_bytes(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert held == 2 * sum(t.numel() * t.element_size() for t in half.values())
    assert ModelLoader().estimate_memory(cfg) == 2 * held  # FULL_LOAD_PEAK_FACTOR x what it holds


def _state_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.mark.parametrize("component", ["bottom", "trunk", "top"])
def test_incremental_estimate_counts_only_the_parts_tensors(component):
    from splitlearn import ModelFactory
    from splitlearn.model_loader import INCREMENTAL_PEAK_FACTOR

    tiny = tiny_model_dir("gpt2", sharded=True)
    cfg = ModelConfig("x", "gpt2", tiny, component=component, split_points=[2, 4], low_memory=True)
    estimate = ModelLoader().estimate_memory(cfg)
    parts = ModelFactory.create_split_models("gpt2", str(tiny), 2, 4, parts=(component,), low_memory=True)
    part = dict(zip(("bottom", "trunk", "top"), parts, strict=True))[component]
    part_bytes = _state_bytes(part)  # what the part holds, measured on the built module
    assert part_bytes <= estimate <= INCREMENTAL_PEAK_FACTOR * part_bytes
    whole = sum(f.stat().st_size for f in tiny.glob("*.safetensors"))
    assert estimate < whole  # a part of a 5-layer model, not the whole checkpoint (let alone 2x)
    # low_memory=None picks the incremental path for a sharded checkpoint, as the factory does
    cfg.low_memory = None
    assert ModelLoader().estimate_memory(cfg) == estimate


def test_incremental_estimate_with_a_dtype_conversion():
    import torch

    from splitlearn import ModelFactory
    from splitlearn.model_loader import INCREMENTAL_PEAK_FACTOR

    tiny = tiny_model_dir("gpt2", sharded=True)
    cfg = ModelConfig("x", "gpt2", tiny, component="trunk", split_points=[2, 4], low_memory=True, dtype="bfloat16")
    _, trunk, _ = ModelFactory.create_split_models("gpt2", str(tiny), 2, 4, parts=("trunk",), dtype=torch.bfloat16)
    held = _state_bytes(trunk)
    largest_source = 2 * max(t.numel() * t.element_size() for t in trunk.state_dict().values())  # fp32 on disk
    assert ModelLoader().estimate_memory(cfg) == int(INCREMENTAL_PEAK_FACTOR * (held + largest_source))


def test_traditional_split_estimate_is_the_whole_checkpoint():
    tiny = tiny_model_dir("gpt2", sharded=True)
    whole = sum(f.stat().st_size for f in tiny.glob("*.safetensors"))
    cfg = ModelConfig("x", "gpt2", tiny, component="trunk", split_points=[2, 4], low_memory=False)
    assert ModelLoader().estimate_memory(cfg) == 2 * whole
    single = tiny_model_dir("gpt2")  # not sharded: low_memory=None is the traditional path
    cfg = ModelConfig("x", "gpt2", single, component="trunk", split_points=[2, 4])
    assert ModelLoader().estimate_memory(cfg) == 2 * (single / "model.safetensors").stat().st_size


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single"])
def test_estimate_counts_only_the_format_that_is_loaded(tmp_path, sharded):
    """A pytorch_model.bin beside the safetensors checkpoint is never read (the split paths read
    safetensors only; from_pretrained prefers safetensors): it must not change any estimate."""
    import shutil

    from safetensors.torch import load_file

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir("gpt2", sharded=sharded), model_dir)
    configs = [
        ModelConfig("hf", "huggingface", model_dir),
        ModelConfig("inc", "gpt2", model_dir, component="trunk", split_points=[2, 4], low_memory=True),
        ModelConfig("trad", "gpt2", model_dir, component="trunk", split_points=[2, 4], low_memory=False),
        ModelConfig("dflt", "gpt2", model_dir, component="top", split_points=[2, 4]),
    ]
    loader = ModelLoader()
    before = [loader.estimate_memory(c) for c in configs]
    full = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        full.update(load_file(str(f)))
    torch.save(full, str(model_dir / "pytorch_model.bin"))
    assert [loader.estimate_memory(c) for c in configs] == before
    safetensors_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    assert before[0] == 2 * safetensors_bytes


def test_huggingface_estimate_of_a_bin_only_checkpoint(tmp_path):
    model_dir = tmp_path / "bin"
    model_dir.mkdir()
    (model_dir / "config.json").write_text((tiny_model_dir("gpt2") / "config.json").read_text())
    torch.save({"w": torch.zeros(100)}, str(model_dir / "pytorch_model.bin"))
    (model_dir / "notes.pt").write_bytes(b"x" * 10_000)  # not a name from_pretrained reads
    size = (model_dir / "pytorch_model.bin").stat().st_size
    assert ModelLoader().estimate_memory(ModelConfig("hf", "huggingface", model_dir)) == 2 * size


def test_estimate_of_a_checkpoint_the_load_will_reject_stays_conservative(tmp_path):
    """Split points beyond the model: the part cannot be planned; the whole checkpoint is counted
    (the load itself reports InvalidSplitPoints)."""
    tiny = tiny_model_dir("gpt2", sharded=True)
    whole = sum(f.stat().st_size for f in tiny.glob("*.safetensors"))
    cfg = ModelConfig("x", "gpt2", tiny, component="trunk", split_points=[2, 9], low_memory=True)
    assert ModelLoader().estimate_memory(cfg) == 2 * whole


# -- threads ---------------------------------------------------------------------------------
def test_configure_threads_sets_and_reports():
    before = torch.get_num_threads()
    try:
        out = configure_threads(1)
        assert out["previous_num_threads"] == before and out["num_threads"] == 1 == torch.get_num_threads()
        with pytest.raises(ConfigError):
            configure_threads(0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("main_work", ["none", "reduction", "matmul", "query"])
def test_thread_setting_reaches_loader_and_later_threads(main_work):
    """configure_threads in a loading thread: that thread and threads that start torch work
    later run with the new count (the documented process-wide effect). What a thread that
    already ran torch work sees is recorded, not asserted: it varies (see the module docs).
    Fresh interpreter: leaves this one alone."""
    code = textwrap.dedent(
        f"""
        import json, threading, torch
        from splitlearn.model_loader import configure_threads
        torch.set_num_threads(3)
        work = {main_work!r}
        if work == "reduction":
            torch.ones(8).sum()
        elif work == "matmul":
            torch.randn(64, 64) @ torch.randn(64, 64)
        elif work == "query":
            torch.get_num_threads()
        seen = {{}}
        def loader():
            seen["report"] = configure_threads(1)
            seen["loader"] = torch.get_num_threads()
        t = threading.Thread(target=loader); t.start(); t.join()
        def later():
            seen["later"] = torch.get_num_threads()
        t = threading.Thread(target=later); t.start(); t.join()
        seen["main"] = torch.get_num_threads()
        print(json.dumps(seen))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["loader"] == 1 and seen["later"] == 1, seen
    assert seen["report"]["num_threads"] == 1
    assert seen["main"] in (1, 3), seen
    print(f"main thread after a loader set 1 (main ran {main_work}): {seen['main']}")


# -- huggingface path: every failure is a ModelLoadError ---------------------------------------
def _hf_copy(tmp_path):
    import shutil

    dst = tmp_path / "hf"
    shutil.copytree(tiny_model_dir("gpt2"), dst)
    return dst


def test_huggingface_truncated_safetensors_is_a_load_error(tmp_path):
    from safetensors import SafetensorError

    model_dir = _hf_copy(tmp_path)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"cannot load Hugging Face model .*SafetensorError") as ei:
        ModelLoader().load_from_config(ModelConfig("hf", "huggingface", model_dir))
    assert isinstance(ei.value.__cause__, SafetensorError)


def test_huggingface_unpicklable_bin_is_a_load_error(tmp_path):
    model_dir = tmp_path / "bin"
    model_dir.mkdir()
    (model_dir / "config.json").write_text((tiny_model_dir("gpt2") / "config.json").read_text())
    (model_dir / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(ModelLoadError, match=r"cannot load Hugging Face model .*UnpicklingError") as ei:
        ModelLoader().load_from_config(ModelConfig("hf", "huggingface", model_dir))
    assert isinstance(ei.value.__cause__, pickle.UnpicklingError)


def test_huggingface_weights_that_do_not_fit_the_config_are_a_load_error(tmp_path):
    model_dir = _hf_copy(tmp_path)
    cfg_path = model_dir / "config.json"
    hf_cfg = json.loads(cfg_path.read_text())
    hf_cfg["n_positions"] = 2 * hf_cfg["n_positions"]  # wpe no longer fits the checkpoint's
    cfg_path.write_text(json.dumps(hf_cfg))
    with pytest.raises(ModelLoadError, match="cannot load Hugging Face model") as ei:
        ModelLoader().load_from_config(ModelConfig("hf", "huggingface", model_dir))
    assert ei.value.__cause__ is not None
