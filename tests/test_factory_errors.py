"""Every way a load can go wrong is a clear SplitLearnError naming what is wrong, raised before
any heavy work where possible: never a hang, never a silently wrong (half random) model."""

from __future__ import annotations

import json
import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fixtures.models import tiny_model_dir  # noqa: E402
from splitlearn import (  # noqa: E402
    ConfigMismatch,
    CorruptWeights,
    InvalidPart,
    InvalidSplitPoints,
    MissingShard,
    ModelFactory,
    ModelNotFound,
    ModelRegistry,
    SplitLearnError,
    UnknownModelType,
    load_split_model,
)

BOTH_PATHS = pytest.mark.parametrize("low_memory", [True, False], ids=["incremental", "traditional"])


def copy_model(tmp_path, family="gpt2", sharded=True):
    dst = tmp_path / f"{family}-{'sharded' if sharded else 'single'}"
    shutil.copytree(tiny_model_dir(family, sharded), dst)
    return dst


@pytest.mark.parametrize("s1,s2", [(0, 2), (2, 2), (3, 2), (1, 5), (1, 9), (-1, 2), ("1", 3), (1.0, 3), (True, 3)])
def test_invalid_split_points(s1, s2):
    with pytest.raises(InvalidSplitPoints, match=r"split_point|need 0 < split_point_1") as info:
        ModelFactory.create_split_models("gpt2", tiny_model_dir("gpt2"), s1, s2)
    assert isinstance(info.value, ValueError) and isinstance(info.value, SplitLearnError)


def test_split_points_message_names_layer_count():
    with pytest.raises(
        InvalidSplitPoints, match=r"\(2, 5\) for a model with 5 layers: need 0 < split_point_1 < split_point_2 < 5"
    ):
        ModelFactory.create_split_models("gpt2", tiny_model_dir("gpt2"), 2, 5)
    with pytest.raises(InvalidSplitPoints, match="two layer indices"):
        load_split_model("gpt2", (2,), tiny_model_dir("gpt2"))


def test_part_ranges_checked_by_part_classes():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir("gpt2"))
    with pytest.raises(InvalidSplitPoints, match="a bottom starts at 0"):
        ModelRegistry.get_model_class("gpt2", "bottom").from_pretrained_split({}, config, 1, 3)
    with pytest.raises(InvalidSplitPoints, match="a top ends at 5"):
        ModelRegistry.get_model_class("gpt2", "top").from_pretrained_split({}, config, 2, 4)


@pytest.mark.parametrize("name", ["llama", "GPT-2", "", None])
def test_unknown_family_lists_known(name):
    with pytest.raises(UnknownModelType) as info:
        ModelFactory.create_split_models(name, "/nonexistent", 1, 2)
    assert "known model types: gemma, gpt2, qwen2" in str(info.value)
    with pytest.raises(UnknownModelType, match="gemma, gpt2, qwen2"):
        ModelRegistry.get_model_class(name, "trunk")


def test_unknown_part():
    with pytest.raises(InvalidPart, match="bottom, trunk, top"):
        ModelRegistry.get_model_class("gpt2", "middle")
    with pytest.raises(InvalidPart):
        ModelFactory.create_split_models("gpt2", tiny_model_dir("gpt2"), 1, 2, parts=("head",))


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist") as info:
        ModelFactory.create_split_models("gpt2", tmp_path / "no-such-model", 1, 2)
    assert isinstance(info.value, FileNotFoundError)
    assert "no-such-model" in str(info.value)


def test_directory_without_weights(tmp_path):
    d = copy_model(tmp_path, sharded=False)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelNotFound, match="pytorch_model.bin: pickle checkpoints are not loaded"):
        ModelFactory.create_split_models("gpt2", d, 1, 2)


@BOTH_PATHS
def test_missing_shard(tmp_path, low_memory):
    d = copy_model(tmp_path)
    shards = sorted(d.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(MissingShard, match=shards[-1].name) as info:
        ModelFactory.create_split_models("gpt2", d, 1, 2, low_memory=low_memory)
    assert isinstance(info.value, FileNotFoundError)


@BOTH_PATHS
@pytest.mark.parametrize("sharded", [True, False])
def test_truncated_safetensors(tmp_path, low_memory, sharded):
    d = copy_model(tmp_path, "qwen2", sharded)
    index_path = d / "model.safetensors.index.json"
    if sharded:  # truncate the shard holding the trunk's first layer
        victim = json.loads(index_path.read_text())["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    else:
        victim = "model.safetensors"
    data = (d / victim).read_bytes()
    (d / victim).write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CorruptWeights, match=rf"{victim}.*truncated or corrupt"):
        ModelFactory.create_split_models("qwen2", d, 1, 3, low_memory=low_memory)


@BOTH_PATHS
def test_garbage_safetensors(tmp_path, low_memory):
    d = copy_model(tmp_path, "gemma", sharded=False)
    (d / "model.safetensors").write_bytes(b"\x00" * 16 + b"garbage" * 50)
    with pytest.raises(CorruptWeights, match="model.safetensors"):
        ModelFactory.create_split_models("gemma", d, 1, 2, low_memory=low_memory)


def test_corrupt_index(tmp_path):
    d = copy_model(tmp_path)
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CorruptWeights, match="model.safetensors.index.json"):
        ModelFactory.create_split_models("gpt2", d, 1, 2)


def test_index_naming_absent_tensor(tmp_path):
    d = copy_model(tmp_path)
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wm = index["weight_map"]
    key = "transformer.h.1.attn.c_attn.weight"
    other = next(f for f in sorted(set(wm.values())) if f != wm[key])
    wm[key] = other  # the index now points at a shard that does not hold the tensor
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptWeights, match=rf"{other}.*{key}"):
        ModelFactory.create_split_models("gpt2", d, 1, 3, low_memory=True)
    with pytest.raises(CorruptWeights, match=key):
        ModelFactory.create_split_models("gpt2", d, 1, 3, low_memory=False)


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


@BOTH_PATHS
def test_config_declares_more_layers_than_weights(tmp_path, low_memory):
    d = copy_model(tmp_path)
    edit_config(d, n_layer=7)
    with pytest.raises(ConfigMismatch, match=r"config declares 7 gpt2 layers but the weights hold layers 0-4"):
        ModelFactory.create_split_models("gpt2", d, 2, 6, low_memory=low_memory)


@BOTH_PATHS
def test_config_declares_fewer_layers_than_weights(tmp_path, low_memory):
    d = copy_model(tmp_path, "qwen2")
    edit_config(d, num_hidden_layers=4, layer_types=["full_attention"] * 4)
    with pytest.raises(ConfigMismatch, match=r"config declares 4 qwen2 layers but the weights hold layers 0-5"):
        ModelFactory.create_split_models("qwen2", d, 1, 2, low_memory=low_memory)


@BOTH_PATHS
def test_config_with_wrong_width(tmp_path, low_memory):
    d = copy_model(tmp_path, "gemma", sharded=True)
    edit_config(d, intermediate_size=96)
    with pytest.raises(ConfigMismatch, match=r"mlp\.gate_proj\.weight: weights \(128, 64\) vs config \(96, 64\)"):
        ModelFactory.create_split_models("gemma", d, 1, 3, low_memory=low_memory)


def test_inconsistent_config_is_reported(tmp_path):
    d = copy_model(tmp_path, "qwen2")
    edit_config(d, num_hidden_layers=4)  # layer_types still lists 6 layers
    with pytest.raises(ConfigMismatch, match=r"(?s)cannot read the config .*layer_types"):
        ModelFactory.create_split_models("qwen2", d, 1, 2)


def test_model_type_mismatch():
    with pytest.raises(ConfigMismatch, match="declares model_type 'gpt2', but 'qwen2' was requested"):
        ModelFactory.create_split_models("qwen2", tiny_model_dir("gpt2"), 1, 2)


@pytest.mark.parametrize(
    "raised,expected",
    [
        (PermissionError(13, "Permission denied"), "ModelLoadError"),
        (OSError(24, "Too many open files"), "ModelLoadError"),
        (ValueError("header too large"), "CorruptWeights"),
        (RuntimeError("Error(s) in loading state_dict: size mismatch for wte.weight"), "CorruptWeights"),
    ],
    ids=["EACCES", "EMFILE", "format", "runtime-not-allocation"],
)
def test_traditional_path_tells_unreadable_files_from_corrupt_ones(monkeypatch, raised, expected):
    """The traditional path hands the directory to transformers: a file it cannot open or read
    is a ModelLoadError with the OS error chained, not CorruptWeights (nothing is known to be
    wrong with the weights); anything else transformers raises still is CorruptWeights."""
    import transformers

    from splitlearn.errors import ModelLoadError
    from splitlearn.model_loader import ModelLoadError as FromLoader

    assert FromLoader is ModelLoadError  # one class, importable from both modules

    def refuse(*_a, **_k):
        raise raised

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises((ModelLoadError, CorruptWeights)) as info:
        ModelFactory.create_split_models("gpt2", tiny_model_dir("gpt2"), 1, 3, low_memory=False)
    assert type(info.value).__name__ == expected
    assert info.value.__cause__ is raised


# what torch 2.13's CPU allocator raised here when malloc failed (a 40 GB torch.empty under
# `ulimit -v 4000000`): a plain RuntimeError; older releases said "not enough memory"
CPU_OOM = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize("kind", ["MemoryError", "torch.OutOfMemoryError", "cpu-allocator", "cpu-allocator-old"])
def test_traditional_path_out_of_memory_is_a_load_error_not_corrupt_weights(monkeypatch, kind):
    """Running out of memory while transformers loads the full model says nothing about the
    weights: ModelLoadError with the cause chained, as the incremental path reports it. On the
    CPU torch raises a plain RuntimeError for it, told by its allocator's message."""
    import torch
    import transformers

    from splitlearn.errors import ModelLoadError

    raised = {
        "MemoryError": lambda: MemoryError("cannot allocate 1099511627776 bytes"),
        "torch.OutOfMemoryError": lambda: torch.OutOfMemoryError("cannot allocate 1099511627776 bytes"),
        "cpu-allocator": lambda: RuntimeError(CPU_OOM),
        "cpu-allocator-old": lambda: RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 bytes."),
    }[kind]()

    def refuse(*_a, **_k):
        raise raised

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(SplitLearnError) as info:
        ModelFactory.create_split_models("gpt2", tiny_model_dir("gpt2"), 1, 3, low_memory=False)
    assert type(info.value) is ModelLoadError, repr(info.value)
    assert info.value.__cause__ is raised
