"""One pytest item per scenario variant of the catalogue, e.g.
``tests/test_scenarios.py::fork_after_threads[hazard-fork]``.

Each item runs its variant in a fresh interpreter through the harness and passes exactly when
the observed outcome is the one expected on this build. Markers: the variant's kind
(hazard/fix/load/probe) plus its own and its scenario's markers. pytest-timeout is only a
backstop: the harness enforces each scenario's deadline itself. Load variants run with their
``quick`` parameters unless ``--repro-load full`` (or a matrix cell's ``--repro-results``) asks
for the benchmark's: the same checks on fewer samples.
"""

from __future__ import annotations

import pytest

from repro.harness.runner import run_variant
from repro.harness.spec import Build, Scenario
from repro.scenarios import load_catalogue

BACKSTOP_EXTRA_S = 600  # evidence, lock waits behind serial runs


def _marks(sc: Scenario, v) -> list:
    marks = [getattr(pytest.mark, m) for m in dict.fromkeys((v.kind, *v.markers, *sc.markers))]
    marks.append(pytest.mark.timeout(2 * sc.timeout_for(v) + BACKSTOP_EXTRA_S))
    return marks


def _make(sc: Scenario):
    params = [pytest.param(sc, v, id=f"{v.kind}-{v.name}", marks=_marks(sc, v)) for v in sc.variants]

    @pytest.mark.parametrize("scenario,variant", params)
    def test(scenario, variant, base_fingerprint, quick_load):
        build = Build(base_fingerprint, variant.env)
        reason = variant.skip_reason(build)
        if reason:
            pytest.skip(reason)
        result = run_variant(scenario, variant, build=build, quick=quick_load)
        assert result.ok, "\n" + result.summary()

    test.__name__ = test.__qualname__ = sc.name
    test.__doc__ = sc.doc
    test._splitrepro_scenario = sc.name
    return test


for _sc in load_catalogue().values():
    globals()[_sc.name] = _make(_sc)
del _sc
