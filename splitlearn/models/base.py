"""What the three parts of every family share.

A part holds a contiguous run of transformers' own decoder layers (``GPT2Block``,
``Qwen2DecoderLayer``, ``GemmaDecoderLayer``), built with their *global* layer index (so
per-layer settings such as sliding windows or GPT-2's inverse-layer scaling stay right) and then
given a *local* cache index, so that each part owns a transformers ``DynamicCache`` whose layers
are numbered from 0. Each part builds its own causal/padding mask with transformers' mask
utilities and derives position ids from the 2-D padding mask exactly as ``generate`` does, so
left padding gives the same numbers as the full model.

Weights are loaded from any mapping of checkpoint keys (a full ``state_dict`` or the lazy view of
:class:`splitlearn.loading.ShardLoader`) onto a part built on the ``meta`` device, with
``load_state_dict(assign=True)``: no random initialisation, and no second copy of the weights.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from splitlearn.errors import (
    ConfigMismatch,
    CorruptWeights,
    InvalidSplitPoints,
    ModelLoadError,
    ModelNotFound,
    SplitLearnError,
)

log = logging.getLogger("splitlearn.models")


@functools.cache
def cache_arg(fn: Any) -> str:
    """The name under which ``fn`` (a mask builder, a decoder layer's ``forward``) takes the KV
    cache: ``cache`` in the transformers releases that renamed it (the old ``past_key_values``
    still works there with a FutureWarning, until its announced removal in 5.40), else
    ``past_key_values``. Read from the signature once per function."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"

SPLIT_META_FILE = "split_config.json"
PART_WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


@dataclass
class SplitOutput:
    """What every part returns.

    ``hidden_states``: output of the part's last layer (for the top: after the final norm).
    ``logits``: top only. ``past_key_values``: the part's own cache when ``use_cache``.
    ``attention_mask`` / ``position_ids``: what the part used, to hand to the next part.
    """

    hidden_states: torch.Tensor
    logits: torch.Tensor | None = None
    past_key_values: Any = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None


def positions_from_mask(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Position ids of the last ``query_length`` tokens from a 2-D padding mask (1 keep, 0 pad),
    computed as ``GenerationMixin`` does: running count of kept tokens minus one, pads at 0."""
    mask = attention_mask.long()
    positions = mask.cumsum(-1) - 1
    positions = positions.masked_fill(mask == 0, 0)
    return positions[:, -query_length:]


def _read_split_meta(path: Path) -> dict[str, Any]:
    """``split_config.json`` of a saved part, checked: a file that is not JSON, lacks a field,
    or was written by a newer format is a ModelLoadError naming the file (it was a bare
    JSONDecodeError or KeyError)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise ModelLoadError(f"{path}: format_version {version!r}; this splitlearn reads {FORMAT_VERSION} and older")
    for key in ("family", "part"):
        if not isinstance(meta.get(key), str):
            raise ModelLoadError(f"{path}: {key!r} must be a string, got {meta.get(key)!r}")
    for key in ("num_hidden_layers", "start_layer", "end_layer"):
        v = meta.get(key)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ModelLoadError(f"{path}: {key!r} must be an integer, got {v!r}")
    return meta


def _num_layers(config: Any) -> int:
    return int(config.num_hidden_layers)


class SplitPart(nn.Module):
    """Base of all part classes. Subclasses set the class attributes and the hooks below."""

    family: ClassVar[str] = ""
    part: ClassVar[str] = ""  # "bottom" | "trunk" | "top"
    base_prefix: ClassVar[str] = ""  # checkpoint prefix of the base model, e.g. "transformer."
    layers_name: ClassVar[str] = ""  # checkpoint name of the layer list, e.g. "h"
    embed_name: ClassVar[str] = ""  # checkpoint name of the token embedding, e.g. "wte"

    # ------------------------------------------------------------------ construction
    def __init__(self, config: Any, start_layer: int, end_layer: int) -> None:
        super().__init__()
        n = _num_layers(config)
        self._check_range(n, start_layer, end_layer)
        config = copy.deepcopy(config)
        if getattr(config, "_attn_implementation", None) is None:
            config._attn_implementation = "sdpa"
        self.config = config
        self.start_layer = int(start_layer)
        self.end_layer = int(end_layer)
        self.layers = nn.ModuleList([self._make_layer(config, i) for i in range(self.start_layer, self.end_layer)])
        for local_index, layer in enumerate(self.layers):
            self._set_cache_index(layer, local_index)
        self._layer_types = [self._layer_type(config, i) for i in range(self.start_layer, self.end_layer)]
        self._cache_config = self._make_cache_config(config)
        self._build_extra(config)

    @classmethod
    def _check_range(cls, n: int, start: int, end: int) -> None:
        ok = 0 <= start < end <= n
        if cls.part == "bottom":
            ok = ok and start == 0
        if cls.part == "top":
            ok = ok and end == n
        if not ok:
            raise InvalidSplitPoints(
                f"{cls.__name__}: layer range [{start}, {end}) is not valid for a {cls.part or 'part'} "
                f"of a model with {n} layers"
                + (" (a bottom starts at 0)" if cls.part == "bottom" else "")
                + (f" (a top ends at {n})" if cls.part == "top" else "")
            )

    @classmethod
    def _resolve_range(cls, config: Any, start_layer: int | None, end_layer: int | None) -> tuple[int, int]:
        n = _num_layers(config)
        start = 0 if start_layer is None else int(start_layer)
        if end_layer is None:
            if cls.part == "top":
                end = n
            else:
                raise InvalidSplitPoints(f"{cls.__name__}.from_pretrained_split needs end_layer (the split point)")
        else:
            end = int(end_layer)
        cls._check_range(n, start, end)
        return start, end

    def _make_cache_config(self, config: Any) -> Any:
        """A copy of the config describing only this part's layers, for ``DynamicCache(config=...)``."""
        cache_config = copy.deepcopy(config)
        cache_config.num_hidden_layers = len(self.layers)
        if getattr(config, "layer_types", None) is not None:
            cache_config.layer_types = list(self._layer_types)
        return cache_config

    # hooks a family implements ----------------------------------------------------------
    def _make_layer(self, config: Any, layer_index: int) -> nn.Module:
        raise NotImplementedError

    def _set_cache_index(self, layer: nn.Module, local_index: int) -> None:
        raise NotImplementedError

    def _layer_type(self, config: Any, layer_index: int) -> str:
        types = getattr(config, "layer_types", None)
        return types[layer_index] if types else "full_attention"

    def _build_extra(self, config: Any) -> None:
        """Embeddings (bottom), final norm and LM head (top), rotary embedding (rotary families)."""

    def _init_nonpersistent(self) -> None:
        """Recreate non-persistent buffers (rotary frequencies, embedding scale) after a meta build."""

    def _call_layer(self, layer, hidden, mask, position_ids, cache, use_cache, extra) -> torch.Tensor:
        raise NotImplementedError

    def _layer_extra(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        """Per-forward inputs shared by the layers (rotary cos/sin)."""
        return None

    def _embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Bottom only: token ids to the first layer's input (embedding, positions, scaling, dropout)."""
        raise NotImplementedError

    def _head(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top only: the last layer's output to ``(normed hidden states, logits)``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ forward helpers
    def _prepare(
        self,
        query_length: int,
        device: torch.device,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_key_values: Any,
        use_cache: bool,
    ) -> tuple[Any, torch.Tensor]:
        from transformers.cache_utils import DynamicCache

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self._cache_config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(
                    f"{type(self).__name__}: attention_mask must be the 2-D [batch, past+current] padding mask, "
                    f"got shape {tuple(attention_mask.shape)}"
                )
            if attention_mask.shape[1] != past_length + query_length:
                raise ValueError(
                    f"{type(self).__name__}: attention_mask covers {attention_mask.shape[1]} tokens but the cache "
                    f"holds {past_length} and this call adds {query_length}"
                )
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask, query_length).to(device)
            else:
                position_ids = torch.arange(past_length, past_length + query_length, device=device).unsqueeze(0)
        return past_key_values, position_ids

    def _masks(self, hidden: torch.Tensor, attention_mask, cache, position_ids) -> dict[str, Any]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kwargs = dict(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids)
        masks: dict[str, Any] = {}
        for layer_type in set(self._layer_types):
            build = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
            masks[layer_type] = build(**kwargs, **{cache_arg(build): cache})
        return masks

    def _run_layers(self, hidden, attention_mask, position_ids, cache, use_cache) -> torch.Tensor:
        masks = self._masks(hidden, attention_mask, cache, position_ids)
        extra = self._layer_extra(hidden, position_ids)
        for layer, layer_type in zip(self.layers, self._layer_types, strict=False):
            hidden = self._call_layer(layer, hidden, masks[layer_type], position_ids, cache, use_cache, extra)
        return hidden

    def _forward(self, inputs, attention_mask, position_ids, past_key_values, use_cache) -> SplitOutput:
        """The forward pass of every part: cache and position ids, embedding (bottom), the layers,
        final norm and LM head (top). ``inputs`` are token ids for a bottom, hidden states otherwise."""
        cache, position_ids = self._prepare(
            inputs.shape[1], inputs.device, attention_mask, position_ids, past_key_values, use_cache
        )
        hidden = self._embed(inputs, position_ids) if self.part == "bottom" else inputs
        hidden = self._run_layers(hidden, attention_mask, position_ids, cache, use_cache)
        logits = None
        if self.part == "top":
            hidden, logits = self._head(hidden)
        return SplitOutput(hidden, logits, cache if use_cache else None, attention_mask, position_ids)

    # ------------------------------------------------------------------ weights
    def checkpoint_key(self, local_key: str, prefix: str | None = None) -> str:
        """The key of a local parameter in the full model's checkpoint."""
        prefix = self.base_prefix if prefix is None else prefix
        if local_key.startswith("layers."):
            _, index, rest = local_key.split(".", 2)
            return f"{prefix}{self.layers_name}.{self.start_layer + int(index)}.{rest}"
        if local_key.startswith("lm_head."):
            return local_key
        return f"{prefix}{local_key}"

    def checkpoint_plan(self, available: Any) -> dict[str, str]:
        """Map every persistent local tensor to the checkpoint key it comes from, given the
        checkpoint's keys (``available`` supports ``in``). Raises ConfigMismatch when one is absent."""
        prefix = _detect_prefix(available, self.base_prefix, self.layers_name, self.embed_name)
        plan: dict[str, str] = {}
        missing: list[str] = []
        for local_key in self.state_dict().keys():
            key = self.checkpoint_key(local_key, prefix)
            if key not in available and local_key == "lm_head.weight":
                tied = f"{prefix}{self.embed_name}.weight"
                if getattr(self.config, "tie_word_embeddings", False) and tied in available:
                    key = tied  # safetensors drops the tied lm_head.weight on save
            if key not in available:
                missing.append(key)
            else:
                plan[local_key] = key
        if missing:
            raise ConfigMismatch(
                f"{type(self).__name__} (layers [{self.start_layer}, {self.end_layer}) of a "
                f"{_num_layers(self.config)}-layer {self.family} config) needs tensors the checkpoint lacks: "
                + ", ".join(missing[:8])
                + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else "")
            )
        return plan

    def load_tensors(self, tensors: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Adopt ``tensors`` (local keys) as this part's weights, after checking names and shapes."""
        expected = self.state_dict()
        unexpected = sorted(set(tensors) - set(expected))
        missing = sorted(set(expected) - set(tensors))
        bad_shapes = [
            f"{k}: checkpoint {tuple(tensors[k].shape)} vs config {tuple(v.shape)}"
            for k, v in expected.items()
            if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
        ]
        if missing or unexpected or bad_shapes:
            parts = []
            if bad_shapes:
                parts.append("shape mismatch " + "; ".join(bad_shapes[:6]))
            if missing:
                parts.append("missing " + ", ".join(missing[:6]))
            if unexpected:
                parts.append("unexpected " + ", ".join(unexpected[:6]))
            raise ConfigMismatch(
                f"{type(self).__name__}: weights from {source} do not match the config: " + " | ".join(parts)
            )
        self.load_state_dict(dict(tensors), strict=True, assign=True)
        self._init_nonpersistent()
        left = [n for n, t in list(self.named_parameters()) + list(self.named_buffers()) if t.is_meta]
        if left:
            raise SplitLearnError(f"{type(self).__name__}: tensors left unmaterialised after loading: {left}")

    @classmethod
    def empty(cls, config: Any, start_layer: int, end_layer: int) -> SplitPart:
        """Build the part on the meta device: structure and shapes, no memory, no random init."""
        with torch.device("meta"):
            return cls(config, start_layer, end_layer)

    @classmethod
    def plan_from(
        cls, source: Mapping[str, Any], config: Any, start_layer: int | None = 0, end_layer: int | None = None
    ) -> tuple[SplitPart, dict[str, str]]:
        """Check ``source`` (checkpoint keys) against ``config`` without reading tensor data:
        layer count, presence of every tensor the part needs and their shapes (from the file
        headers when ``source`` has a ``shape(key)`` method). Returns the meta-built part and the
        plan ``{local key: checkpoint key}``."""
        start, end = cls._resolve_range(config, start_layer, end_layer)
        _check_layer_count(source, config, cls)
        part = cls.empty(config, start, end)
        plan = part.checkpoint_plan(source)
        shape_of = getattr(source, "shape", None)
        expected = part.state_dict()
        bad = []
        for local, key in plan.items():
            got = tuple(shape_of(key)) if callable(shape_of) else tuple(source[key].shape)
            if got != tuple(expected[local].shape):
                bad.append(f"{key}: weights {got} vs config {tuple(expected[local].shape)}")
        if bad:
            raise ConfigMismatch(
                f"the {cls.family} config does not match the weights ({len(bad)} tensor(s)): " + "; ".join(bad[:6])
            )
        return part, plan

    @classmethod
    def from_pretrained_split(
        cls, state_dict: Mapping[str, torch.Tensor], config: Any, start_layer: int = 0, end_layer: int | None = None
    ) -> SplitPart:
        """Build this part from a full model's state dict (checkpoint keys) or any mapping with the
        same keys (the lazy view of a ShardLoader reads only the tensors asked for).

        The part adopts the mapping's tensors without copying them, so parts built here from one
        tied state dict share the embedding's storage with each other (and with its source);
        :meth:`splitlearn.ModelFactory.create_split_models` gives each of its parts storage of
        its own (see the storage policy in :mod:`splitlearn.factory`)."""
        part, plan = cls.plan_from(state_dict, config, start_layer, end_layer)
        tensors = {local: state_dict[key] for local, key in plan.items()}
        part.load_tensors(tensors, source=getattr(state_dict, "description", "state dict"))
        log.debug("%s built from layers [%d, %d)", cls.__name__, part.start_layer, part.end_layer)
        return part.eval()

    # ------------------------------------------------------------------ save / load a part
    def split_metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "family": self.family,
            "part": self.part,
            "class": type(self).__name__,
            "start_layer": self.start_layer,
            "end_layer": self.end_layer,
            "num_hidden_layers": _num_layers(self.config),
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` (this part's tensors, local keys), ``config.json`` and
        ``split_config.json``. No pickle."""
        from safetensors.torch import save_file

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = self.split_metadata()
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.state_dict().items()}
        save_file(
            tensors,
            str(directory / PART_WEIGHTS_FILE),
            metadata={"format": "pt", **{k: str(v) for k, v in meta.items()}},
        )
        self.config.save_pretrained(str(directory))
        with open(directory / SPLIT_META_FILE, "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=2, sort_keys=True)
        log.info("saved %s [%d, %d) to %s", type(self).__name__, self.start_layer, self.end_layer, directory)
        return directory

    @classmethod
    def from_saved(cls, directory: str | os.PathLike) -> SplitPart:
        """Load a part written by :meth:`save_pretrained`. On the base class, the family and part
        are read from ``split_config.json``."""
        from safetensors import SafetensorError, safe_open

        from splitlearn.loading import _unreadable, read_config

        directory = Path(directory)
        meta_path = directory / SPLIT_META_FILE
        if not directory.is_dir():
            raise ModelNotFound(f"saved part directory {directory} does not exist")
        if not meta_path.is_file():
            raise ModelNotFound(f"{directory} holds no {SPLIT_META_FILE}: not a saved split part")
        meta = _read_split_meta(meta_path)
        target = cls
        if not cls.part:
            from splitlearn.models.registry import ModelRegistry

            target = ModelRegistry.get_model_class(meta["family"], meta["part"])
        elif (meta.get("family"), meta.get("part")) != (cls.family, cls.part):
            raise ConfigMismatch(
                f"{directory} holds a {meta.get('family')} {meta.get('part')} part, not a {cls.family} {cls.part}"
            )
        if not (directory / "config.json").is_file():
            raise ModelNotFound(f"{directory} holds no config.json")
        config = read_config(directory)
        if _num_layers(config) != meta["num_hidden_layers"]:
            raise ConfigMismatch(
                f"{directory}: config.json declares {_num_layers(config)} layers, split_config.json {meta['num_hidden_layers']}"
            )
        part = target.empty(config, meta["start_layer"], meta["end_layer"])
        weights = directory / PART_WEIGHTS_FILE
        if not weights.is_file():
            raise ModelNotFound(f"{directory} holds no {PART_WEIGHTS_FILE}")
        try:
            with safe_open(str(weights), framework="pt", device="cpu") as fh:
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except SafetensorError as exc:  # the file's contents: truncated, malformed header...
            raise CorruptWeights(f"cannot read {weights}: {type(exc).__name__}: {exc}") from exc
        except OSError as exc:  # the file cannot be opened or read: nothing known to be wrong with it
            error = _unreadable(weights, exc, "cannot read")
            raise error from error.__cause__
        except Exception as exc:  # allocation, mostly: not the file's fault either
            raise ModelLoadError(f"cannot load {weights}: {type(exc).__name__}: {exc}") from exc
        part.load_tensors(tensors, source=str(weights))
        return part.eval()

    def extra_repr(self) -> str:
        return f"family={self.family}, part={self.part}, layers=[{self.start_layer}, {self.end_layer})"


# ---------------------------------------------------------------------------- the three parts
# A family's part class derives from its family class first, then from one of these
# (``class Qwen2TopModel(_Qwen2Part, TopPart)``): these give ``part`` and the public forward.


class BottomPart(SplitPart):
    part = "bottom"

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        return self._forward(input_ids, attention_mask, position_ids, past_key_values, use_cache)


class TrunkPart(SplitPart):
    part = "trunk"

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        return self._forward(hidden_states, attention_mask, position_ids, past_key_values, use_cache)


class TopPart(SplitPart):
    part = "top"

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        return self._forward(hidden_states, attention_mask, position_ids, past_key_values, use_cache)


class RotaryPart(SplitPart):
    """Families laid out like Llama (Qwen2, Gemma): ``model.embed_tokens``, ``model.layers.N``,
    ``model.norm``, ``lm_head``, rotary position embeddings. transformers computes the rotary
    cos/sin once at model level; here every part owns a rotary embedding and computes them from
    the position ids it is given (or derives). A family sets the three classes below."""

    base_prefix = "model."
    layers_name = "layers"
    embed_name = "embed_tokens"
    layer_cls: ClassVar[type[nn.Module]]  # e.g. Qwen2DecoderLayer
    rotary_cls: ClassVar[type[nn.Module]]  # e.g. Qwen2RotaryEmbedding
    norm_cls: ClassVar[type[nn.Module]]  # e.g. Qwen2RMSNorm

    def _make_layer(self, config: Any, layer_index: int) -> nn.Module:
        return self.layer_cls(config, layer_index)

    def _set_cache_index(self, layer: nn.Module, local_index: int) -> None:
        layer.self_attn.layer_idx = local_index

    def _make_embedding(self, config: Any) -> nn.Module:
        return nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)

    def _build_extra(self, config: Any) -> None:
        self.rotary_emb = self.rotary_cls(config=config)
        if self.part == "bottom":
            self.embed_tokens = self._make_embedding(config)
        elif self.part == "top":
            self.norm = self.norm_cls(config.hidden_size, eps=config.rms_norm_eps)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def _init_nonpersistent(self) -> None:
        # inv_freq comes out float32 whatever the weights' dtype, as in the full model loaded by
        # from_pretrained(dtype=...); its forward computes cos/sin in float32 and casts them
        self.rotary_emb = self.rotary_cls(config=self.config)

    def _layer_extra(self, hidden, position_ids):
        return self.rotary_emb(hidden, position_ids)

    def _call_layer(self, layer, hidden, mask, position_ids, cache, use_cache, extra):
        return layer(
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=use_cache,
            position_embeddings=extra,
            **{cache_arg(self.layer_cls.forward): cache},
        )

    def _embed(self, input_ids, position_ids):
        return self.embed_tokens(input_ids)

    def _head(self, hidden):
        hidden = self.norm(hidden)
        return hidden, self.lm_head(hidden)


_LAYER_RE_CACHE: dict[tuple[str, str], re.Pattern] = {}


def _detect_prefix(available: Any, base_prefix: str, layers_name: str, embed_name: str) -> str:
    """Checkpoints of the bare base model (``h.0...``) lack the ``transformer.`` / ``model.`` prefix."""
    probes = (f"{base_prefix}{embed_name}.weight", f"{base_prefix}{layers_name}.0.")
    if probes[0] in available:
        return base_prefix
    if f"{embed_name}.weight" in available:
        return ""
    keys = getattr(available, "keys", None)
    if keys is not None:
        for key in keys():
            if key.startswith(probes[1]):
                return base_prefix
            if key.startswith(f"{layers_name}.0."):
                return ""
    return base_prefix


def layer_indices(keys: Any, base_prefix: str, layers_name: str) -> set[int]:
    pattern = _LAYER_RE_CACHE.get((base_prefix, layers_name))
    if pattern is None:
        pattern = re.compile(rf"^(?:{re.escape(base_prefix)})?{re.escape(layers_name)}\.(\d+)\.")
        _LAYER_RE_CACHE[(base_prefix, layers_name)] = pattern
    found = set()
    for key in keys:
        m = pattern.match(key)
        if m:
            found.add(int(m.group(1)))
    return found


def _check_layer_count(state_dict: Mapping[str, Any], config: Any, cls: type[SplitPart]) -> None:
    """A config that declares more or fewer layers than the weights hold is a ConfigMismatch."""
    indices = layer_indices(state_dict.keys(), cls.base_prefix, cls.layers_name)
    n = _num_layers(config)
    if not indices:
        raise ConfigMismatch(f"no {cls.family} decoder layers ({cls.base_prefix}{cls.layers_name}.N.*) in the weights")
    if indices != set(range(n)):
        held = max(indices) + 1
        raise ConfigMismatch(
            f"config declares {n} {cls.family} layers but the weights hold layers "
            f"{_ranges(sorted(indices))} ({held if indices == set(range(held)) else len(indices)} layers)"
        )


def _ranges(indices: list[int]) -> str:
    if not indices:
        return "none"
    out, start, prev = [], indices[0], indices[0]
    for i in indices[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)
