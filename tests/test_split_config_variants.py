"""Config features that depend on a layer's global index or type survive the split:
GPT-2's inverse-layer-index attention scaling, and Qwen2's sliding-window layers (each part
builds the sliding-window mask for its own sliding layers and keeps a sliding cache for them)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from fixtures.reference import mask_positions, padded_batch  # noqa: E402
from splitlearn.generate import greedy_generate  # noqa: E402
from splitlearn.models.registry import ModelRegistry  # noqa: E402


def build(family, config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    full = AutoModelForCausalLM.from_config(config).eval()
    state = full.state_dict()
    b, t, p = ModelRegistry.get_part_classes(family)
    n = config.num_hidden_layers
    return full, (
        b.from_pretrained_split(state, full.config, 0, 1),
        t.from_pretrained_split(state, full.config, 1, n - 1),
        p.from_pretrained_split(state, full.config, n - 1),
    )


def check(full, parts, length=12):
    ids, mask = padded_batch(5, 2, length, [4, 0], "left", full.config.vocab_size)
    with torch.no_grad():
        ref = full(ids, attention_mask=mask, position_ids=mask_positions(mask)).logits
        out = parts[0](ids, mask)
        out = parts[1](out.hidden_states, mask)
        logits = parts[2](out.hidden_states, mask).logits
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], ref[keep], atol=1e-5, rtol=0)
    full.generation_config.eos_token_id = None
    expected = full.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy_generate(*parts, ids, 6, attention_mask=mask), expected)


def test_gpt2_inverse_layer_scaling_uses_global_index():
    from transformers import GPT2Config

    config = GPT2Config(
        vocab_size=128,
        n_positions=64,
        n_embd=32,
        n_layer=4,
        n_head=2,
        scale_attn_by_inverse_layer_idx=True,
        initializer_range=0.2,
    )
    full, parts = build("gpt2", config)
    assert parts[1].layers[0].attn.scaling == pytest.approx(full.transformer.h[1].attn.scaling)
    assert parts[1].layers[0].attn.layer_idx == 0  # the cache index is local
    check(full, parts)


def test_qwen2_sliding_window_layers():
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
        initializer_range=0.2,
    )
    assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types
    full, parts = build("qwen2", config)
    assert parts[1]._layer_types == config.layer_types[1:3]
    check(full, parts, length=12)  # longer than the window
