"""Gemma split into bottom / trunk / top on transformers' ``GemmaDecoderLayer``.

The bottom's embedding is transformers' ``GemmaTextScaledWordEmbedding``: token embeddings times
sqrt(hidden_size), the scale cast to the hidden dtype (as Gemma does). Every part owns a
``GemmaRotaryEmbedding`` (transformers computes cos/sin once at model level). The LM head is tied
to the embedding: the checkpoint usually has no ``lm_head.weight`` and the top reads
``model.embed_tokens.weight`` instead. The rest is shared with Qwen2 in
:class:`splitlearn.models.base.RotaryPart`.
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

from splitlearn.models.base import BottomPart, RotaryPart, TopPart, TrunkPart


class _GemmaPart(RotaryPart):
    family = "gemma"
    layer_cls = GemmaDecoderLayer
    rotary_cls = GemmaRotaryEmbedding
    norm_cls = GemmaRMSNorm


class GemmaBottomModel(_GemmaPart, BottomPart):
    def _make_embedding(self, config: Any) -> nn.Module:
        return GemmaTextScaledWordEmbedding(
            config.vocab_size, config.hidden_size, config.pad_token_id, embed_scale=config.hidden_size**0.5
        )

    def _init_nonpersistent(self) -> None:
        super()._init_nonpersistent()
        # a non-persistent buffer: not in any checkpoint, recreated after a meta build. In the
        # weights' dtype, as transformers has it (it builds the model under the load dtype as
        # torch's default dtype); the rotary inv_freq, by contrast, it computes in float32
        weight = self.embed_tokens.weight
        self.embed_tokens.embed_scale = torch.tensor(
            self.config.hidden_size**0.5, dtype=weight.dtype, device=weight.device
        )


class GemmaTrunkModel(_GemmaPart, TrunkPart):
    pass


class GemmaTopModel(_GemmaPart, TopPart):
    pass


PART_CLASSES = {"bottom": GemmaBottomModel, "trunk": GemmaTrunkModel, "top": GemmaTopModel}

__all__ = ["GemmaBottomModel", "GemmaTrunkModel", "GemmaTopModel", "PART_CLASSES"]
