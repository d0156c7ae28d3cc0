"""Reading safetensors checkpoints a tensor at a time: the low-memory (incremental) path.

:class:`ShardLoader` reads a model directory saved by ``save_pretrained``: one
``model.safetensors`` or shards listed by ``model.safetensors.index.json``. It presents the
checkpoint as a lazy mapping (:meth:`ShardLoader.state_dict_view`) whose keys come from the
index (or the single file's header) and whose values are read from the right shard only when
asked for, through ``safetensors.safe_open``. Every file it opens is recorded in
:attr:`ShardLoader.opened_files`, so a caller (or a test) can see that loading the trunk of a
sharded model never touched the shards that hold only the embedding or the last layers.

Pickle checkpoints (``pytorch_model.bin``) are refused: loading them executes code and reads
the whole model.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from splitlearn.errors import ConfigMismatch, CorruptWeights, MissingShard, ModelLoadError, ModelNotFound

log = logging.getLogger("splitlearn.loading")

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A local model directory, or a clear ModelNotFound (there is no hub access)."""
    directory = Path(path).expanduser()
    if not directory.exists():
        raise ModelNotFound(
            f"model path {str(path)!r} does not exist (only local directories are supported; no model hub access)"
        )
    if not directory.is_dir():
        raise ModelNotFound(f"model path {str(path)!r} is not a directory")
    if not (directory / "config.json").is_file():
        raise ModelNotFound(f"model directory {directory} has no config.json")
    return directory


def read_config(directory: str | os.PathLike) -> Any:
    """The transformers config in ``directory/config.json`` (imports transformers).

    A config that cannot be parsed or built is :class:`ConfigMismatch`; a file the OS will not
    let be read (permissions, descriptors, I/O: an ``OSError`` with an errno) is
    :class:`~splitlearn.model_loader.ModelLoadError`, with nothing known to be wrong with it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except OSError as exc:
        # transformers' own OSErrors (a file that is not JSON...) carry no errno
        error_class = ModelLoadError if exc.errno is not None else ConfigMismatch
        raise error_class(f"cannot read the config of {directory}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise ConfigMismatch(f"cannot read the config of {directory}: {type(exc).__name__}: {exc}") from exc


_MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers too


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, int]]:
    """``{tensor name: (safetensors dtype, bytes of data)}`` from the JSON header at the start of
    a safetensors file. Reads the header only, never tensor data, and imports nothing heavy.
    A malformed header is :class:`CorruptWeights`; an unreadable file raises its ``OSError``."""
    p = Path(path)
    with open(p, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CorruptWeights(f"{p} is not a valid safetensors file: {len(raw)} bytes, shorter than its header length")
        length = int.from_bytes(raw, "little")
        if length > _MAX_HEADER_BYTES:
            raise CorruptWeights(f"{p} is not a valid safetensors file: header length {length} is implausible")
        text = fh.read(length)
    try:
        header = json.loads(text)
        out: dict[str, tuple[str, int]] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            out[name] = (str(info["dtype"]), int(end) - int(start))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CorruptWeights(f"{p} is not a valid safetensors file: bad header: {type(exc).__name__}: {exc}") from exc
    return out


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size} bytes"
    except OSError as exc:
        return f"size unknown: {exc.strerror or exc}"


def _unreadable(path: Path, exc: OSError, doing: str) -> Exception:
    """The error to raise when safetensors could not open or read ``path``.

    safetensors (0.8) reports every failure to open a file as ``FileNotFoundError("No such file
    or directory")`` without an errno: a file it may not read (EACCES) and a process out of file
    descriptors (EMFILE) included. Opening the file here recovers the real reason, chained as the
    cause: :class:`MissingShard` if the file is really gone, else
    :class:`~splitlearn.model_loader.ModelLoadError` -- never :class:`CorruptWeights`, since
    nothing is known to be wrong with the file's contents."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError as real:
        error: Exception = MissingShard(f"{doing} {path}: it is missing ({real.strerror})")
        error.__cause__ = real
        return error
    except OSError as real:
        error = ModelLoadError(f"{doing} {path}: {type(real).__name__}: [Errno {real.errno}] {real.strerror or real}")
        error.__cause__ = real
        return error
    # The file opens now: the failure was safetensors' own (a failed memory map, a descriptor
    # limit reached only for a moment...). Its message may not be accurate; report it as is.
    error = ModelLoadError(f"{doing} {path}: {type(exc).__name__}: {exc} (the file exists and can be opened)")
    error.__cause__ = exc
    return error


class ShardLoader:
    """Lazy, recorded access to the tensors of a safetensors checkpoint (single file or sharded)."""

    def __init__(self, model_dir: str | os.PathLike, *, check_shards: bool = True) -> None:
        self.model_dir = resolve_model_dir(model_dir)
        self.opened_files: list[str] = []  # file names, in the order first opened
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()
        index_path = self.model_dir / SAFE_WEIGHTS_INDEX_NAME
        single_path = self.model_dir / SAFE_WEIGHTS_NAME
        if index_path.is_file():
            self.is_sharded = True
            self.weight_map = self._read_index(index_path)
        elif single_path.is_file():
            self.is_sharded = False
            self.weight_map = {key: SAFE_WEIGHTS_NAME for key in self._handle(SAFE_WEIGHTS_NAME).keys()}
        else:
            pickles = sorted(p.name for p in self.model_dir.glob("*.bin"))
            hint = f" (found {', '.join(pickles)}: pickle checkpoints are not loaded)" if pickles else ""
            raise ModelNotFound(
                f"model directory {self.model_dir} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}{hint}"
            )
        if check_shards:
            missing = [f for f in self.files if not (self.model_dir / f).is_file()]
            if missing:
                raise MissingShard(
                    f"{self.model_dir}: shard file(s) listed in {SAFE_WEIGHTS_INDEX_NAME} are missing: {', '.join(missing)}"
                )
        log.info(
            "checkpoint %s: %s, %d tensors in %d file(s)",
            self.model_dir,
            "sharded" if self.is_sharded else "single file",
            len(self.weight_map),
            len(self.files),
        )

    # ------------------------------------------------------------------ index
    def _read_index(self, index_path: Path) -> dict[str, str]:
        try:
            text = index_path.read_text(encoding="utf-8")
        except OSError as exc:  # cannot be opened or read: nothing is known to be wrong with it
            raise ModelLoadError(
                f"cannot read {index_path}: {type(exc).__name__}: [Errno {exc.errno}] {exc.strerror or exc}"
            ) from exc
        except ValueError as exc:  # not UTF-8
            raise CorruptWeights(f"cannot read {index_path}: {exc}") from exc
        try:
            index = json.loads(text)
        except ValueError as exc:
            raise CorruptWeights(f"cannot read {index_path}: {exc}") from exc
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptWeights(f"{index_path} has no weight_map")
        for key, fname in weight_map.items():
            if not isinstance(fname, str) or "/" in fname or fname in ("", ".", ".."):
                raise CorruptWeights(f"{index_path}: tensor {key!r} maps to an invalid file name {fname!r}")
        return dict(weight_map)

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    @staticmethod
    def is_sharded_model(model_dir: str | os.PathLike) -> bool:
        return (Path(model_dir) / SAFE_WEIGHTS_INDEX_NAME).is_file()

    # ------------------------------------------------------------------ files
    def _handle(self, fname: str) -> Any:
        from safetensors import SafetensorError, safe_open

        with self._lock:
            handle = self._handles.get(fname)
            if handle is not None:
                return handle
            path = self.model_dir / fname
            if not path.is_file():
                raise MissingShard(f"{self.model_dir}: shard {fname} is missing")
            log.debug("opening %s", path)
            if fname not in self.opened_files:
                self.opened_files.append(fname)
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except SafetensorError as exc:  # the header: truncated, not JSON, offsets past the end...
                raise CorruptWeights(
                    f"{path} is not a valid safetensors file (truncated or corrupt; {_size(path)}): {exc}"
                ) from exc
            except OSError as exc:
                error = _unreadable(path, exc, "cannot open")
                raise error from error.__cause__
            self._handles[fname] = handle
            return handle

    def file_for(self, key: str) -> str:
        try:
            return self.weight_map[key]
        except KeyError:
            raise KeyError(f"tensor {key!r} is not in the checkpoint {self.model_dir}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape recorded in the file header (reads no tensor data)."""
        from safetensors import SafetensorError

        handle = self._handle(self.file_for(key))
        try:
            return tuple(handle.get_slice(key).get_shape())
        except SafetensorError as exc:  # "File does not contain tensor ..."
            raise CorruptWeights(f"{self.model_dir / self.file_for(key)} does not hold tensor {key!r}: {exc}") from exc

    def get_tensor(self, key: str, dtype: Any = None):
        """Read one tensor. With ``dtype`` (floating tensors only), the tensor is converted and
        the file is read through a handle of its own that is dropped at once, so the pages of
        the source tensor are unmapped instead of staying resident until :meth:`close`.

        Errors: :class:`CorruptWeights` when safetensors rejects the file or the tensor (a
        format error); :class:`~splitlearn.model_loader.ModelLoadError` with the real cause
        chained for everything else -- the file cannot be opened or read (permissions, too many
        open files, I/O errors) or the tensor or its converted copy cannot be allocated."""
        from safetensors import SafetensorError, safe_open

        fname = self.file_for(key)
        path = self.model_dir / fname
        handle = self._handle(fname)
        try:
            if dtype is None or handle.get_slice(key).get_dtype() not in _FLOAT_DTYPES:
                return handle.get_tensor(key)
            with safe_open(str(path), framework="pt", device="cpu") as transient:
                source = transient.get_tensor(key)
                converted = source.to(dtype)
                del source
            return converted
        except SafetensorError as exc:
            raise CorruptWeights(f"cannot read tensor {key!r} from {path}: {exc}") from exc
        except OSError as exc:
            error = _unreadable(path, exc, f"cannot read tensor {key!r} from")
            raise error from error.__cause__
        except Exception as exc:  # allocation of the tensor or of its converted copy, mostly
            what = f" as {dtype}" if dtype is not None else ""
            raise ModelLoadError(
                f"cannot load tensor {key!r} from {path}{what}: {type(exc).__name__}: {exc}"
            ) from exc

    def validate_all(self) -> None:
        """Open every file's header (detects truncated or corrupt files and index entries that
        name absent tensors) without reading tensor data."""
        for fname in self.files:
            keys = set(self._handle(fname).keys())
            listed = [k for k, f in self.weight_map.items() if f == fname and k not in keys]
            if listed:
                raise CorruptWeights(
                    f"{self.model_dir / fname} lacks tensors that {SAFE_WEIGHTS_INDEX_NAME} places in it: {', '.join(listed[:5])}"
                )

    def files_for(self, keys: Any) -> list[str]:
        return sorted({self.file_for(k) for k in keys})

    def state_dict_view(self, dtype: Any = None) -> LazyStateDict:
        """A lazy mapping over the checkpoint; with ``dtype``, floating tensors are converted
        one at a time as they are read (only the requested tensors are ever materialised)."""
        return LazyStateDict(self, dtype)

    def close(self) -> None:
        """Drop the file handles (and their memory maps)."""
        with self._lock:
            self._handles.clear()

    def __enter__(self) -> ShardLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardLoader({str(self.model_dir)!r}, sharded={self.is_sharded}, opened={self.opened_files})"


class LazyStateDict(Mapping):
    """Read-only mapping of checkpoint key -> tensor, each read from its shard when accessed."""

    def __init__(self, loader: ShardLoader, dtype: Any = None) -> None:
        self._loader = loader
        self._dtype = dtype
        self.description = f"{loader.model_dir} (incremental)"

    def __getitem__(self, key: str):
        if key not in self._loader.weight_map:
            raise KeyError(key)
        return self._loader.get_tensor(key, self._dtype)

    def __contains__(self, key: object) -> bool:
        return key in self._loader.weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self._loader.weight_map)

    def __len__(self) -> int:
        return len(self._loader.weight_map)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._loader.shape(key)


__all__ = [
    "ShardLoader",
    "LazyStateDict",
    "resolve_model_dir",
    "read_config",
    "read_safetensors_header",
    "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
]
