"""Qwen2 split into bottom / trunk / top on transformers' ``Qwen2DecoderLayer``.

transformers computes the rotary cos/sin once in ``Qwen2Model``; here every part owns a
``Qwen2RotaryEmbedding`` and computes them from the position ids it is given (or derives).
Sliding-window layers (``layer_types``) get transformers' sliding-window mask. All but the
three transformers classes is shared with Gemma in :class:`splitlearn.models.base.RotaryPart`.
"""

from __future__ import annotations

from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from splitlearn.models.base import BottomPart, RotaryPart, TopPart, TrunkPart


class _Qwen2Part(RotaryPart):
    family = "qwen2"
    layer_cls = Qwen2DecoderLayer
    rotary_cls = Qwen2RotaryEmbedding
    norm_cls = Qwen2RMSNorm


class Qwen2BottomModel(_Qwen2Part, BottomPart):
    pass


class Qwen2TrunkModel(_Qwen2Part, TrunkPart):
    pass


class Qwen2TopModel(_Qwen2Part, TopPart):
    pass


PART_CLASSES = {"bottom": Qwen2BottomModel, "trunk": Qwen2TrunkModel, "top": Qwen2TopModel}

__all__ = ["Qwen2BottomModel", "Qwen2TrunkModel", "Qwen2TopModel", "PART_CLASSES"]
