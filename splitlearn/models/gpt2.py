"""GPT-2 split into bottom / trunk / top on transformers' ``GPT2Block``.

Bottom: token embedding ``wte`` + learned positions ``wpe`` + blocks ``[0, s1)``.
Trunk: blocks ``[s1, s2)``. Top: blocks ``[s2, n)`` + ``ln_f`` + ``lm_head`` (tied to ``wte`` in
the checkpoint: safetensors drops ``lm_head.weight`` on save, so it is read from ``transformer.wte``).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from splitlearn.models.base import BottomPart, SplitPart, TopPart, TrunkPart


class _GPT2Part(SplitPart):
    family = "gpt2"
    base_prefix = "transformer."
    layers_name = "h"
    embed_name = "wte"

    def _make_layer(self, config: Any, layer_index: int) -> nn.Module:
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 split parts do not support cross-attention configs")
        return GPT2Block(config, layer_idx=layer_index)

    def _set_cache_index(self, layer: nn.Module, local_index: int) -> None:
        # the attention scaling was fixed at construction with the global index; the cache index is local
        layer.attn.layer_idx = local_index

    def _call_layer(self, layer, hidden, mask, position_ids, cache, use_cache, extra):
        return layer(hidden, cache, mask, use_cache=use_cache, position_ids=position_ids)


class GPT2BottomModel(_GPT2Part, BottomPart):
    def _build_extra(self, config: Any) -> None:
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.drop = nn.Dropout(config.embd_pdrop)

    def _embed(self, input_ids, position_ids):
        inputs_embeds = self.wte(input_ids)
        hidden = inputs_embeds + self.wpe(position_ids).to(inputs_embeds.device)
        return self.drop(hidden)


class GPT2TrunkModel(_GPT2Part, TrunkPart):
    pass


class GPT2TopModel(_GPT2Part, TopPart):
    def _build_extra(self, config: Any) -> None:
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def _head(self, hidden):
        hidden = self.ln_f(hidden)
        return hidden, self.lm_head(hidden)


PART_CLASSES = {"bottom": GPT2BottomModel, "trunk": GPT2TrunkModel, "top": GPT2TopModel}

__all__ = ["GPT2BottomModel", "GPT2TrunkModel", "GPT2TopModel", "PART_CLASSES"]
