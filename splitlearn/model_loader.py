"""Load one model described by a :class:`ModelConfig` (seed 004, stage 2).

``ModelLoader.load_from_config(config)`` dispatches on ``config.model_type``:

``pytorch``
    a state-dict file (``.safetensors``, or ``.pt`` / ``.pth`` / ``.bin`` read with
    ``torch.load(..., weights_only=True)``) plus a model class given as an import string
    ``"package.module:Class"`` and its keyword arguments. A file that holds pickled objects
    beyond tensors is refused, never unpickled with ``weights_only=False``.
``huggingface``
    a local directory saved with ``save_pretrained``, loaded through ``AutoModelForCausalLM``
    (``auto_class="causal_lm"``, the default) or ``AutoModel`` (``auto_class="model"``) with
    ``local_files_only=True``: nothing is downloaded.
``gpt2`` / ``qwen2`` / ``gemma``
    one part (``component``: bottom, trunk or top) of a split model, built through
    :meth:`splitlearn.ModelFactory.create_split_models` with only that part requested.

Threads
    ``config.num_threads`` (and ``config.interop_threads``) are applied with
    :func:`configure_threads`, i.e. ``torch.set_num_threads``, **in the thread that runs the
    load** (an executor thread under :class:`~splitlearn.manager.AsyncModelManager`). Treat it as
    **process-wide**: torch stores it as the process default, which the loading thread and every
    thread that starts torch work later adopt, so it changes the speed of every model in the
    process, not only the one being loaded. A thread that already ran torch work (the event-loop
    thread serving other models, say) may adopt it or keep its own count depending on the backend
    and on what that thread has run: with torch 2.13's OpenMP backend both happen
    (tests/test_model_loader.py measures it). To set a serving thread's count for sure, call
    :func:`configure_threads` on that thread. ``None`` (the default) leaves every setting alone;
    the original loader forced one thread on every load. Environment variables
    (``OMP_NUM_THREADS``...) are not touched: once torch is imported they no longer size its pool.

Warmup
    ``config.warmup`` runs ``warmup_steps`` forward passes under ``torch.inference_mode`` on a
    sample input (token ids for language models and bottom parts, hidden states for trunk and
    top parts, ``warmup_input_shape`` floats for ``pytorch`` models).

Cancellation
    ``load_from_config(config, cancel_event=ev)`` checks ``ev`` between stages (before the load,
    after it, between warmup passes) and raises :class:`LoadCancelled` there. Python cannot stop
    a thread inside a C call: a stage already running finishes first.

Imports of torch / transformers happen inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitlearn._logging import stage
from splitlearn.errors import ModelLoadError, SplitLearnError

log = logging.getLogger("splitlearn.model_loader")

SPLIT_TYPES = ("gpt2", "qwen2", "gemma")
MODEL_TYPES = ("pytorch", "huggingface", *SPLIT_TYPES)
COMPONENTS = ("bottom", "trunk", "top")
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
HF_AUTO_CLASSES = ("causal_lm", "model")
DTYPES = ("float32", "float16", "bfloat16", "float64")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

# estimate_memory: the host memory a load may need at its peak, as a multiple of the bytes of the
# weights that load reads (counted in the dtype they end up in).
#
# Whole-model loads -- the pytorch path, the huggingface path and the traditional split path --
# may hold the weights twice at once: the pytorch path builds the module with freshly initialised
# parameters and reads the state dict beside them until load_state_dict has copied it in; a .bin
# checkpoint is unpickled whole beside the model; from_pretrained with a dtype conversion holds the
# checkpoint as read beside the converted model (measured, repro scenario loading_memory: 1.5x
# the fp32 checkpoint when a GPT-2-small is loaded as bfloat16). Without a conversion, transformers
# 5 maps a safetensors checkpoint and may need much less: 2x is the bound, not the typical figure.
FULL_LOAD_PEAK_FACTOR = 2.0
# The incremental (low-memory) split path never builds the full model: the part is built on the
# meta device and adopts each tensor it needs as it is read (no second copy); a dtype conversion
# holds one source tensor beside the converted ones (counted separately). Measured (repro scenario
# loading_memory, trunk (2, 10) of a 12x768 GPT-2, RSS above the import baseline after a forward
# pass): 1.10x the trunk's fp32 bytes; 1.18x its bfloat16 bytes when converted from fp32. 1.25
# leaves room for the allocator and the part's small non-persistent buffers.
INCREMENTAL_PEAK_FACTOR = 1.25
PEAK_FACTOR = FULL_LOAD_PEAK_FACTOR  # the name of the single factor this module used to apply to every load

_DTYPE_CODES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2), "float64": ("F64", 8)}
_FLOAT_CODE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


class ConfigError(SplitLearnError, ValueError):
    """A :class:`ModelConfig` that cannot describe a load. The message lists every problem."""


class LoadCancelled(SplitLearnError):
    """The load was cancelled at a checkpoint (or finished after its caller gave up)."""


@dataclass
class ModelConfig:
    """What to load and how. ``validate()`` checks it without importing torch."""

    model_id: str
    model_type: str
    model_path: str | os.PathLike | None = None
    # pytorch
    model_class: str | None = None  # "package.module:Class"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    strict: bool = True  # load_state_dict(strict=...)
    # huggingface
    auto_class: str = "causal_lm"  # "causal_lm" -> AutoModelForCausalLM, "model" -> AutoModel
    dtype: str | None = None  # "float32", "bfloat16"...; None keeps the checkpoint's / float32
    # split families
    component: str | None = None  # bottom | trunk | top
    split_points: Sequence[int] | None = None  # (s1, s2)
    low_memory: bool | None = None  # passed to ModelFactory (None: its default)
    # common
    device: str = "cpu"
    num_threads: int | None = None  # torch.set_num_threads in the loading thread + process default; None: untouched
    interop_threads: int | None = None  # torch.set_num_interop_threads (only before parallel work)
    warmup: bool = False
    warmup_steps: int = 2
    warmup_seq_len: int = 8
    warmup_input_shape: Sequence[int] | None = None  # pytorch models: shape of a float input
    load_timeout: float | None = None  # seconds; used by AsyncModelManager.load_model
    memory_estimate_bytes: int | None = None  # overrides the estimate from file sizes
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Build from a mapping; unknown keys are an error (a typo must not be ignored)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"model config must be a mapping, not {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        missing = [k for k in ("model_id", "model_type") if k not in data]
        if missing:
            raise ConfigError(f"model config lacks required keys {missing}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["model_path"] is not None:
            d["model_path"] = str(d["model_path"])
        if d["split_points"] is not None:
            d["split_points"] = list(d["split_points"])
        return d

    def validate(self) -> ModelConfig:
        """Raise :class:`ConfigError` naming every problem; return ``self`` when valid."""
        problems: list[str] = []
        add = problems.append
        if not isinstance(self.model_id, str) or not self.model_id.strip():
            add(f"model_id must be a non-empty string, got {self.model_id!r}")
        if self.model_type not in MODEL_TYPES:
            add(f"model_type {self.model_type!r} is not one of {list(MODEL_TYPES)}")
        if not isinstance(self.device, str) or not (
            self.device == "cpu" or self.device == "mps" or self.device.split(":")[0] == "cuda"
        ):
            add(f"device {self.device!r} is not 'cpu', 'cuda', 'cuda:N' or 'mps'")
        path = Path(self.model_path) if self.model_path not in (None, "") else None

        if self.model_type == "pytorch":
            if path is None:
                add("model_type 'pytorch' needs model_path: a state-dict file")
            elif not path.is_file():
                add(f"model_path {str(path)!r} is not a file")
            elif path.suffix not in STATE_DICT_SUFFIXES:
                add(f"model_path {str(path)!r}: a state dict must end in one of {list(STATE_DICT_SUFFIXES)}")
            if not self.model_class:
                add("model_type 'pytorch' needs model_class as 'package.module:Class'")
            elif not _is_import_string(self.model_class):
                add(f"model_class {self.model_class!r} must look like 'package.module:Class'")
            if not isinstance(self.model_kwargs, Mapping):
                add(f"model_kwargs must be a mapping, got {type(self.model_kwargs).__name__}")
            if self.warmup and self.warmup_input_shape is None:
                add("warmup of a 'pytorch' model needs warmup_input_shape (the shape of a sample input)")
        elif self.model_type == "huggingface":
            if path is None:
                add("model_type 'huggingface' needs model_path: a local directory (nothing is downloaded)")
            elif not (path / "config.json").is_file():
                add(f"model_path {str(path)!r} is not a directory with a config.json")
            if self.auto_class not in HF_AUTO_CLASSES:
                add(f"auto_class {self.auto_class!r} is not one of {list(HF_AUTO_CLASSES)}")
        elif self.model_type in SPLIT_TYPES:
            if path is None:
                add(f"model_type {self.model_type!r} needs model_path: a local checkpoint directory")
            elif not path.is_dir():
                add(f"model_path {str(path)!r} is not a directory")
            if self.component not in COMPONENTS:
                add(f"component {self.component!r} is not one of {list(COMPONENTS)}")
            sp = self.split_points
            if (
                sp is None
                or isinstance(sp, (str, bytes))
                or len(sp) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in sp)
            ):
                add(f"split_points must be two integers (s1, s2), got {sp!r}")
            elif not 0 < sp[0] < sp[1]:
                add(f"split_points must satisfy 0 < s1 < s2, got {list(sp)}")

        if self.warmup_input_shape is not None and (
            isinstance(self.warmup_input_shape, (str, bytes))
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in self.warmup_input_shape)
        ):
            add(f"warmup_input_shape must be positive integers, got {self.warmup_input_shape!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            add(f"dtype {self.dtype!r} is not one of {list(DTYPES)}")
        for name in ("num_threads", "interop_threads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                add(f"{name} must be None or an integer >= 1, got {v!r}")
        for name in ("warmup_steps", "warmup_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                add(f"{name} must be an integer >= 1, got {v!r}")
        if self.load_timeout is not None and (
            not isinstance(self.load_timeout, (int, float))
            or isinstance(self.load_timeout, bool)
            or not math.isfinite(self.load_timeout)  # NaN passed "<= 0" and timed out at once
            or self.load_timeout <= 0
        ):
            add(f"load_timeout must be None or a positive finite number of seconds, got {self.load_timeout!r}")
        if self.memory_estimate_bytes is not None and (
            not isinstance(self.memory_estimate_bytes, int) or self.memory_estimate_bytes < 0
        ):
            add(f"memory_estimate_bytes must be None or an integer >= 0, got {self.memory_estimate_bytes!r}")
        if problems:
            who = self.model_id if isinstance(self.model_id, str) and self.model_id else "<no id>"
            raise ConfigError(f"invalid model config {who!r}: " + "; ".join(problems))
        return self


def _is_import_string(s: Any) -> bool:
    if not isinstance(s, str) or s.count(":") != 1:
        return False
    mod, _, attr = s.partition(":")
    return all(p.isidentifier() for p in mod.split(".")) and all(p.isidentifier() for p in attr.split("."))


def import_string(spec: str) -> Any:
    """Resolve ``"package.module:Name"`` (``Name`` may be dotted)."""
    if not _is_import_string(spec):
        raise ConfigError(f"import string {spec!r} must look like 'package.module:Class'")
    mod_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import module {mod_name!r} for model_class {spec!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ModelLoadError(f"module {mod_name!r} has no attribute {attr!r} (model_class {spec!r})") from exc
    return obj


_thread_lock = threading.Lock()


def configure_threads(num_threads: int | None = None, interop_threads: int | None = None) -> dict[str, int]:
    """Set torch's intra-op (and optionally inter-op) thread counts; returns before / after.

    **Process-wide in effect.** ``torch.set_num_threads(n)`` applies ``n`` to the calling thread
    and stores it as the process default, which threads adopt when they start torch work: it
    reaches every model run by those threads, not only the one being loaded. Threads that already
    ran torch work may keep their own count (OpenMP backend, depending on what they ran) -- call
    this on such a thread to set it there. ``set_num_interop_threads`` may only be called once,
    before any inter-op work: a refused call is logged and left as it was.
    """
    import torch

    with _thread_lock:
        before = {"num_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}
        if num_threads is not None:
            if num_threads < 1:
                raise ConfigError(f"num_threads must be >= 1, got {num_threads}")
            torch.set_num_threads(num_threads)  # always: also sets the process default
            log.info("torch intra-op threads %d -> %d (this thread and the process default)", before["num_threads"], num_threads)
        if interop_threads is not None and interop_threads != before["interop_threads"]:
            try:
                torch.set_num_interop_threads(interop_threads)
                log.info("torch inter-op threads %d -> %d", before["interop_threads"], interop_threads)
            except RuntimeError as exc:  # "cannot set ... after parallel work has started"
                log.warning("inter-op threads stay %d: %s", before["interop_threads"], exc)
        return {
            "previous_num_threads": before["num_threads"],
            "num_threads": torch.get_num_threads(),
            "previous_interop_threads": before["interop_threads"],
            "interop_threads": torch.get_num_interop_threads(),
        }


def weight_files(path: str | os.PathLike) -> list[Path]:
    """Every file that looks like weights in a checkpoint directory (or the state-dict file
    itself). Not what a load reads: see :func:`huggingface_weight_files`."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    return []


def _index_shards(index_path: Path) -> list[Path] | None:
    import json

    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # the load will report it
    return [index_path.parent / n for n in names if isinstance(n, str) and "/" not in n]


def huggingface_weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The weight files ``from_pretrained`` reads from a local directory, in its order of
    preference: ``model.safetensors``, the shards of ``model.safetensors.index.json``,
    ``pytorch_model.bin``, the shards of ``pytorch_model.bin.index.json``. A directory with none
    of these gives every weight-like file (the load will fail; the estimate stays on the safe
    side)."""
    d = Path(model_dir)
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (d / single).is_file():
            return [d / single]
        if (d / index).is_file():
            shards = _index_shards(d / index)
            if shards is not None:
                return [f for f in shards if f.is_file()]
    return weight_files(d)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _loaded_bytes(code: str, nbytes: int, dtype: str | None) -> int:
    """Bytes of a tensor of safetensors dtype ``code`` (``nbytes`` on disk) once loaded as
    ``dtype``: floating tensors are converted, the others kept."""
    if dtype is None or code not in _FLOAT_CODE_BYTES:
        return nbytes
    return nbytes // _FLOAT_CODE_BYTES[code] * _DTYPE_CODES[dtype][1]


def _full_load_bytes(files: Sequence[Path], dtype: str | None) -> int:
    """The weights a whole-model load holds: the files' sizes, or, when ``dtype`` converts them,
    the larger of that and their size once converted (from the safetensors headers)."""
    from splitlearn.loading import read_safetensors_header

    on_disk = sum(_file_size(f) for f in files)
    if dtype is None:
        return on_disk
    converted = 0
    for f in files:
        try:
            header = read_safetensors_header(f) if f.suffix == ".safetensors" else None
        except (OSError, SplitLearnError):
            header = None
        if header is None:  # a pickle (dtypes unknown without unpickling) or an unreadable file
            converted += _file_size(f)
        else:
            converted += sum(_loaded_bytes(code, n, dtype) for code, n in header.values())
    return max(on_disk, converted)


def _default_dtype_name() -> str:
    """The dtype a module built without one holds its floating parameters in."""
    import torch

    return str(torch.get_default_dtype()).replace("torch.", "")


def _dtype(name: str | None) -> Any:
    import torch

    return None if name is None else getattr(torch, name)


def _check_cancel(cancel_event: threading.Event | None, config: ModelConfig, where: str) -> None:
    if cancel_event is not None and cancel_event.is_set():
        log.info("load of %r cancelled %s", config.model_id, where)
        raise LoadCancelled(f"load of {config.model_id!r} cancelled {where}")


class ModelLoader:
    """Stateless loader; one instance may serve many threads at once."""

    # -- public ---------------------------------------------------------------------
    def estimate_memory(self, config: ModelConfig) -> int:
        """Bytes of host memory a load of ``config`` may need at its peak, or
        ``config.memory_estimate_bytes`` when given. Counts only what the chosen path reads:

        * ``pytorch``: ``FULL_LOAD_PEAK_FACTOR`` x the state-dict file, its floating tensors
          counted in torch's default dtype when no ``dtype`` is given (the module is built in it
          and the file's tensors copied in: a float16 file fills float32 parameters);
        * ``huggingface``: ``FULL_LOAD_PEAK_FACTOR`` x the files ``from_pretrained`` will read
          (safetensors when present, else the .bin; see :func:`huggingface_weight_files`);
        * split families, traditional path: ``FULL_LOAD_PEAK_FACTOR`` x the safetensors
          checkpoint (single file or the shards of its index), as the whole model is loaded;
        * split families, incremental path (``low_memory``, or ``None`` on a sharded
          checkpoint, as :class:`~splitlearn.ModelFactory` decides): ``INCREMENTAL_PEAK_FACTOR`` x
          the bytes of the tensors ``component`` needs, from the safetensors headers (no tensor
          data is read), plus the largest source tensor when ``dtype`` converts them.

        With ``dtype``, weights are counted in the dtype they are converted to (whole-model
        loads: the larger of the checkpoint and its converted size). If the part's tensors
        cannot be worked out (a config or checkpoint the load itself will reject), the
        traditional figure is returned. May import transformers and the family's module (split
        families): call it off an event loop's thread.
        """
        if config.memory_estimate_bytes is not None:
            return int(config.memory_estimate_bytes)
        if config.model_path in (None, ""):
            return 0
        path = Path(config.model_path)
        if config.model_type in SPLIT_TYPES and path.is_dir():
            return self._estimate_split(config, path)
        if config.model_type == "huggingface" and path.is_dir():
            return int(FULL_LOAD_PEAK_FACTOR * _full_load_bytes(huggingface_weight_files(path), config.dtype))
        # the pytorch path (a state-dict file): a whole-model load like the others, so a dtype
        # that widens the weights counts at its converted size. Without one, the module is built
        # in torch's default dtype and load_state_dict copies the file's tensors into it: a
        # float16 file fills float32 parameters, twice its size
        return int(FULL_LOAD_PEAK_FACTOR * _full_load_bytes(weight_files(path), config.dtype or _default_dtype_name()))

    @staticmethod
    def _estimate_split(config: ModelConfig, path: Path) -> int:
        from splitlearn.loading import ShardLoader

        try:
            loader = ShardLoader(path)
        except (SplitLearnError, OSError) as exc:  # no safetensors checkpoint: the load will say so
            log.debug("memory estimate of %r from the files' sizes: %s", config.model_id, exc)
            return int(FULL_LOAD_PEAK_FACTOR * sum(_file_size(f) for f in weight_files(path)))
        with loader:
            files = [loader.model_dir / f for f in loader.files]
            incremental = loader.is_sharded if config.low_memory is None else bool(config.low_memory)
            if not incremental:
                return int(FULL_LOAD_PEAK_FACTOR * _full_load_bytes(files, config.dtype))
            try:
                held, transient = _part_bytes(config, loader)
            except Exception as exc:  # noqa: BLE001 - an estimate: the load reports the real error
                log.warning(
                    "memory estimate of %r: cannot work out the tensors of its %s (%s: %s); counting the whole model",
                    config.model_id,
                    config.component,
                    type(exc).__name__,
                    exc,
                )
                return int(FULL_LOAD_PEAK_FACTOR * _full_load_bytes(files, config.dtype))
        return int(INCREMENTAL_PEAK_FACTOR * (held + transient))

    def load_from_config(self, config: ModelConfig, cancel_event: threading.Event | None = None) -> Any:
        """Validate, configure threads, load, move to ``config.device``, ``eval()``, warm up.

        Returns the ``torch.nn.Module``. Raises :class:`ConfigError`, :class:`ModelLoadError`
        (or a :class:`SplitLearnError` from the split factory) or :class:`LoadCancelled`.
        """
        config.validate()
        t0 = time.perf_counter()
        _check_cancel(cancel_event, config, "before it started")
        with stage(log, "load_from_config", model_id=config.model_id, model_type=config.model_type):
            if config.num_threads is not None or config.interop_threads is not None:
                configure_threads(config.num_threads, config.interop_threads)
            self._check_device(config)
            if config.model_type == "pytorch":
                model = self._load_pytorch(config)
            elif config.model_type == "huggingface":
                model = self._load_huggingface(config)
            else:
                model = self._load_split(config)
            _check_cancel(cancel_event, config, "after the weights were loaded")
            if config.warmup:
                self.warmup(model, config, cancel_event=cancel_event)
        log.info("loaded %r (%s) in %.3fs", config.model_id, config.model_type, time.perf_counter() - t0)
        return model

    # -- paths ----------------------------------------------------------------------
    @staticmethod
    def _check_device(config: ModelConfig) -> None:
        import torch

        kind = config.device.split(":")[0]
        if kind == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"model {config.model_id!r} asks for device {config.device!r} but CUDA is not available")
        if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ModelLoadError(f"model {config.model_id!r} asks for device 'mps' but MPS is not available")

    @staticmethod
    def read_state_dict(path: str | os.PathLike, device: str = "cpu") -> dict[str, Any]:
        """Tensors only: safetensors, or ``torch.load(weights_only=True)``. A checkpoint of the
        form ``{"state_dict": {...}}`` is unwrapped."""
        import torch

        p = Path(path)
        if p.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                sd: Any = load_file(str(p), device=device)
            except (SafetensorError, OSError, ValueError) as exc:
                raise ModelLoadError(f"cannot read safetensors file {str(p)!r}: {exc}") from exc
        else:
            try:
                sd = torch.load(str(p), map_location=device, weights_only=True)
            except Exception as exc:  # UnpicklingError for pickled objects, EOFError/RuntimeError for corrupt files
                raise ModelLoadError(
                    f"cannot read {str(p)!r} with torch.load(weights_only=True): {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}. Only tensors are accepted: save "
                    "model.state_dict() (or use safetensors), not a pickled model"
                ) from exc
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ModelLoadError(f"{str(p)!r} does not hold a state dict (a mapping of names to tensors)")
        return dict(sd)

    def _load_pytorch(self, config: ModelConfig) -> Any:
        import torch

        cls = import_string(str(config.model_class))
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise ModelLoadError(f"model_class {config.model_class!r} is not a torch.nn.Module subclass")
        with stage(log, "build module", cls=config.model_class):
            try:
                model = cls(**dict(config.model_kwargs))
            except TypeError as exc:
                raise ModelLoadError(f"cannot build {config.model_class}(**{dict(config.model_kwargs)!r}): {exc}") from exc
        with stage(log, "read state dict", path=config.model_path):
            sd = self.read_state_dict(str(config.model_path), device="cpu")
        with stage(log, "load_state_dict", strict=config.strict):
            try:
                result = model.load_state_dict(sd, strict=config.strict)
            except RuntimeError as exc:
                raise ModelLoadError(
                    f"state dict {str(config.model_path)!r} does not fit {config.model_class}: {exc}"
                ) from exc
            if not config.strict and (result.missing_keys or result.unexpected_keys):
                log.warning("non-strict load of %r: missing %s, unexpected %s", config.model_id,
                            result.missing_keys, result.unexpected_keys)
        del sd
        dt = _dtype(config.dtype)
        if dt is not None:
            model = model.to(dtype=dt)
        return model.to(config.device).eval()

    def _load_huggingface(self, config: ModelConfig) -> Any:
        from transformers import AutoModel, AutoModelForCausalLM

        auto = AutoModelForCausalLM if config.auto_class == "causal_lm" else AutoModel
        kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
        if config.dtype is not None:
            kwargs["dtype"] = _dtype(config.dtype)
        with stage(log, f"{auto.__name__}.from_pretrained", path=config.model_path):
            try:
                model = auto.from_pretrained(str(config.model_path), **kwargs)
            except Exception as exc:  # every failure is a ModelLoadError, the cause chained
                # OSError (no weights), ValueError/KeyError (config), SafetensorError (truncated or
                # corrupt file), RuntimeError (shapes that do not fit the config), UnpicklingError
                # (a .bin that is not a plain state dict), MemoryError...
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ModelLoadError(
                    f"cannot load Hugging Face model from {str(config.model_path)!r}: {type(exc).__name__}: {first}"
                ) from exc
        return model.to(config.device).eval()

    def _load_split(self, config: ModelConfig) -> Any:
        from splitlearn import ModelFactory

        s1, s2 = (int(x) for x in config.split_points)  # type: ignore[union-attr]
        with stage(log, "ModelFactory.create_split_models", model_type=config.model_type,
                   part=config.component, split=(s1, s2)):
            kwargs: dict[str, Any] = {"device": config.device, "parts": (config.component,)}
            if config.low_memory is not None:
                kwargs["low_memory"] = config.low_memory
            if config.dtype is not None:
                kwargs["dtype"] = _dtype(config.dtype)
            parts = ModelFactory.create_split_models(config.model_type, str(config.model_path), s1, s2, **kwargs)
        model = dict(zip(COMPONENTS, parts, strict=True))[config.component]  # type: ignore[index]
        if model is None:
            raise ModelLoadError(f"ModelFactory returned no {config.component!r} part for {config.model_id!r}")
        return model.eval()

    # -- warmup ---------------------------------------------------------------------
    @staticmethod
    def sample_input(model: Any, config: ModelConfig) -> Any:
        """A sample input for ``model``: floats of ``warmup_input_shape`` (pytorch), token ids
        (huggingface, bottom parts) or hidden states (trunk, top parts)."""
        import torch

        g = torch.Generator().manual_seed(0)
        if config.model_type == "pytorch":
            # in the dtype the load converted the model to (float32, torch's default, otherwise)
            x = torch.randn(*config.warmup_input_shape, generator=g)  # type: ignore[misc]
            return x.to(config.device, _dtype(config.dtype) or x.dtype)
        mcfg = getattr(model, "config", None)
        if config.model_type == "huggingface" or config.component == "bottom":
            vocab = int(getattr(mcfg, "vocab_size", 0) or 0)
            if vocab <= 0:
                raise ModelLoadError(f"cannot warm up {config.model_id!r}: its config has no vocab_size")
            return torch.randint(0, vocab, (1, config.warmup_seq_len), generator=g).to(config.device)
        hidden = int(getattr(mcfg, "hidden_size", 0) or getattr(mcfg, "n_embd", 0) or 0)
        if hidden <= 0:
            raise ModelLoadError(f"cannot warm up {config.model_id!r}: its config has no hidden_size")
        dtype = next(model.parameters()).dtype
        return torch.randn(1, config.warmup_seq_len, hidden, generator=g).to(config.device, dtype)

    def warmup(self, model: Any, config: ModelConfig, cancel_event: threading.Event | None = None) -> float:
        """``config.warmup_steps`` forward passes on :meth:`sample_input`; returns seconds."""
        import torch

        t0 = time.perf_counter()
        with stage(log, "warmup", model_id=config.model_id, steps=config.warmup_steps):
            x = self.sample_input(model, config)
            with torch.inference_mode():
                for i in range(config.warmup_steps):
                    _check_cancel(cancel_event, config, f"during warmup (pass {i + 1}/{config.warmup_steps})")
                    try:
                        model(x)
                    except Exception as exc:
                        raise ModelLoadError(
                            f"warmup forward of {config.model_id!r} failed on input {tuple(x.shape)}: {exc}"
                        ) from exc
        return time.perf_counter() - t0


def split_part_keys(config: ModelConfig, loader: Any) -> set[str]:
    """The checkpoint keys the ``config.component`` part of a split model reads, worked out the
    way the incremental path plans its load (the part is built on the meta device; the
    checkpoint's headers give names and shapes; no tensor data is read). ``loader``: a
    :class:`~splitlearn.loading.ShardLoader` of ``config.model_path``."""
    from splitlearn.factory import ModelFactory, validate_split_points
    from splitlearn.models.registry import ModelRegistry

    hf_config = ModelFactory.load_config(config.model_type, loader.model_dir)
    n_layers = int(hf_config.num_hidden_layers)
    s1, s2 = validate_split_points(*config.split_points, n_layers)  # type: ignore[misc]
    start, end = {"bottom": (0, s1), "trunk": (s1, s2), "top": (s2, n_layers)}[str(config.component)]
    part_cls = ModelRegistry.get_model_class(config.model_type, str(config.component))
    _, plan = part_cls.plan_from(loader.state_dict_view(), hf_config, start, end)
    return set(plan.values())


def _part_bytes(config: ModelConfig, loader: Any) -> tuple[int, int]:
    """(bytes the part's tensors take once loaded, bytes of the largest source tensor a
    conversion holds beside them) -- from the safetensors headers."""
    from splitlearn.loading import read_safetensors_header

    keys = split_part_keys(config, loader)
    by_file: dict[str, list[str]] = {}
    for key in keys:
        by_file.setdefault(loader.file_for(key), []).append(key)
    held = transient = 0
    target = _DTYPE_CODES[config.dtype][0] if config.dtype is not None else None
    for fname, names in by_file.items():
        header = read_safetensors_header(loader.model_dir / fname)
        for name in names:
            code, nbytes = header[name]
            held += _loaded_bytes(code, nbytes, config.dtype)
            if target is not None and code in _FLOAT_CODE_BYTES and code != target:
                transient = max(transient, nbytes)
    return held, transient


def param_bytes(model: Any) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.data_ptr()
        if key in seen and key != 0:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
