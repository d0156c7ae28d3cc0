"""Greedy decoding through a split model, with a KV cache in every part.

``greedy_generate`` reproduces ``model.generate(..., do_sample=False)`` of the full model: the
prompt goes through bottom -> trunk -> top once (prefill), then one token at a time, each part
reusing its own cache. Position ids follow ``generate``: from the padding mask at prefill
(running count of kept tokens minus one), then the last position plus one per new token.

The trunk hook
--------------
``trunk_fn(hidden_states, attention_mask, position_ids, step) -> hidden_states`` replaces the
local trunk call (e.g. with a call to a remote trunk server). ``step`` is 0 for the prefill, in
which ``hidden_states`` covers the whole prompt and ``attention_mask`` is the prompt's padding
mask; for step k >= 1 ``hidden_states`` is ``[batch, 1, hidden]`` and ``attention_mask`` covers
the prompt plus the k tokens generated so far. The hook owns the trunk's cache: step 0 starts a
new sequence (drop any earlier cache), later steps extend it. It may return a tensor or anything
with a ``hidden_states`` attribute (a SplitOutput).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

TrunkFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], Any]


def _hidden(value: Any) -> torch.Tensor:
    return value.hidden_states if hasattr(value, "hidden_states") else value


@torch.no_grad()
def greedy_generate(
    bottom: torch.nn.Module,
    trunk: torch.nn.Module | None,
    top: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    trunk_fn: TrunkFn | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Return ``input_ids`` followed by ``max_new_tokens`` greedily chosen tokens ``[batch, prompt+new]``.

    With ``eos_token_id``, a row that produced it is padded with ``pad_token_id`` (default: the
    eos id) from then on, and decoding stops once every row has finished (as ``generate`` does).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if trunk is None and trunk_fn is None:
        raise ValueError("greedy_generate needs a trunk module or a trunk_fn")
    batch = input_ids.shape[0]
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)

    caches: dict[str, Any] = {"bottom": None, "trunk": None, "top": None}
    sequences = input_ids
    step_ids = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    fill = eos_token_id if pad_token_id is None else pad_token_id

    for step in range(max_new_tokens):
        out = bottom(step_ids, attention_mask, position_ids, caches["bottom"], True)
        caches["bottom"] = out.past_key_values
        hidden = out.hidden_states
        if trunk_fn is not None:
            hidden = _hidden(trunk_fn(hidden, attention_mask, position_ids, step))
        else:
            out = trunk(hidden, attention_mask, position_ids, caches["trunk"], True)
            caches["trunk"] = out.past_key_values
            hidden = out.hidden_states
        out = top(hidden, attention_mask, position_ids, caches["top"], True)
        caches["top"] = out.past_key_values
        next_tokens = out.logits[:, -1, :].argmax(dim=-1)
        if eos_token_id is not None:
            next_tokens = torch.where(finished, torch.full_like(next_tokens, fill), next_tokens)
            finished = finished | (next_tokens == eos_token_id)
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
        if eos_token_id is not None and bool(finished.all()):
            break
        step_ids = next_tokens[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=-1)
        position_ids = position_ids[:, -1:] + 1
    return sequences


__all__ = ["greedy_generate"]
