"""The parts of one factory call never share storage, on every path and dtype: a checkpoint with
tied embeddings gives the bottom's embedding and the top's LM head equal values in storage of
their own, so a training step on the bottom leaves the top alone, and the parts still compose to
the full model exactly. The one copy this costs is the top's LM head, and on the low-memory path
nothing else leaves the memory map of the checkpoint."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from fixtures.models import TINY_SHARD_SIZE, build_model_dir, tiny_config, tiny_model_dir  # noqa: E402
from splitlearn import ModelFactory  # noqa: E402

SPLITS = {"gpt2": (2, 4), "qwen2": (1, 4), "gemma": (1, 3)}
# gpt2 and gemma tie their embeddings; the tiny qwen2 does not, qwen2-tied is the same with the tie
LABELS = ["gpt2", "gemma", "qwen2-tied", "qwen2"]
PATHS = pytest.mark.parametrize("low_memory", [False, True], ids=["traditional", "incremental"])
DTYPES = pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["checkpoint-dtype", "bf16"])


def family_of(label: str) -> str:
    return label.split("-")[0]


def model_dir(label: str) -> Path:
    if label == "qwen2-tied":
        config = {**tiny_config("qwen2"), "tie_word_embeddings": True}
        return build_model_dir("qwen2", config, max_shard_size=TINY_SHARD_SIZE, name="qwen2-tied")
    return tiny_model_dir(label, sharded=True)


@functools.cache
def full_model(label: str, dtype):
    from transformers import AutoModelForCausalLM

    path = model_dir(label)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto", local_files_only=True)
    return model.eval()


def build(label: str, low_memory: bool, dtype, parts=("bottom", "trunk", "top")):
    family = family_of(label)
    return ModelFactory.create_split_models(
        family, model_dir(label), *SPLITS[family], low_memory=low_memory, dtype=dtype, parts=parts
    )


def storage_spans(part):
    """(name, device, first byte, byte after the last) of the storage under every tensor of ``part``."""
    named = list(part.named_parameters(remove_duplicate=False)) + list(part.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        storage = tensor.untyped_storage()
        yield name, str(tensor.device), storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def shared_between_parts(parts):
    spans = [(part.part, *span) for part in parts for span in storage_spans(part)]
    return [
        (pa, na, pb, nb)
        for i, (pa, na, da, sa, ea) in enumerate(spans)
        for pb, nb, db, sb, eb in spans[i + 1 :]
        if pa != pb and da == db and sa < eb and sb < ea
    ]


def embedding(bottom):
    return bottom.wte.weight if bottom.family == "gpt2" else bottom.embed_tokens.weight


@pytest.mark.parametrize("label", LABELS)
@PATHS
@DTYPES
def test_parts_share_no_storage_and_still_compose_exactly(label, low_memory, dtype):
    bottom, trunk, top = parts = build(label, low_memory, dtype)
    assert shared_between_parts(parts) == []

    # the values are still the checkpoint's: the bottom's embedding and the top's head equal the
    # full model's tensors (the same tensor in the full model when tied)
    full = full_model(label, dtype)
    full_tensors = dict(full.named_parameters(remove_duplicate=False))
    for part in parts:
        for name, tensor in part.named_parameters():
            want = full_tensors[part.checkpoint_key(name)]
            assert tensor.dtype == want.dtype and torch.equal(tensor, want), f"{part.part} {name}"
    tied = full.config.tie_word_embeddings
    assert torch.equal(embedding(bottom), top.lm_head.weight) == tied

    ids = torch.randint(3, full.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = top(trunk(bottom(ids).hidden_states).hidden_states).logits
        ref = full(ids).logits
    assert torch.equal(logits, ref), (logits.float() - ref.float()).abs().max().item()

    # at most one copy, and only of the tied head: nothing else was duplicated
    info = ModelFactory.last_load_info()["own_copies"]
    assert info["bottom"] == info["trunk"] == []
    if tied:
        assert info["top"] in ([], ["lm_head.weight"])
    else:
        assert info["top"] == []
    assert [p.load_info["own_copies"] for p in parts] == [info["bottom"], info["trunk"], info["top"]]


@pytest.mark.parametrize("label", ["gpt2", "gemma", "qwen2-tied"])
@PATHS
@DTYPES
def test_a_training_step_on_the_bottom_leaves_the_top_alone(label, low_memory, dtype):
    bottom, trunk, top = build(label, low_memory, dtype)
    head = top.lm_head.weight.detach().clone()
    emb = embedding(bottom).detach().clone()
    bottom.train()
    optimizer = torch.optim.SGD(bottom.parameters(), lr=0.5)
    bottom(torch.tensor([[5, 6, 7, 8]])).hidden_states.float().pow(2).sum().backward()
    optimizer.step()
    assert not torch.equal(embedding(bottom).detach(), emb)  # the step did change the bottom
    assert torch.equal(top.lm_head.weight.detach(), head)
    assert top.lm_head.weight.requires_grad and isinstance(top.lm_head.weight, torch.nn.Parameter)


def file_mappings():
    """(start, end, path) of this process's file-backed memory mappings."""
    out = []
    with open("/proc/self/maps", encoding="utf-8") as fh:
        for line in fh:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                out.append((lo, hi, fields[5].strip()))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("label", ["gpt2", "gemma", "qwen2-tied"])
def test_low_memory_path_materialises_only_the_heads_copy(label):
    """Read without conversion, the incremental path leaves the weights in the memory map of the
    checkpoint's files; giving the top its own head copies that one tensor and nothing else."""
    directory = model_dir(label)
    parts = build(label, low_memory=True, dtype=None)
    maps = file_mappings()

    def backing_file(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        return next((Path(path) for lo, hi, path in maps if lo <= ptr < hi), None)

    in_memory = []
    for part in parts:
        for name, tensor in part.named_parameters():
            where = backing_file(tensor)
            if where is None or where.parent != directory or where.suffix != ".safetensors":
                in_memory.append(f"{part.part}.{name}")
    assert in_memory == ["top.lm_head.weight"]


@PATHS
@DTYPES
def test_a_part_built_alone_copies_nothing(low_memory, dtype):
    _, _, top = build("gemma", low_memory, dtype, parts=("top",))
    assert top.load_info["own_copies"] == []
    bottom, _, top = build("gemma", low_memory, dtype, parts=("bottom", "top"))
    assert shared_between_parts([bottom, top]) == []


@PATHS
def test_the_copy_goes_to_the_later_part_whatever_order_the_parts_are_asked_in(low_memory):
    """The storage policy unties in bottom, trunk, top order: asked for ("top", "bottom"), the
    top still gets the copy and the bottom keeps the checkpoint's embedding."""
    bottom, _, top = build("gpt2", low_memory, None, parts=("top", "bottom"))
    assert shared_between_parts([bottom, top]) == []
    assert bottom.load_info["own_copies"] == []
    assert top.load_info["own_copies"] == ["lm_head.weight"]
    assert ModelFactory.last_load_info()["own_copies"] == {"bottom": [], "top": ["lm_head.weight"]}
