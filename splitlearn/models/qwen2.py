"""Qwen2 split into bottom / trunk / top on transformers' ``Qwen2DecoderLayer``.

transformers computes the rotary cos/sin once in ``Qwen2Model``; here every part owns a
``Qwen2RotaryEmbedding`` and computes them from the position ids it is given (or derives).
Sliding-window layers (``layer_types``) get transformers' sliding-window mask.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from splitlearn.models.base import SplitOutput, SplitPart


class _Qwen2Part(SplitPart):
    family = "qwen2"
    base_prefix = "model."
    layers_name = "layers"
    embed_name = "embed_tokens"

    def _make_layer(self, config: Any, layer_index: int) -> nn.Module:
        return Qwen2DecoderLayer(config, layer_index)

    def _set_cache_index(self, layer: nn.Module, local_index: int) -> None:
        layer.self_attn.layer_idx = local_index

    def _build_extra(self, config: Any) -> None:
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)

    def _init_nonpersistent(self) -> None:
        self.rotary_emb = Qwen2RotaryEmbedding(config=self.config)

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


class Qwen2BottomModel(_Qwen2Part):
    part = "bottom"

    def _build_extra(self, config: Any) -> None:
        super()._build_extra(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        cache, position_ids = self._prepare(
            input_ids.shape[1], input_ids.device, attention_mask, position_ids, past_key_values, use_cache
        )
        hidden = self.embed_tokens(input_ids)
        hidden = self._run_layers(hidden, attention_mask, position_ids, cache, use_cache)
        return SplitOutput(hidden, None, cache if use_cache else None, attention_mask, position_ids)


class Qwen2TrunkModel(_Qwen2Part):
    part = "trunk"

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        cache, position_ids = self._prepare(
            hidden_states.shape[1], hidden_states.device, attention_mask, position_ids, past_key_values, use_cache
        )
        hidden = self._run_layers(hidden_states, attention_mask, position_ids, cache, use_cache)
        return SplitOutput(hidden, None, cache if use_cache else None, attention_mask, position_ids)


class Qwen2TopModel(_Qwen2Part):
    part = "top"

    def _build_extra(self, config: Any) -> None:
        super()._build_extra(config)
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        cache, position_ids = self._prepare(
            hidden_states.shape[1], hidden_states.device, attention_mask, position_ids, past_key_values, use_cache
        )
        hidden = self._run_layers(hidden_states, attention_mask, position_ids, cache, use_cache)
        hidden = self.norm(hidden)
        logits = self.lm_head(hidden)
        return SplitOutput(hidden, logits, cache if use_cache else None, attention_mask, position_ids)


PART_CLASSES = {"bottom": Qwen2BottomModel, "trunk": Qwen2TrunkModel, "top": Qwen2TopModel}

__all__ = ["Qwen2BottomModel", "Qwen2TrunkModel", "Qwen2TopModel", "PART_CLASSES"]
