"""Figures in a scenario's metrics: what the benchmark table and the matrix report read.

A scenario records figures through ``ctx.record(...)``. Three shapes are understood, and may be
mixed in one result:

* ``figures={name: {"value": 1.02, "unit": "x", "target": "<=1.05", "key": True}, ...}``:
  explicit figures; ``unit``, ``target`` (``<=``, ``<``, ``>=``, ``>`` or ``==`` and a number) and
  ``key`` (the figure the matrix shows for the scenario) are optional. A bare number is a figure
  without unit or target.
* ``targets={...}``: either ``{metric: "<=1.05"}`` for flat metrics, or named figures
  ``{name: {"value": 1.02, "target": 1.05, "met": True, ...}}``. A numeric ``target`` gets its
  direction from the name (``_le_``/``within``/``max`` -> ``<=``, ``_ge_``/``min``/``at_least``
  -> ``>=``), else from the ``met`` the scenario computed. ``"claim": "10-50x"`` is a seed's
  claimed range: reported beside the figure, never counted as a target of this suite.
* ``target_X=1.5`` beside a figure ``X`` (or the one figure ending in ``_X``): an upper bound.
* flat numbers (``ctx.record(overhead=1.02, rps=250.0)``), nested dicts flattened with dots.
  ``key="overhead"`` (or ``key_figure=``) names the key figure.

Whether a target is met is decided here from the value, never taken from the scenario.
Nothing here imports torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_NUM = r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_TARGET = re.compile(rf"^\s*(<=|>=|<|>|==|≤|≥)\s*({_NUM})\s*([^\d\s].*)?$")
_RANGE = re.compile(rf"^\s*({_NUM})\s*(?:\.\.|-|–|to)\s*({_NUM})\s*[^\d\s]*\s*$")
_UPPER_WORDS = {"le", "lt", "max", "within", "under", "below", "at_most", "atmost", "upto"}
_LOWER_WORDS = {"ge", "gt", "min", "above", "over_min", "at_least", "atleast"}
_RESERVED = {"figures", "targets", "key", "key_figure"}

# Units guessed from a flat metric's name suffix, longest first.
_SUFFIX_UNITS = (
    ("_req_s", "req/s"),
    ("_rps", "req/s"),
    ("_mb_per_s", "MB/s"),
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
    claim: str | None = None  # a seed's claimed range ("10..50"): compared, not a target of ours

    @property
    def ok(self) -> bool | None:
        return meets(self.value, self.target)

    @property
    def claim_ok(self) -> bool | None:
        return meets(self.value, self.claim)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "target": self.target,
            "ok": self.ok,
            "claim": self.claim,
            "claim_ok": self.claim_ok,
        }


def percentile(xs: Iterable[float], q: float) -> float:
    """The ``q``-th percentile of ``xs`` (0-100), interpolated between the two nearest ranks
    (``q=50``: the median, the mean of the two middle samples of an even count); NaN when
    ``xs`` is empty."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = min(len(xs) - 1.0, max(0.0, q / 100 * (len(xs) - 1)))
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def parse_target(target: str | None) -> tuple[str, float] | tuple[str, float, float] | None:
    """``"<=1.05"`` -> ``("<=", 1.05)``; ``"10..50"`` -> ``("in", 10, 50)``; None if unreadable."""
    if not target or not isinstance(target, str):
        return None
    m = _TARGET.match(target)
    if m:
        op = {"≤": "<=", "≥": ">="}.get(m.group(1), m.group(1))
        return op, float(m.group(2))
    m = _RANGE.match(target)
    if m:
        lo, hi = sorted((float(m.group(1)), float(m.group(2))))
        return "in", lo, hi
    return None


def meets(value: float | None, target: str | None) -> bool | None:
    parsed = parse_target(target)
    if parsed is None or value is None:
        return None
    if parsed[0] == "in":
        return parsed[1] <= value <= parsed[2]
    op, bound = parsed[0], parsed[1]
    return {
        "<=": value <= bound,
        "<": value < bound,
        ">=": value >= bound,
        ">": value > bound,
        "==": math.isclose(value, bound, rel_tol=1e-9, abs_tol=1e-12),
    }[op]


def _num_text(x: float) -> str:
    return f"{x:g}"


def target_from_spec(name: str, spec: Mapping[str, Any], value: float | None) -> str | None:
    """The target of a ``targets`` entry written as a dict (see the module docstring)."""
    target = spec.get("target")
    if isinstance(target, str):
        return target if parse_target(target) else None
    bound = _number(target)
    if bound is not None:
        lowered = name.lower()
        words = set(re.split(r"[^a-z]+", lowered))
        words |= {w for w in ("at_most", "at_least") if w in lowered}
        upper, lower = bool(words & _UPPER_WORDS), bool(words & _LOWER_WORDS)
        if upper != lower:
            return f"{'<=' if upper else '>='}{_num_text(bound)}"
        met = spec.get("met", spec.get("ok"))
        if isinstance(met, bool) and value is not None and (value <= bound) != (value >= bound):
            return f"{'<=' if met == (value <= bound) else '>='}{_num_text(bound)}"
        return None
    return None


def claim_from_spec(spec: Mapping[str, Any]) -> str | None:
    """A seed's claimed range in a ``targets`` entry (``"claim": "10-50x"``) as ``"10..50"``."""
    claim = spec.get("claim") or spec.get("range")
    m = _RANGE.match(claim) if isinstance(claim, str) else None
    return f"{m.group(1)}..{m.group(2)}" if m else None


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


# Targets stated in the issues, for scenarios whose metrics carry none of their own: scenario ->
# {metric: target}; the first entry is the scenario's key figure. A target a scenario records
# (``figures``/``targets``) wins over these. Names that a run did not record are ignored.
DEFAULT_TARGETS: dict[str, dict[str, str]] = {
    "loading_memory": {"ratio": "<=0.5"},
    "manager_lock": {"heartbeat_max_gap_ms": "<50"},
    "harness_overhead": {"overhead_ratio": "<=1.15", "median_latency_s": "<=3"},
}
# Key figures without a target (what the matrix shows for the scenario).
DEFAULT_KEYS: dict[str, str] = {
    "manager_serving": "during_load_p95_ms",
    "imports_eager_vs_lazy": "speedup",
}


def extract(metrics: Mapping[str, Any] | None, *, scenario: str | None = None, kind: str | None = None) -> list[Figure]:
    """Every figure in ``metrics`` (see the module docstring), explicit ones first.

    ``scenario`` applies :data:`DEFAULT_TARGETS` / :data:`DEFAULT_KEYS` where the run recorded
    none. For ``kind="hazard"`` targets are dropped: a hazard variant is judged by its predicted
    outcome, and missing a fix's target is what it is there to show.
    """
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
                    target_from_spec(str(name), spec, value),
                    bool(spec.get("key")),
                    claim_from_spec(spec),
                )
            else:
                value = _number(spec)
                if value is not None:
                    figures[str(name)] = Figure(str(name), value, unit_from_name(str(name)))
    targets = metrics.get("targets")
    flat_targets: dict[str, str] = {}
    if isinstance(targets, Mapping):
        for name, spec in targets.items():
            name = str(name)
            if isinstance(spec, str):
                flat_targets[name] = spec
            elif isinstance(spec, Mapping):
                value = _number(spec.get("value"))
                target = target_from_spec(name, spec, value)
                if value is not None and name not in figures:
                    figures[name] = Figure(
                        name,
                        value,
                        str(spec.get("unit") or unit_from_name(name)),
                        target,
                        bool(spec.get("key")),
                        claim_from_spec(spec),
                    )
                elif target:
                    flat_targets[name] = target
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        if name not in _RESERVED:
            _flatten(str(name), value, flat)
    bounds = {n[len("target_") :]: v for n, v in flat.items() if n.startswith("target_")}
    for name, value in flat.items():
        if not name.startswith("target_"):
            figures.setdefault(name, Figure(name, value, unit_from_name(name)))
    for name, target in flat_targets.items():
        if name in figures and not figures[name].target:
            figures[name].target = target
    for stem, bound in bounds.items():
        match = [n for n in flat if n == stem] or [
            n for n in flat if n.endswith("_" + stem) and not n.startswith("target_")
        ]
        if len(match) == 1 and not figures[match[0]].target:
            figures[match[0]].target = f"<={_num_text(bound)}"
    defaults = DEFAULT_TARGETS.get(scenario or "", {})
    for name, target in defaults.items():
        if name in figures and not figures[name].target:
            figures[name].target = target
    key = metrics.get("key") or metrics.get("key_figure")
    if not (isinstance(key, str) and key in figures) and not any(f.key for f in figures.values()):
        key = next((n for n in defaults if n in figures), None) or DEFAULT_KEYS.get(scenario or "")
    if isinstance(key, str) and key in figures:
        figures[key].key = True
    if kind == "hazard":
        for fig in figures.values():
            fig.target = None
    return list(figures.values())


def key_figure(figures: list[Figure]) -> Figure | None:
    """The figure that stands for a scenario: the one marked key, else the first with a target."""
    for fig in figures:
        if fig.key:
            return fig
    for fig in figures:
        if fig.target:
            return fig
    for fig in figures:
        if fig.claim:
            return fig
    return None


def fmt_value(value: float | None, unit: str = "", target: str | None = None) -> str:
    """``value`` to about three significant digits, with its unit. Given the ``target`` it is
    judged against, as many more digits as it takes for the text to be judged alike: a median of
    1.0519 against ``<=1.05`` reads 1.052, not 1.05."""
    if value is None:
        return "–"
    text = _digits(value)
    met = meets(value, target)
    if met is not None:
        for digits in range(4, 10):
            if meets(float(text.replace(",", "")), target) == met:
                break
            text = f"{value:.{digits}g}"
    if not unit:
        return text
    return f"{text}{unit}" if unit in ("x", "%") else f"{text} {unit}"


def _digits(value: float) -> str:
    magnitude = abs(value)
    if magnitude == 0:
        return "0"
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100 or 10 <= magnitude < 100:
        return f"{value:.1f}"
    return f"{value:.3g}"


def fmt_figure(fig: Figure) -> str:
    text = f"{fig.name}={fmt_value(fig.value, fig.unit, fig.target)}"
    if fig.target:
        text += f" ({fig.target}{' ✓' if fig.ok else ' ✗'})"
    if fig.claim:
        text += f" (claim {fig.claim}{' ✓' if fig.claim_ok else ' ✗'})"
    return text
