"""Test session helpers: scenario items named after their scenario, the build fingerprint, and
the run lock scoped to this pytest session."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--repro-load",
        choices=("quick", "full"),
        default=None,
        help="load variants with their quick parameters (fewer rounds and repetitions: the same code and "
        "checks, figures not fit to quote) or in full as the benchmark runs them. Default: quick, "
        "full when --repro-results writes a matrix cell",
    )


def load_mode(config) -> str:
    """'quick' or 'full' (see --repro-load)."""
    mode = config.getoption("--repro-load")
    if mode is None:
        mode = "full" if config.getoption("--repro-results", default=None) else "quick"
    return mode


def pytest_report_header(config):
    return f"splitrepro: load variants run {load_mode(config)} (--repro-load)"


def pytest_configure(config):
    """Serial (load) scenarios exclude the other runs of *this* session, xdist workers included
    (they inherit the controller's environment), not those of unrelated sessions on the machine.
    An explicit SPLITREPRO_LOCK_DIR wins."""
    if hasattr(config, "workerinput") or os.environ.get("SPLITREPRO_LOCK_DIR"):
        return
    path = tempfile.mkdtemp(prefix="splitrepro-locks-")
    os.environ["SPLITREPRO_LOCK_DIR"] = path
    config._splitrepro_lock_dir = path
    # torch makes an (empty) inductor cache dir in the temp dir when it is imported: give it
    # this session's directory, removed with it, rather than a stray one in /tmp
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(path, "torchinductor"))


def pytest_unconfigure(config):
    path = getattr(config, "_splitrepro_lock_dir", None)
    if path:
        os.environ.pop("SPLITREPRO_LOCK_DIR", None)
        shutil.rmtree(path, ignore_errors=True)


def pytest_pycollect_makeitem(collector, name, obj):
    """Collect the functions tests/test_scenarios.py makes, one per scenario, under the
    scenario's own name (ids like ``fork_after_threads[hazard-fork]``)."""
    if getattr(obj, "_splitrepro_scenario", None) is not None and callable(obj):
        return list(collector._genfunctions(name, obj))
    return None


@pytest.fixture(scope="session")
def quick_load(request) -> bool:
    """Whether load variants run with their quick parameters (see --repro-load)."""
    return load_mode(request.config) == "quick"


@pytest.fixture(scope="session")
def base_fingerprint():
    """The build's fingerprint, taken once per session in a clean child (cached on disk)."""
    from repro.harness.fingerprint import get_fingerprint

    return get_fingerprint()


@pytest.fixture(autouse=True)
def _share_the_machine(request):
    """Every test but the scenario items (which take the run lock themselves) holds the machine
    lock shared: a serial (load) scenario in another xdist worker then waits for the test in
    hand and runs with the machine to itself, so its figures and latency checks measure the
    code, not a neighbouring hypothesis run."""
    if request.module.__name__.endswith("test_scenarios"):
        yield
        return
    from repro.harness.runner import machine_shared

    with machine_shared():
        yield
