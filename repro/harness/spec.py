"""The scenario contract: outcomes, variants, scenarios, and the view of a build that
expectations are written against.

Nothing here imports torch: the harness parent loads the whole catalogue through this module.

A scenario is a module-level function ``fn(ctx)`` run in a fresh interpreter (see
``repro.harness.context``) plus a declarative spec::

    @scenario(
        name="fork_after_threads",
        seed="002",
        claims=("002-fork-deadlock",),
        variants=[
            hazard("fork", params={"method": "fork"}, expect=gomp_fork_hang),
            fix("spawn", params={"method": "spawn"}),
        ],
    )
    def fork_after_threads(ctx): ...

``expect`` is an Outcome, a collection of Outcomes, or a callable taking a :class:`Build`
and returning either of those or ``(outcomes, reason)``. Fix variants default to PASS.
"""

from __future__ import annotations

import enum
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class Outcome(str, enum.Enum):
    PASS = "PASS"  # the scenario ran to the end and its own checks held
    FAIL = "FAIL"  # the scenario's own check failed (AssertionError / ctx.fail)
    ERROR = "ERROR"  # an exception escaped the scenario (traceback in evidence)
    CRASH = "CRASH"  # killed by a signal, aborted, or exited without writing a result
    HANG = "HANG"  # the whole process tree is quiescent in untimed blocking waits
    TIMEOUT = "TIMEOUT"  # still busy (or in timed waits) at the hard deadline
    SKIP = "SKIP"  # not applicable on this build (requirement missing)

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


KINDS = ("hazard", "fix", "load", "probe")


def _as_outcomes(value: Any) -> frozenset[Outcome]:
    if isinstance(value, (Outcome, str)):
        return frozenset({Outcome(value)})
    return frozenset(Outcome(v) for v in value)


class Build:
    """What an expectation sees: the build fingerprint plus the variant's environment.

    ``fp`` is the dict produced by :func:`repro.harness.fingerprint.collect` in a child
    interpreter; ``env`` is the environment the variant sets for its child.
    """

    def __init__(self, fp: Mapping[str, Any], env: Mapping[str, str] | None = None):
        self.fp = dict(fp)
        self.env = dict(env or {})

    def __getitem__(self, key: str) -> Any:
        return self.fp.get(key)

    @property
    def python(self) -> tuple[int, ...]:
        return tuple(int(p) for p in str(self.fp.get("python", "0.0.0")).split(".")[:3] if p.isdigit())

    @property
    def torch(self) -> str | None:
        return self.fp.get("torch")

    @property
    def linux(self) -> bool:
        return self.fp.get("system") == "Linux"

    @property
    def cpus(self) -> int:
        return int(self.fp.get("cpu_count") or 1)

    @property
    def cuda(self) -> bool:
        return bool(self.fp.get("cuda"))

    @property
    def openmp(self) -> set[str]:
        """OpenMP runtimes loaded after ``import torch`` (threadpoolctl prefixes: libgomp, libiomp, libomp)."""
        return set(self.fp.get("openmp_runtimes") or ())

    @property
    def gomp(self) -> bool:
        """torch's intra-op pool runs on GNU libgomp (the PyPI Linux wheels)."""
        return self.fp.get("torch_parallel_backend") == "OpenMP" and "libgomp" in self.openmp

    @property
    def mkl_build(self) -> bool:
        """pip's dynamic MKL (mkl, intel-openmp, mkl-service) is installed beside torch."""
        return bool(self.fp.get("mkl_pip"))

    @property
    def intra_threads(self) -> int:
        """Intra-op threads a fresh child would get: OMP_NUM_THREADS from the variant's env
        when set, else torch's default on this build."""
        value = self.env.get("OMP_NUM_THREADS")
        if value and value.strip().isdigit():
            return int(value)
        return int(self.fp.get("torch_num_threads") or 1)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return (
            f"Build(python={self.fp.get('python')}, torch={self.torch}, openmp={sorted(self.openmp)}, env={self.env})"
        )


Expectation = Any  # Outcome | Iterable[Outcome] | Callable[[Build], ...]


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str = "fix"
    params: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    expect: Expectation = Outcome.PASS
    timeout: float | None = None  # None: the scenario's timeout
    markers: tuple[str, ...] = ()  # extra pytest markers, e.g. "slow", "cuda"
    requires: Callable[[Build], str | None] | None = None  # returns a skip reason, or None
    doc: str = ""
    # Overrides of ``params`` for a quick run (the test suite's default for load variants): the
    # same code and the same checks on fewer samples (rounds, repetitions, seconds). Benchmarks,
    # matrix cells and ``repro run`` (unless ``--quick``) run ``params`` as they are.
    quick: Mapping[str, Any] = field(default_factory=dict)
    # Where a HANG of this (hazard) variant must be: regular expressions that must each match
    # the stacks the harness took of the hung tree (every thread of every process). One written
    # ``native:PATTERN`` is only sought where native frames were taken (py-spy --native); build
    # Python-frame patterns with :func:`frame`, which matches py-spy's and faulthandler's
    # formats. A HANG whose stacks miss one is an ERROR ("hung elsewhere"), not the hazard.
    # Patterns grouped by :func:`together` must all match in the stacks of one process (the
    # child's op *and* libgomp in the same hung child, not each somewhere in the tree).
    hang_where: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"variant {self.name!r}: kind must be one of {KINDS}, not {self.kind!r}")
        if isinstance(self.hang_where, str):
            raise TypeError(f"variant {self.name!r}: hang_where must be a tuple of patterns, not one string")
        for entry in self.hang_where:
            for pattern in entry if isinstance(entry, Together) else (entry,):
                if not isinstance(pattern, str) or isinstance(pattern, Together):
                    raise TypeError(
                        f"variant {self.name!r}: hang_where entries are patterns or together(patterns), not {pattern!r}"
                    )
                try:
                    re.compile(pattern.removeprefix("native:"))
                except re.error as exc:
                    raise ValueError(
                        f"variant {self.name!r}: hang_where {pattern!r} is not a regular expression: {exc}"
                    ) from None
        unknown = sorted(set(self.quick) - set(self.params))
        if unknown:
            raise ValueError(f"variant {self.name!r}: quick overrides params it does not have: {unknown}")

    def params_for(self, quick: bool = False) -> dict[str, Any]:
        """The parameters of a run: ``params``, with the ``quick`` overrides (and ``quick: True``
        so that the record says so) when a quick run is asked for and the variant has any."""
        if quick and self.quick:
            return {**self.params, **self.quick, "quick": True}
        return dict(self.params)

    def expected(self, build: Build) -> tuple[frozenset[Outcome], str]:
        """The outcomes this variant may show on ``build``, and why."""
        value = self.expect
        reason = ""
        if callable(value) and not isinstance(value, (Outcome, str)):
            value = value(build)
        # (outcomes, reason): the second item is free text, not an outcome name. (Outcome is a
        # str subclass, so "is the first item a str" cannot tell the two shapes apart.)
        if (
            isinstance(value, tuple)
            and len(value) == 2
            and isinstance(value[1], str)
            and value[1] not in Outcome._value2member_map_
        ):
            value, reason = value
        return _as_outcomes(value), reason

    def skip_reason(self, build: Build) -> str | None:
        return self.requires(build) if self.requires else None


class Pattern(str):
    """A ``hang_where`` regular expression with a readable name (``label``) for messages."""

    label: str


class Together(tuple):
    """A ``hang_where`` entry: patterns that must all match in the stacks of one process."""

    @property
    def label(self) -> str:
        return " and ".join(pattern_label(p) for p in self) + " (in one process)"


def together(*patterns: str) -> Together:
    """Group ``hang_where`` patterns that must be found in the same process: ``together(
    frame("x.py", "child_op"), "native:libgomp")`` is the child's op waiting in libgomp, where the
    two patterns alone would also match the op in one process and libgomp in another."""
    if len(patterns) < 2:
        raise ValueError("together() groups two patterns or more; a single pattern goes in hang_where as it is")
    return Together(patterns)


def pattern_label(pattern: str | Together) -> str:
    return getattr(pattern, "label", pattern)


def frame(file: str, func: str) -> str:
    """A ``hang_where`` pattern for a Python frame: ``func`` running in a file whose path ends
    with ``file``, as py-spy writes it (``Queue.get (multiprocessing/queues.py:103)``) and as
    faulthandler does (``File ".../multiprocessing/queues.py", line 103 in get``)."""
    f, fn = re.escape(file), re.escape(func)
    out = Pattern(rf"(?:^|[\s.]){fn} \((?:\S*/)?{f}:\d+\)|[/\"]{f}\", line \d+ in {fn}$")
    out.label = f"a frame of {func} in {file}"
    return out


def hazard(name: str, **kw: Any) -> Variant:
    """The broken pattern. Its ``expect`` must say where it reproduces (required)."""
    if "expect" not in kw:
        raise TypeError(f"hazard variant {name!r} needs an explicit expect=")
    return Variant(name, kind="hazard", **kw)


def fix(name: str, **kw: Any) -> Variant:
    """A fix: must PASS on every build unless ``expect`` says otherwise."""
    return Variant(name, kind="fix", **kw)


def load(name: str, **kw: Any) -> Variant:
    """A load/benchmark variant: PASS, with figures in its metrics."""
    return Variant(name, kind="load", **kw)


def probe(name: str, **kw: Any) -> Variant:
    """An observation run (records what a build does; expectation usually PASS)."""
    return Variant(name, kind="probe", **kw)


@dataclass
class Scenario:
    name: str
    func: str  # "module:qualname", imported in the child
    variants: list[Variant]
    seed: str | None = None  # seed document number, e.g. "002"
    claims: tuple[str, ...] = ()  # claim ids of repro/claims.py, e.g. "002-fork-deadlock"
    doc: str = ""
    timeout: float = 60.0  # hard deadline per variant, seconds
    serial: bool = False  # every variant runs alone (load variants always do: see serial_for)
    markers: tuple[str, ...] = ()
    hang_window: float | None = None  # seconds of quiescence that make a HANG (None: the harness default, 1 s)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        known = ", ".join(v.name for v in self.variants)
        raise KeyError(f"scenario {self.name!r} has no variant {name!r} (known: {known})")

    def timeout_for(self, variant: Variant) -> float:
        return float(variant.timeout if variant.timeout is not None else self.timeout)

    def serial_for(self, variant: Variant) -> bool:
        """Whether the variant runs alone: every load variant does (its figures are measured),
        and every variant of a ``serial`` scenario."""
        return self.serial or variant.kind == "load"


REGISTRY: dict[str, Scenario] = {}


def scenario(
    *,
    name: str,
    variants: Iterable[Variant],
    seed: str | None = None,
    claims: Iterable[str] = (),
    timeout: float = 60.0,
    serial: bool = False,
    markers: Iterable[str] = (),
    hang_window: float | None = None,
) -> Callable[[Callable], Callable]:
    """Register ``fn`` as a scenario. ``fn`` must be importable at module level."""

    def deco(fn: Callable) -> Callable:
        if fn.__qualname__ != fn.__name__:
            raise TypeError(f"scenario {name!r}: {fn.__qualname__} must be a module-level function")
        vs = list(variants)
        names = [v.name for v in vs]
        if len(set(names)) != len(names):
            raise ValueError(f"scenario {name!r}: duplicate variant names {names}")
        if name in REGISTRY and REGISTRY[name].func != f"{fn.__module__}:{fn.__name__}":
            raise ValueError(f"scenario name {name!r} registered twice")
        REGISTRY[name] = Scenario(
            name=name,
            func=f"{fn.__module__}:{fn.__name__}",
            variants=vs,
            seed=seed,
            claims=tuple(claims),
            doc=inspect.cleandoc(fn.__doc__ or ""),
            timeout=timeout,
            serial=serial,
            markers=tuple(markers),
            hang_window=hang_window,
        )
        return fn

    return deco
