"""Registry of model families, resolved lazily by module path.

Registering a family stores only the dotted path of its module; the module (and with it torch
and transformers) is imported the first time one of its part classes is asked for, and only
that family's module. A family module exposes ``PART_CLASSES = {"bottom": ..., "trunk": ...,
"top": ...}``.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

from splitlearn.errors import InvalidPart, UnknownModelType

PARTS = ("bottom", "trunk", "top")


class ModelRegistry:
    _modules: dict[str, str] = {
        "gpt2": "splitlearn.models.gpt2",
        "qwen2": "splitlearn.models.qwen2",
        "gemma": "splitlearn.models.gemma",
    }
    _lock = threading.Lock()

    @classmethod
    def register(cls, model_type: str, module_path: str) -> None:
        """Register (or re-point) a family by the dotted path of its module; nothing is imported."""
        with cls._lock:
            cls._modules[str(model_type).lower()] = module_path

    @classmethod
    def known(cls) -> list[str]:
        return sorted(cls._modules)

    @classmethod
    def is_registered(cls, model_type: str) -> bool:
        return isinstance(model_type, str) and model_type.lower() in cls._modules

    # seed 004 spelled it this way
    is_model_registered = is_registered

    @classmethod
    def _normalise(cls, model_type: Any) -> str:
        if not cls.is_registered(model_type):
            raise UnknownModelType(f"unknown model type {model_type!r}; known model types: {', '.join(cls.known())}")
        return model_type.lower()

    @classmethod
    def family_module(cls, model_type: str):
        """Import and return the module of one family (only that one)."""
        return importlib.import_module(cls._modules[cls._normalise(model_type)])

    @classmethod
    def get_model_class(cls, model_type: str, part: str) -> type:
        family = cls._normalise(model_type)
        if part not in PARTS:
            raise InvalidPart(f"unknown part {part!r}; parts are: {', '.join(PARTS)}")
        module = cls.family_module(family)
        try:
            return module.PART_CLASSES[part]
        except (AttributeError, KeyError) as exc:
            raise UnknownModelType(
                f"module {module.__name__} registered for {family!r} defines no {part!r} part class"
            ) from exc

    @classmethod
    def get_part_classes(cls, model_type: str) -> tuple[type, type, type]:
        return tuple(cls.get_model_class(model_type, p) for p in PARTS)  # type: ignore[return-value]
