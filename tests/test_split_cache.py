"""Each part keeps its own KV cache (local layer indices): feeding a sequence in chunks through
the split gives the logits of the full model on the whole sequence; the trunk hook of
greedy_generate sees the documented arguments and can replace the local trunk."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from fixtures.reference import full_model, mask_positions, padded_batch, split_parts  # noqa: E402
from splitlearn.generate import greedy_generate  # noqa: E402

ATOL = 1e-5


@pytest.mark.parametrize("family,split", [("gpt2", (2, 4)), ("qwen2", (1, 5)), ("gemma", (1, 2))])
def test_chunked_decoding_with_caches_matches_full_forward(family, split):
    full = full_model(family)
    bottom, trunk, top = split_parts(family, *split)
    ids, mask = padded_batch(7, 2, 9, [3, 0], "left", full.config.vocab_size)
    with torch.no_grad():
        ref = full(ids, attention_mask=mask, position_ids=mask_positions(mask)).logits
        caches = [None, None, None]
        chunks = []
        for lo, hi in ((0, 5), (5, 6), (6, 9)):
            m = mask[:, :hi]
            out = bottom(ids[:, lo:hi], m, None, caches[0], True)
            caches[0] = out.past_key_values
            out = trunk(out.hidden_states, m, out.position_ids, caches[1], True)
            caches[1] = out.past_key_values
            out = top(out.hidden_states, m, out.position_ids, caches[2], True)
            caches[2] = out.past_key_values
            chunks.append(out.logits)
    logits = torch.cat(chunks, dim=1)
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], ref[keep], atol=ATOL, rtol=0)
    # every part's cache holds only its own layers, numbered locally, and all 9 positions
    for part, cache in zip((bottom, trunk, top), caches, strict=False):
        assert len(cache.layers) == len(part.layers)
        assert cache.get_seq_length() == 9


def test_mask_length_must_match_cache():
    bottom, _, _ = split_parts("gpt2", 1, 3)
    ids = torch.tensor([[5, 6, 7]])
    out = bottom(ids, torch.ones(1, 3, dtype=torch.long), use_cache=True)
    with pytest.raises(ValueError, match="cache holds 3"):
        bottom(torch.tensor([[8]]), torch.ones(1, 3, dtype=torch.long), None, out.past_key_values, True)


def test_trunk_hook_replaces_local_trunk():
    full = full_model("qwen2")
    bottom, trunk, top = split_parts("qwen2", 2, 4)
    ids, mask = padded_batch(11, 2, 5, [2, 0], "left", full.config.vocab_size)
    calls = []
    state = {"cache": None}

    def remote_trunk(hidden, attention_mask, position_ids, step):
        calls.append((step, tuple(hidden.shape), tuple(attention_mask.shape), position_ids.tolist()))
        if step == 0:
            state["cache"] = None
        out = trunk(hidden, attention_mask, position_ids, state["cache"], True)
        state["cache"] = out.past_key_values
        return out.hidden_states

    local = greedy_generate(bottom, trunk, top, ids, 4, attention_mask=mask)
    hooked = greedy_generate(bottom, None, top, ids, 4, attention_mask=mask, trunk_fn=remote_trunk)
    assert torch.equal(local, hooked)
    assert [c[0] for c in calls] == [0, 1, 2, 3]
    assert calls[0][1] == (2, 5, 64) and calls[0][2] == (2, 5)
    assert calls[1][1] == (2, 1, 64) and calls[1][2] == (2, 6)
    assert calls[1][3] == [[3], [5]]  # left-padded row continues from its own count


def test_trunk_hook_output_is_used():
    """A hook that returns different hidden states changes the tokens: the hook is really in the path."""
    bottom, trunk, top = split_parts("gpt2", 1, 3)
    ids = torch.tensor([[10, 20, 30, 40]])
    local = greedy_generate(bottom, trunk, top, ids, 5)
    skewed = greedy_generate(bottom, None, top, ids, 5, trunk_fn=lambda h, m, p, s: torch.zeros_like(h))
    assert not torch.equal(local, skewed)


def test_eos_stops_and_pads_like_generate():
    full = full_model("gpt2")
    bottom, trunk, top = split_parts("gpt2", 2, 3)
    ids = torch.tensor([[10, 20, 30, 40], [7, 8, 9, 10]])
    free = greedy_generate(bottom, trunk, top, ids, 6)
    eos = int(free[0, 5])  # the second token generated for row 0
    got = greedy_generate(bottom, trunk, top, ids, 6, eos_token_id=eos, pad_token_id=0)
    expected = full.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
