"""``load_split_model``: the one-call entry point of seed 004's stack, on local checkpoints only.

Unlike the original it changes no process-wide thread settings (the caller decides) and
downloads nothing: ``model_path`` must be a local directory written by ``save_pretrained``.
Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from splitlearn.errors import InvalidSplitPoints
from splitlearn.factory import ModelFactory

log = logging.getLogger("splitlearn.quickstart")


def load_split_model(
    model_type: str,
    split_points: Sequence[int],
    model_path: Any,
    device: Any = "cpu",
    **kw: Any,
) -> tuple[Any, Any, Any]:
    """Return ``(bottom, trunk, top)`` of ``model_type`` split at ``split_points = (s1, s2)``.

    Extra keywords go to :meth:`ModelFactory.create_split_models` (``low_memory``, ``parts``, ``dtype``).
    """
    try:
        s1, s2 = split_points
    except (TypeError, ValueError):
        raise InvalidSplitPoints(f"split_points must be two layer indices (s1, s2), got {split_points!r}") from None
    log.info("load_split_model(%s, %s, %s, device=%s)", model_type, (s1, s2), model_path, device)
    return ModelFactory.create_split_models(model_type, model_path, s1, s2, device=device, **kw)


__all__ = ["load_split_model"]
