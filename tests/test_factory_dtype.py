"""Parts built with a ``dtype`` hold exactly what transformers' ``from_pretrained(dtype=...)``
holds: the same parameters and the same buffers, non-persistent ones included (the rotary
``inv_freq`` stays float32 as transformers keeps it; Gemma's embedding scale is in the weights'
dtype), on both factory paths; and the composed parts give the full model's logits bit for bit
on a long input, where a rounded ``inv_freq`` shows as a phase error that grows with position."""

from __future__ import annotations

import functools
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from fixtures.models import TINY_CONFIGS, tiny_model_dir  # noqa: E402
from splitlearn import ModelFactory  # noqa: E402

SPLITS = {"gpt2": (2, 4), "qwen2": (1, 4), "gemma": (1, 3)}
FAMILIES = ["gpt2", "qwen2", "gemma"]


@functools.cache
def full_model_in(family: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(family, sharded=True)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True).eval()


def longest_input(family: str) -> int:
    cfg = TINY_CONFIGS[family]
    return min(200, cfg.get("n_positions", cfg.get("max_position_embeddings")) - 8)


def build(family: str, low_memory: bool, dtype: torch.dtype):
    path = tiny_model_dir(family, sharded=True)
    return ModelFactory.create_split_models(family, path, *SPLITS[family], low_memory=low_memory, dtype=dtype)


DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])


@DTYPES
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("low_memory", [False, True], ids=["traditional", "incremental"])
def test_parts_hold_the_full_models_buffers_and_parameters(family, low_memory, dtype):
    full = full_model_in(family, dtype)
    full_tensors = dict(full.named_parameters(remove_duplicate=False))
    full_tensors.update(full.named_buffers(remove_duplicate=False))
    full_buffers = {name for name, _ in full.named_buffers()}
    covered = set()
    for part in build(family, low_memory, dtype):
        for kind, named in (("buffer", part.named_buffers()), ("parameter", part.named_parameters())):
            for local, tensor in named:
                key = part.checkpoint_key(local)
                assert key in full_tensors, f"{part.part} {kind} {local}: no {key} in the full model"
                want = full_tensors[key]
                assert tensor.dtype == want.dtype, f"{part.part} {kind} {local}: {tensor.dtype} vs full {want.dtype}"
                assert torch.equal(tensor, want), f"{part.part} {kind} {local} differs from the full model's {key}"
                covered.add(key)
    # every buffer of the full model is held (and so checked) by some part: none forgotten
    assert full_buffers <= covered, sorted(full_buffers - covered)
    if family != "gpt2":
        assert any(name.endswith("rotary_emb.inv_freq") for name in full_buffers)


@DTYPES
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("low_memory", [False, True], ids=["traditional", "incremental"])
def test_split_logits_equal_full_model_on_a_long_input(family, low_memory, dtype):
    """Exact equality: the parts run the same kernels in the same dtype on the same tensors as
    the full model (cos/sin computed in float32 from the same float32 inv_freq, then cast)."""
    full = full_model_in(family, dtype)
    bottom, trunk, top = build(family, low_memory, dtype)
    length = longest_input(family)
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(3, full.config.vocab_size, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # left padding in the second row
    ids[1, :37] = 0
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        ref = full(ids, attention_mask=mask, position_ids=positions).logits
        out = bottom(ids, attention_mask=mask)
        out = trunk(out.hidden_states, out.attention_mask, out.position_ids)
        out = top(out.hidden_states, out.attention_mask, out.position_ids)
    assert out.logits.dtype == ref.dtype == dtype
    keep = mask.bool()
    diff = (out.logits[keep].float() - ref[keep].float()).abs().max().item()
    assert torch.equal(out.logits[keep], ref[keep]), f"max |split - full| = {diff}"
