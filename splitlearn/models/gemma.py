"""Gemma split into bottom / trunk / top on transformers' ``GemmaDecoderLayer``.

The bottom's embedding is transformers' ``GemmaTextScaledWordEmbedding``: token embeddings times
sqrt(hidden_size), the scale cast to the hidden dtype (as Gemma does). Every part owns a
``GemmaRotaryEmbedding`` (transformers computes cos/sin once at model level). The LM head is tied
to the embedding: the checkpoint usually has no ``lm_head.weight`` and the top reads
``model.embed_tokens.weight`` instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import (
    GemmaDecoderLayer,
    GemmaRMSNorm,
    GemmaRotaryEmbedding,
    GemmaTextScaledWordEmbedding,
)

from splitlearn.models.base import SplitOutput, SplitPart


class _GemmaPart(SplitPart):
    family = "gemma"
    base_prefix = "model."
    layers_name = "layers"
    embed_name = "embed_tokens"

    def _make_layer(self, config: Any, layer_index: int) -> nn.Module:
        return GemmaDecoderLayer(config, layer_index)

    def _set_cache_index(self, layer: nn.Module, local_index: int) -> None:
        layer.self_attn.layer_idx = local_index

    def _build_extra(self, config: Any) -> None:
        self.rotary_emb = GemmaRotaryEmbedding(config=config)

    def _init_nonpersistent(self) -> None:
        self.rotary_emb = GemmaRotaryEmbedding(config=self.config)

    def _layer_extra(self, hidden, position_ids):
        return self.rotary_emb(hidden, position_ids)

    def _call_layer(self, layer, hidden, mask, position_ids, cache, use_cache, extra):
        return layer(
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=use_cache,
            position_embeddings=extra,
        )


class GemmaBottomModel(_GemmaPart):
    part = "bottom"

    def _build_extra(self, config: Any) -> None:
        super()._build_extra(config)
        self.embed_tokens = GemmaTextScaledWordEmbedding(
            config.vocab_size, config.hidden_size, config.pad_token_id, embed_scale=config.hidden_size**0.5
        )

    def _init_nonpersistent(self) -> None:
        super()._init_nonpersistent()
        # a non-persistent buffer: not in any checkpoint, recreated after a meta build
        self.embed_tokens.embed_scale = torch.tensor(
            self.config.hidden_size**0.5, device=self.embed_tokens.weight.device
        )

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        cache, position_ids = self._prepare(
            input_ids.shape[1], input_ids.device, attention_mask, position_ids, past_key_values, use_cache
        )
        hidden = self.embed_tokens(input_ids)
        hidden = self._run_layers(hidden, attention_mask, position_ids, cache, use_cache)
        return SplitOutput(hidden, None, cache if use_cache else None, attention_mask, position_ids)


class GemmaTrunkModel(_GemmaPart):
    part = "trunk"

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        cache, position_ids = self._prepare(
            hidden_states.shape[1], hidden_states.device, attention_mask, position_ids, past_key_values, use_cache
        )
        hidden = self._run_layers(hidden_states, attention_mask, position_ids, cache, use_cache)
        return SplitOutput(hidden, None, cache if use_cache else None, attention_mask, position_ids)


class GemmaTopModel(_GemmaPart):
    part = "top"

    def _build_extra(self, config: Any) -> None:
        super()._build_extra(config)
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        cache, position_ids = self._prepare(
            hidden_states.shape[1], hidden_states.device, attention_mask, position_ids, past_key_values, use_cache
        )
        hidden = self._run_layers(hidden_states, attention_mask, position_ids, cache, use_cache)
        hidden = self.norm(hidden)
        logits = self.lm_head(hidden)
        return SplitOutput(hidden, logits, cache if use_cache else None, attention_mask, position_ids)


PART_CLASSES = {"bottom": GemmaBottomModel, "trunk": GemmaTrunkModel, "top": GemmaTopModel}

__all__ = ["GemmaBottomModel", "GemmaTrunkModel", "GemmaTopModel", "PART_CLASSES"]
