"""Test session helpers: scenario items named after their scenario, and the build fingerprint."""

from __future__ import annotations

import pytest


def pytest_pycollect_makeitem(collector, name, obj):
    """Collect the functions tests/test_scenarios.py makes, one per scenario, under the
    scenario's own name (ids like ``fork_after_threads[hazard-fork]``)."""
    if getattr(obj, "_splitrepro_scenario", None) is not None and callable(obj):
        return list(collector._genfunctions(name, obj))
    return None


@pytest.fixture(scope="session")
def base_fingerprint():
    """The build's fingerprint, taken once per session in a clean child (cached on disk)."""
    from repro.harness.fingerprint import get_fingerprint

    return get_fingerprint()
