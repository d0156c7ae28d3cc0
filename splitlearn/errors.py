"""Exceptions of the split system. Importing this module imports neither torch nor transformers.

Every error names what is wrong (the path, the key, the layer, the shard) so that a failed load
can be told from a slow one: the original SplitLearnCore left its users unable to tell whether a
load was stuck or had failed.
"""

from __future__ import annotations


class SplitLearnError(Exception):
    """Base class of every error raised by :mod:`splitlearn`."""


class InvalidSplitPoints(SplitLearnError, ValueError):
    """Split points that do not satisfy ``0 < split_point_1 < split_point_2 < n_layers``."""


class UnknownModelType(SplitLearnError, KeyError):
    """A model family that is not registered. The message lists the known families."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class InvalidPart(SplitLearnError, ValueError):
    """A part name other than ``bottom``, ``trunk`` or ``top``."""


class ModelNotFound(SplitLearnError, FileNotFoundError):
    """The model path does not exist or holds no config / weights."""


class MissingShard(SplitLearnError, FileNotFoundError):
    """A shard named by ``model.safetensors.index.json`` is not on disk."""


class CorruptWeights(SplitLearnError, ValueError):
    """A safetensors file (or index) that is truncated, malformed, or names tensors it lacks."""


class ConfigMismatch(SplitLearnError, ValueError):
    """The config does not describe the weights (missing/unexpected tensors, wrong shapes, layer count)."""


class ModelLoadError(SplitLearnError, RuntimeError):
    """The load itself failed (a file that cannot be read, a class not importable, allocation...),
    with nothing known to be wrong with the weights. Also importable from
    :mod:`splitlearn.model_loader`, where it was first defined."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure rather than anything wrong with what was loaded:
    ``MemoryError``, torch's ``OutOfMemoryError`` (CUDA and other devices), or the plain
    ``RuntimeError`` that torch's CPU allocator raises when ``malloc`` fails ("DefaultCPUAllocator:
    can't allocate memory: you tried to allocate N bytes", torch 2.13; "not enough memory" in
    older releases). The last is told by its message, torch giving it no class of its own."""
    if isinstance(exc, MemoryError):
        return True
    if any(c.__name__ == "OutOfMemoryError" and c.__module__.split(".")[0] == "torch" for c in type(exc).__mro__):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator" in text and (
        "can't allocate memory" in text or "not enough memory" in text
    )


__all__ = [
    "is_out_of_memory",
    "SplitLearnError",
    "InvalidSplitPoints",
    "UnknownModelType",
    "InvalidPart",
    "ModelNotFound",
    "MissingShard",
    "CorruptWeights",
    "ConfigMismatch",
    "ModelLoadError",
]
