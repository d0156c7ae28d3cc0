"""splitlearn: a small split-learning stack on PyTorch + transformers.

A causal language model (GPT-2, Qwen2, Gemma) is cut at two layer indices into a *bottom*
(embeddings + layers ``[0, s1)``), a *trunk* (layers ``[s1, s2)``) and a *top* (layers
``[s2, n)`` + final norm + LM head).

Importing this package imports neither torch nor transformers: every public name below is
resolved on first attribute access (PEP 562), and asking for one model family imports that
family's module only. This is the fix for seed 001, whose package imported every family (and
so torch and transformers) from ``__init__``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "ModelFactory": "splitlearn.factory",
    "load_split_model": "splitlearn.quickstart",
    "ModelRegistry": "splitlearn.models.registry",
    "SplitOutput": "splitlearn.models.base",
    "greedy_generate": "splitlearn.generate",
    "ShardLoader": "splitlearn.loading",
    "SplitLearnError": "splitlearn.errors",
    "InvalidSplitPoints": "splitlearn.errors",
    "UnknownModelType": "splitlearn.errors",
    "InvalidPart": "splitlearn.errors",
    "ModelNotFound": "splitlearn.errors",
    "MissingShard": "splitlearn.errors",
    "CorruptWeights": "splitlearn.errors",
    "ConfigMismatch": "splitlearn.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'splitlearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from splitlearn.errors import (  # noqa: F401
        ConfigMismatch,
        CorruptWeights,
        InvalidPart,
        InvalidSplitPoints,
        MissingShard,
        ModelNotFound,
        SplitLearnError,
        UnknownModelType,
    )
    from splitlearn.factory import ModelFactory  # noqa: F401
    from splitlearn.generate import greedy_generate  # noqa: F401
    from splitlearn.loading import ShardLoader  # noqa: F401
    from splitlearn.models.base import SplitOutput  # noqa: F401
    from splitlearn.models.registry import ModelRegistry  # noqa: F401
    from splitlearn.quickstart import load_split_model  # noqa: F401
