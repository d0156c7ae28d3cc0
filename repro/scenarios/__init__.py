"""The scenario catalogue. Every module in this package registers its scenarios with
``repro.harness.spec.scenario`` at import. Scenario modules must not import torch,
transformers or numpy at module level: the harness parent imports them all."""

from __future__ import annotations

import importlib
import pkgutil

from repro.harness.spec import REGISTRY, Scenario


def load_catalogue() -> dict[str, Scenario]:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return dict(sorted(REGISTRY.items()))
