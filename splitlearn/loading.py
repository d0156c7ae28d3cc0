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

from splitlearn.errors import CorruptWeights, MissingShard, ModelNotFound

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
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
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
        from safetensors import safe_open

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
            except Exception as exc:  # SafetensorError and friends
                raise CorruptWeights(
                    f"{path} is not a valid safetensors file (truncated or corrupt; {path.stat().st_size} bytes): {exc}"
                ) from exc
            self._handles[fname] = handle
            return handle

    def file_for(self, key: str) -> str:
        try:
            return self.weight_map[key]
        except KeyError:
            raise KeyError(f"tensor {key!r} is not in the checkpoint {self.model_dir}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape recorded in the file header (reads no tensor data)."""
        handle = self._handle(self.file_for(key))
        try:
            return tuple(handle.get_slice(key).get_shape())
        except Exception as exc:
            raise CorruptWeights(f"{self.model_dir / self.file_for(key)} does not hold tensor {key!r}: {exc}") from exc

    def get_tensor(self, key: str, dtype: Any = None):
        """Read one tensor. With ``dtype`` (floating tensors only), the tensor is converted and
        the file is read through a handle of its own that is dropped at once, so the pages of
        the source tensor are unmapped instead of staying resident until :meth:`close`."""
        fname = self.file_for(key)
        handle = self._handle(fname)
        try:
            if dtype is None:
                return handle.get_tensor(key)
            if handle.get_slice(key).get_dtype() not in _FLOAT_DTYPES:
                return handle.get_tensor(key)
            from safetensors import safe_open

            with safe_open(str(self.model_dir / fname), framework="pt", device="cpu") as transient:
                source = transient.get_tensor(key)
                converted = source.to(dtype)
                del source
            return converted
        except Exception as exc:
            raise CorruptWeights(f"cannot read tensor {key!r} from {self.model_dir / fname}: {exc}") from exc

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


__all__ = ["ShardLoader", "LazyStateDict", "resolve_model_dir", "SAFE_WEIGHTS_NAME", "SAFE_WEIGHTS_INDEX_NAME"]
