"""ModelFactory: build (bottom, trunk, top) from a local checkpoint.

Two paths:

* traditional: ``AutoModelForCausalLM.from_pretrained`` loads the whole model, its state dict
  is split into the parts (the parts adopt the tensors, no copy), and the full model is freed;
* incremental (low memory): a :class:`splitlearn.loading.ShardLoader` reads only the tensors a
  requested part needs, and so only the shard files that hold them.

``low_memory=None`` picks the incremental path when the checkpoint is sharded. Both paths first
check the checkpoint against the config without reading tensor data (layer count, tensor
names, shapes from the safetensors headers), so a config that does not match the weights is an
error before any heavy work, never a silently half-random model.

Storage policy: the parts of one call never share storage. A checkpoint with tied embeddings
(GPT-2, Gemma, Qwen2 with ``tie_word_embeddings``) gives the bottom's token embedding and the
top's LM head the same values, and both paths would hand the two parts the same tensor (the full
model's tied parameter; or, reading the checkpoint, one memory map of the embedding), so that a
training step on the bottom would silently change the top, or not, depending on path, dtype and
device. A tie cannot survive parts that are moved to devices of their own anyway, so the factory
unties always: a tensor of a later part (bottom, trunk, top order) whose storage overlaps that of
an earlier part becomes a copy of its own (in practice the top's ``lm_head.weight``). The cost is
one extra copy of the embedding matrix when the bottom and the top are built in the same call,
and nothing when they are not or when they already are separate (a dtype conversion on read, a
move to another device); ``load_info["own_copies"]`` of each part names what was copied.

Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from splitlearn._logging import stage
from splitlearn.errors import (
    ConfigMismatch,
    CorruptWeights,
    InvalidPart,
    InvalidSplitPoints,
    ModelLoadError,
    SplitLearnError,
    is_out_of_memory,
)
from splitlearn.models.registry import PARTS, ModelRegistry

log = logging.getLogger("splitlearn.factory")

_last = threading.local()


def validate_split_points(split_point_1: Any, split_point_2: Any, n_layers: int) -> tuple[int, int]:
    for name, value in (("split_point_1", split_point_1), ("split_point_2", split_point_2)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidSplitPoints(f"{name} must be an int, got {value!r}")
    if not 0 < split_point_1 < split_point_2 < n_layers:
        raise InvalidSplitPoints(
            f"invalid split points ({split_point_1}, {split_point_2}) for a model with {n_layers} layers: "
            f"need 0 < split_point_1 < split_point_2 < {n_layers}"
        )
    return split_point_1, split_point_2


def _layer_ranges(s1: int, s2: int, n: int) -> dict[str, tuple[int, int]]:
    return {"bottom": (0, s1), "trunk": (s1, s2), "top": (s2, n)}


class ModelFactory:
    """Creates split models. See :meth:`create_split_models`."""

    @staticmethod
    def last_load_info() -> dict[str, Any] | None:
        """What the last :meth:`create_split_models` call of this thread did: path, mode,
        parts, ``opened_files`` (weight files opened), seconds."""
        return getattr(_last, "info", None)

    @staticmethod
    def load_config(model_type: str, model_name_or_path: Any) -> Any:
        from splitlearn.loading import read_config, resolve_model_dir

        directory = resolve_model_dir(model_name_or_path)
        config = read_config(directory)
        declared = getattr(config, "model_type", None)
        if declared != model_type:
            raise ConfigMismatch(
                f"{directory}/config.json declares model_type {declared!r}, but {model_type!r} was requested"
            )
        return config

    @staticmethod
    def create_split_models(
        model_type: str,
        model_name_or_path: Any,
        split_point_1: int,
        split_point_2: int,
        device: Any = "cpu",
        low_memory: bool | None = None,
        parts: Iterable[str] = PARTS,
        dtype: Any = None,
    ) -> tuple[Any, Any, Any]:
        """Return ``(bottom, trunk, top)`` in eval mode on ``device``; a part not in ``parts`` is None.

        ``model_name_or_path``: a local directory written by ``save_pretrained`` (safetensors).
        ``low_memory``: True = incremental, False = traditional, None = incremental iff sharded.
        ``dtype``: optional torch dtype of the parts (default: the checkpoint's dtype). The
        traditional path hands it to ``from_pretrained`` (the whole model is converted); the
        incremental path converts only the tensors it reads. Either way the parts hold what
        ``from_pretrained(dtype=dtype)`` holds, non-persistent buffers included: the rotary
        ``inv_freq`` stays float32 (as transformers keeps it), Gemma's embedding scale is in
        ``dtype``.

        The parts never share storage with one another (see the storage policy in the module
        docstring): with tied embeddings the top gets its own copy of the LM head.
        """
        t0 = time.perf_counter()
        if not ModelRegistry.is_registered(model_type):
            ModelRegistry.get_model_class(model_type, "bottom")  # raises UnknownModelType listing known ones
        model_type = model_type.lower()
        requested = tuple(parts)
        unknown = [p for p in requested if p not in PARTS]
        if unknown or not requested:
            raise InvalidPart(f"parts must be a non-empty subset of {PARTS}, got {requested!r}")
        # built, and untied (the storage policy), in bottom, trunk, top order whatever the order asked
        wanted = tuple(p for p in PARTS if p in requested)

        from splitlearn.loading import ShardLoader

        with stage(log, "read config", model_type=model_type, path=model_name_or_path):
            config = ModelFactory.load_config(model_type, model_name_or_path)
        n_layers = int(config.num_hidden_layers)
        s1, s2 = validate_split_points(split_point_1, split_point_2, n_layers)
        ranges = _layer_ranges(s1, s2, n_layers)
        with stage(log, "import family module", family=model_type):
            classes = {p: ModelRegistry.get_model_class(model_type, p) for p in wanted}

        loader = ShardLoader(model_name_or_path)
        incremental = loader.is_sharded if low_memory is None else bool(low_memory)
        mode = "incremental" if incremental else "traditional"
        log.info(
            "loading %s from %s: split (%d, %d) of %d layers, parts %s, %s path",
            model_type,
            loader.model_dir,
            s1,
            s2,
            n_layers,
            ",".join(wanted),
            mode,
        )
        built: dict[str, Any] = {}
        try:
            source = loader.state_dict_view()
            with stage(log, "check checkpoint against config"):
                for p in wanted:
                    classes[p].plan_from(source, config, *ranges[p])
            if incremental:
                reader = loader.state_dict_view(dtype=dtype)  # converts tensor by tensor
                for p in wanted:
                    with stage(log, f"build {p} (incremental)", layers=ranges[p]):
                        built[p] = classes[p].from_pretrained_split(reader, config, *ranges[p])
                opened = list(loader.opened_files)
            else:
                with stage(log, "validate weight files"):
                    loader.validate_all()
                opened = list(loader.opened_files)
                loader.close()
                with stage(log, "load full model (traditional)"):
                    full = _load_full_model(loader.model_dir, config, dtype)
                with stage(log, "split full model"):
                    state_dict = full.state_dict()
                    for p in wanted:
                        built[p] = classes[p].from_pretrained_split(state_dict, config, *ranges[p])
                    del state_dict, full
                with stage(log, "free full model"):
                    gc.collect()
        finally:
            loader.close()

        import torch

        for p, module in built.items():
            with stage(log, f"move {p} to {device}"):
                # no module.to(dtype): the weights already are in ``dtype`` (converted on read, or by
                # from_pretrained), and the call would also round the non-persistent buffers that
                # transformers keeps in float32 (the rotary inv_freq), so the parts would no longer
                # compute what the full model computes
                module.to(torch.device(device))
                module.eval()
        with stage(log, "give each part storage of its own"):
            own_copies = _own_storage(built)
        for p, module in built.items():
            module.load_info = {
                "mode": mode,
                "opened_files": opened,
                "path": str(loader.model_dir),
                "own_copies": own_copies[p],
            }
        seconds = time.perf_counter() - t0
        _last.info = {
            "model_type": model_type,
            "path": str(loader.model_dir),
            "mode": mode,
            "sharded": loader.is_sharded,
            "parts": wanted,
            "split_points": (s1, s2),
            "opened_files": opened,
            "all_files": loader.files,
            "own_copies": own_copies,
            "seconds": round(seconds, 4),
        }
        log.info("loaded %s parts %s in %.2fs (%s, opened %s)", model_type, ",".join(wanted), seconds, mode, opened)
        return built.get("bottom"), built.get("trunk"), built.get("top")


def _storage_span(tensor: Any) -> tuple[str, int, int]:
    storage = tensor.untyped_storage()
    start = storage.data_ptr()
    return str(tensor.device), start, start + storage.nbytes()


def _own_storage(built: dict[str, Any]) -> dict[str, list[str]]:
    """Replace, in each part after the first, every parameter or buffer whose storage overlaps
    the storage of an earlier part by a copy (a parameter stays a parameter with its
    ``requires_grad``, a buffer keeps its persistence). Names sharing one tensor inside a part
    get one copy between them. Returns ``{part: [local names copied]}``."""
    import torch

    earlier: list[tuple[str, int, int]] = []
    copied: dict[str, list[str]] = {}
    for p, module in built.items():
        spans: list[tuple[str, int, int]] = []
        replaced: dict[int, Any] = {}  # id of the shared tensor -> its copy
        copied[p] = []
        named = list(module.named_parameters(remove_duplicate=False))
        named += list(module.named_buffers(remove_duplicate=False))
        for name, tensor in named:
            device, start, end = _storage_span(tensor)
            if start == end:
                continue  # no storage (empty tensor)
            shared = any(d == device and s < end and start < e for d, s, e in earlier)
            if not shared:
                spans.append((device, start, end))
                continue
            copy = replaced.get(id(tensor))
            if copy is None:
                data = tensor.detach().clone()
                if isinstance(tensor, torch.nn.Parameter):
                    copy = torch.nn.Parameter(data, requires_grad=tensor.requires_grad)
                else:
                    copy = data
                replaced[id(tensor)] = copy
                spans.append(_storage_span(copy))
                log.info(
                    "%s %s shared storage with an earlier part: given a copy of its own (%.1f MiB)",
                    p,
                    name,
                    copy.nelement() * copy.element_size() / 2**20,
                )
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            setattr(owner, attr, copy)
            copied[p].append(name)
        earlier.extend(spans)
    return copied


def _load_full_model(model_dir: Any, config: Any, dtype: Any = None) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        full, info = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            config=config,
            local_files_only=True,
            dtype=dtype if dtype is not None else "auto",
            output_loading_info=True,
        )
    except SplitLearnError:
        raise
    except OSError as exc:
        # a file that cannot be opened or read (permissions, descriptors, I/O): nothing is known
        # to be wrong with the weights themselves, so not CorruptWeights
        raise ModelLoadError(f"transformers could not read {model_dir}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        if is_out_of_memory(exc):  # allocation, the CPU allocator's RuntimeError too: not the weights' fault either
            raise ModelLoadError(f"out of memory loading {model_dir}: {type(exc).__name__}: {exc}") from exc
        raise CorruptWeights(f"transformers could not load {model_dir}: {type(exc).__name__}: {exc}") from exc
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith("lm_head.")]
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or mismatched:
        raise ConfigMismatch(
            f"{model_dir}: weights do not match the config: missing {missing[:6]} mismatched {mismatched[:6]}"
        )
    return full.eval()


__all__ = ["ModelFactory", "validate_split_points"]
