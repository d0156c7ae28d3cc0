"""top(trunk(bottom(x))) equals the full transformers model, and greedy decoding through the
split (KV caches in every part) equals the full model's ``generate``, for every family, any
valid split points, batch sizes, lengths and padding."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fixtures.models import TINY_CONFIGS  # noqa: E402
from fixtures.reference import full_model, mask_positions, padded_batch, split_parts  # noqa: E402
from splitlearn.generate import greedy_generate  # noqa: E402

FAMILIES = ["gpt2", "qwen2", "gemma"]
ATOL = 1e-5
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def n_layers(family: str) -> int:
    cfg = TINY_CONFIGS[family]
    return cfg.get("n_layer", cfg.get("num_hidden_layers"))


@st.composite
def split_case(draw, family: str, max_len: int = 9):
    n = n_layers(family)
    s1 = draw(st.integers(1, n - 2))
    s2 = draw(st.integers(s1 + 1, n - 1))
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, max_len))
    side = draw(st.sampled_from(["left", "right"]))
    pads = [draw(st.integers(0, length - 1)) for _ in range(batch)]
    seed = draw(st.integers(0, 2**16))
    return s1, s2, batch, length, side, pads, seed


@pytest.mark.parametrize("family", FAMILIES)
def test_split_logits_match_full_model(family):
    full = full_model(family)
    vocab = full.config.vocab_size

    @SETTINGS
    @given(case=split_case(family))
    def check(case):
        s1, s2, batch, length, side, pads, seed = case
        ids, mask = padded_batch(seed, batch, length, pads, side, vocab)
        bottom, trunk, top = split_parts(family, s1, s2)
        with torch.no_grad():
            ref = full(ids, attention_mask=mask, position_ids=mask_positions(mask)).logits
            out = bottom(ids, attention_mask=mask)  # positions derived from the mask by the part
            out = trunk(out.hidden_states, out.attention_mask, out.position_ids)
            out = top(out.hidden_states, out.attention_mask, out.position_ids)
        keep = mask.bool()
        assert out.logits.shape == ref.shape
        assert torch.isfinite(out.logits[keep]).all()
        torch.testing.assert_close(out.logits[keep], ref[keep], atol=ATOL, rtol=0)

    check()


@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_input_without_mask_matches(family):
    full = full_model(family)
    n = n_layers(family)
    bottom, trunk, top = split_parts(family, 1, n - 1)
    ids = torch.randint(3, full.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = full(ids).logits
        logits = top(trunk(bottom(ids).hidden_states).hidden_states).logits
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_generate(family):
    full = full_model(family)
    vocab = full.config.vocab_size

    @settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case=split_case(family, max_len=7), new_tokens=st.integers(1, 6))
    def check(case, new_tokens):
        s1, s2, batch, length, _, pads, seed = case
        ids, mask = padded_batch(seed, batch, length, pads, "left", vocab)
        bottom, trunk, top = split_parts(family, s1, s2)
        expected = full.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=0,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        got = greedy_generate(bottom, trunk, top, ids, new_tokens, attention_mask=mask)
        assert got.shape == (batch, length + new_tokens)
        assert torch.equal(got, expected), f"split {got[:, length:].tolist()} vs full {expected[:, length:].tolist()}"

    full.generation_config.eos_token_id = None  # compare all N tokens, no early stop
    check()


def test_perturbed_trunk_is_detected():
    """Negative control: the comparison above can fail."""
    full = full_model("qwen2")
    bottom, trunk, top = split_parts("qwen2", 2, 4)
    ids = torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = full(ids).logits
        saved = trunk.layers[0].mlp.down_proj.weight.clone()
        try:
            trunk.layers[0].mlp.down_proj.weight.add_(1e-2)
            logits = top(trunk(bottom(ids).hidden_states).hidden_states).logits
        finally:
            trunk.layers[0].mlp.down_proj.weight.copy_(saved)
    assert (logits - ref).abs().max() > ATOL


def test_gemma_embedding_is_scaled_in_hidden_dtype():
    bottom, _, _ = split_parts("gemma", 1, 2)
    emb = bottom.embed_tokens
    ids = torch.tensor([[5, 6]])
    expected = emb.weight[ids] * torch.tensor(64**0.5, dtype=emb.weight.dtype)
    torch.testing.assert_close(emb(ids), expected, atol=0, rtol=0)
    assert bottom.embed_tokens.embed_scale.item() == pytest.approx(8.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_pass_the_cache_under_transformers_own_name(family):
    """transformers renamed the KV-cache argument of its mask builders and decoder layers
    (``past_key_values`` -> ``cache``; the old name warns, and is announced to go in 5.40): the
    parts pass it under whichever name the installed release takes, so no such warning."""
    import warnings

    full = full_model(family)
    ids, mask = padded_batch(0, 2, 5, [0, 2], "left", full.config.vocab_size)
    bottom, trunk, top = split_parts(family, 1, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        greedy_generate(bottom, trunk, top, ids, 3, attention_mask=mask)
    assert [str(w.message) for w in caught if "past_key_values" in str(w.message)] == []
