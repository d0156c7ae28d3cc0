"""Figures in a scenario's metrics: what the benchmark table and the matrix report read.

A scenario records figures through ``ctx.record(...)``. Three shapes are understood, and may be
mixed in one result:

* ``figures={name: {"value": 1.02, "unit": "x", "target": "<=1.05", "key": True}, ...}``:
  explicit figures; ``unit``, ``target`` (``<=``, ``<``, ``>=``, ``>`` or ``==`` and a number) and
  ``key`` (the figure the matrix shows for the scenario) are optional. A bare number is a figure
  without unit or target.
* ``targets={metric: "<=1.05"}`` beside flat metrics: targets for flat metrics.
* flat numbers (``ctx.record(overhead=1.02, rps=250.0)``), nested dicts flattened with dots.
  ``key="overhead"`` (or ``key_figure=``) names the key figure.

Whether a target is met is decided here from the value, never taken from the scenario.
Nothing here imports torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_TARGET = re.compile(r"^\s*(<=|>=|<|>|==|≤|≥)\s*([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*([^\d\s].*)?$")
_RESERVED = {"figures", "targets", "key", "key_figure"}

# Units guessed from a flat metric's name suffix, longest first.
_SUFFIX_UNITS = (
    ("_req_s", "req/s"),
    ("_rps", "req/s"),
    ("_per_s", "/s"),
    ("_ratio", "x"),
    ("_ms", "ms"),
    ("_us", "µs"),
    ("_ns", "ns"),
    ("_mib", "MiB"),
    ("_mb", "MB"),
    ("_gib", "GiB"),
    ("_bytes", "B"),
    ("_pct", "%"),
    ("_s", "s"),
    ("_x", "x"),
)


@dataclass
class Figure:
    name: str
    value: float
    unit: str = ""
    target: str | None = None
    key: bool = False

    @property
    def ok(self) -> bool | None:
        return meets(self.value, self.target)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "unit": self.unit, "target": self.target, "ok": self.ok}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def parse_target(target: str | None) -> tuple[str, float] | None:
    """``"<=1.05"`` -> ``("<=", 1.05)``; None for anything unreadable."""
    if not target or not isinstance(target, str):
        return None
    m = _TARGET.match(target)
    if not m:
        return None
    op = {"≤": "<=", "≥": ">="}.get(m.group(1), m.group(1))
    return op, float(m.group(2))


def meets(value: float | None, target: str | None) -> bool | None:
    parsed = parse_target(target)
    if parsed is None or value is None:
        return None
    op, bound = parsed
    return {
        "<=": value <= bound,
        "<": value < bound,
        ">=": value >= bound,
        ">": value > bound,
        "==": math.isclose(value, bound, rel_tol=1e-9, abs_tol=1e-12),
    }[op]


def unit_from_name(name: str) -> str:
    lowered = name.lower()
    for suffix, unit in _SUFFIX_UNITS:
        if lowered.endswith(suffix):
            return unit
    return ""


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    number = _number(value)
    if number is not None:
        out[prefix] = number
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)


def extract(metrics: Mapping[str, Any] | None) -> list[Figure]:
    """Every figure in ``metrics`` (see the module docstring), explicit ones first."""
    if not metrics:
        return []
    figures: dict[str, Figure] = {}
    explicit = metrics.get("figures")
    if isinstance(explicit, Mapping):
        for name, spec in explicit.items():
            if isinstance(spec, Mapping):
                value = _number(spec.get("value"))
                if value is None:
                    continue
                figures[str(name)] = Figure(
                    str(name),
                    value,
                    str(spec.get("unit") or unit_from_name(str(name))),
                    spec.get("target") if isinstance(spec.get("target"), str) else None,
                    bool(spec.get("key")),
                )
            else:
                value = _number(spec)
                if value is not None:
                    figures[str(name)] = Figure(str(name), value, unit_from_name(str(name)))
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        if name not in _RESERVED:
            _flatten(str(name), value, flat)
    for name, value in flat.items():
        figures.setdefault(name, Figure(name, value, unit_from_name(name)))
    targets = metrics.get("targets")
    if isinstance(targets, Mapping):
        for name, target in targets.items():
            if str(name) in figures and isinstance(target, str):
                figures[str(name)].target = target
    key = metrics.get("key") or metrics.get("key_figure")
    if isinstance(key, str) and key in figures:
        figures[key].key = True
    return list(figures.values())


def key_figure(figures: list[Figure]) -> Figure | None:
    """The figure that stands for a scenario: the one marked key, else the first with a target."""
    for fig in figures:
        if fig.key:
            return fig
    for fig in figures:
        if fig.target:
            return fig
    return None


def fmt_value(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    magnitude = abs(value)
    if magnitude == 0:
        text = "0"
    elif magnitude >= 1000:
        text = f"{value:,.0f}"
    elif magnitude >= 100:
        text = f"{value:.1f}"
    elif magnitude >= 1:
        text = f"{value:.3g}" if magnitude < 10 else f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    if not unit:
        return text
    return f"{text}{unit}" if unit in ("x", "%") else f"{text} {unit}"


def fmt_figure(fig: Figure) -> str:
    text = f"{fig.name}={fmt_value(fig.value, fig.unit)}"
    if fig.target:
        text += f" ({fig.target}{' ✓' if fig.ok else ' ✗'})"
    return text
