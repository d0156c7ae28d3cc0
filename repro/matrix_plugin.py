"""pytest plugin that writes one matrix cell's results: ``pytest -p repro.matrix_plugin --repro-results F``.

Every scenario variant that a test runs through :func:`repro.harness.runner.run_variant` is
recorded with its outcome, prediction, figures and evidence summary; variants that pytest
skipped are recorded with the skip reason; the whole catalogue is listed so that the report can
tell a variant that did not run from one that passed. The build's fingerprint comes from a clean
child (``python -m repro env --json``), as the harness takes it. Works under pytest-xdist: the
results travel to the controller in the reports' ``user_properties``.

The file (schema ``splitrepro.cell/1``) is what :mod:`repro.matrix` merges.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from repro.harness.report import write_atomic
from repro.matrix import RUNNING_SUFFIX, source_stamp, stopped_early

SCHEMA = "splitrepro.cell/1"
RESULT_KEY = "splitrepro_result"
CASE_KEY = "splitrepro_case"
# Evidence keys that are large and only useful in the run directory, not in a matrix file.
_BULKY_EVIDENCE = ("stacks", "threads", "faulthandler")
_MAX_TEXT = 4000


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("splitrepro-matrix")
    group.addoption("--repro-results", default=None, help="write this cell's scenario results (JSON) to this file")
    group.addoption("--repro-cell", default=None, help="the cell's name (default: py<X.Y>-<build>)")


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--repro-results", default=None)
    if path:
        config.pluginmanager.register(CellRecorder(config, Path(path)), "splitrepro-cell-recorder")


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).replace(microsecond=0).isoformat()


def _trim(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _MAX_TEXT:
        return "…" + value[-_MAX_TEXT:]
    if isinstance(value, dict):
        return {k: _trim(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_trim(v) for v in value[:200]]
    return value


def slim_result(data: dict[str, Any]) -> dict[str, Any]:
    """A run result without the bulky evidence (stacks stay in the run directory)."""
    out = dict(data)
    evidence = dict(out.get("evidence") or {})
    for key in _BULKY_EVIDENCE:
        if key in evidence:
            value = evidence.pop(key)
            evidence[f"{key}_count"] = len(value) if hasattr(value, "__len__") else 1
    out["evidence"] = _trim(evidence)
    out.pop("fingerprint", None)  # once per cell, not per result
    return _trim(out)


def _item_scenario(nodeid: str) -> str:
    """The scenario a ``...::<scenario>[<kind>-<variant>]`` item (tests/test_scenarios.py) runs."""
    return nodeid.rpartition("::")[2].partition("[")[0]


def _machine() -> dict[str, Any]:
    try:
        from repro.bench import machine_info

        return machine_info()
    except Exception as exc:  # noqa: BLE001
        return {"error": repr(exc)}


def narrowed(config: pytest.Config) -> list[str]:
    """What made this run select fewer tests than the whole suite: paths or node ids given,
    ``-k``, ``-m``, ``--deselect``, ``--ignore``, ``--lf``/``--sw``. Empty for a full run."""
    opt = config.option
    why = []
    paths = list(getattr(opt, "file_or_dir", None) or [])
    if paths:
        # naming what a bare `pytest` runs anyway (`pytest tests`, `pytest .`) narrows nothing
        root = Path(config.rootpath).resolve()
        whole = {(root / t).resolve() for t in config.getini("testpaths") or []}
        given = {(Path(config.invocation_params.dir) / p).resolve() for p in paths if "::" not in p}
        if len(given) < len(paths) or given not in (whole, {root}):
            why.append("paths: " + " ".join(paths))
    for name, flag in (("keyword", "-k"), ("markexpr", "-m")):
        value = getattr(opt, name, "")
        if value:
            why.append(f"{flag} {value}")
    for name, flag in (("deselect", "--deselect"), ("ignore", "--ignore"), ("ignore_glob", "--ignore-glob")):
        if getattr(opt, name, None):
            why.append(f"{flag} {' '.join(getattr(opt, name))}")
    for name, flag in (("lf", "--lf"), ("stepwise", "--sw")):
        if getattr(opt, name, False):
            why.append(flag)
    return why


def _stopped_early_file(path: Path) -> str:
    """Why the cell file at ``path`` is from a run that stopped early, or '' (finished, or not
    readable as a cell file: kept, as a finished one is)."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return ""
    run = data.get("pytest") if isinstance(data, dict) else None
    return stopped_early(run) if isinstance(run, dict) else ""


class CellRecorder:
    def __init__(self, config: pytest.Config, path: Path) -> None:
        self.config = config
        self.path = path
        self.is_worker = hasattr(config, "workerinput")
        self.started = time.time()
        self.source = source_stamp()  # at the start: what the run imported
        self.captured: dict[str, list[dict[str, Any]]] = {}
        self.current: str | None = None
        self.results: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.outcomes: dict[str, str] = {}
        self.failed: dict[str, bool] = {}  # nodeid of a failed report -> whether it names a scenario case
        self._ids: dict[str, tuple[str, str, str]] | None = None
        self.marker: Path | None = None  # written when the session starts (not for --help)
        self._wrap_runner()

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if not self.is_worker:
            self.marker = self._mark_running()

    def _mark_running(self) -> Path | None:
        """Leave ``<cell file>.running`` beside the cell file while the run goes on; a run that is
        killed outright (SIGKILL, out of memory, the machine gone) cannot remove it, and the report
        then says the cell file it finds is older than a run that never finished. Only where the
        file's name is known before the run (a file path, or --repro-cell / REPRO_CELL)."""
        path = self.path
        if path.is_dir() or str(path).endswith(os.sep) or not path.suffix:
            cell = self.config.getoption("--repro-cell") or os.environ.get("REPRO_CELL")
            if not cell:
                return None
            path = path / f"{cell}.json"
        marker = path.with_name(path.name + RUNNING_SUFFIX)
        info = {"pid": os.getpid(), "host": platform.node(), "started": _iso(self.started), "source": self.source}
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(info) + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"splitrepro: could not write {marker}: {exc}", file=sys.stderr)
            return None
        return marker

    # -- capture (in the process that runs the tests) -------------------------------------
    def _wrap_runner(self) -> None:
        try:
            from repro.harness import runner
        except ImportError:  # the harness is not there: nothing to capture
            return
        original = runner.run_variant
        if getattr(original, "_splitrepro_wrapped", False):
            return
        recorder = self

        def run_variant(*args: Any, **kwargs: Any):
            result = original(*args, **kwargs)
            try:
                data = result.to_dict() if hasattr(result, "to_dict") else json.loads(result.to_json())
                recorder.captured.setdefault(recorder.current or "", []).append(data)
            except Exception as exc:  # noqa: BLE001 - never break the test over the record
                print(f"splitrepro: could not record a result: {exc!r}", file=sys.stderr)
            return result

        run_variant._splitrepro_wrapped = True  # type: ignore[attr-defined]
        run_variant.__wrapped__ = original  # type: ignore[attr-defined]
        run_variant.__doc__ = original.__doc__
        runner.run_variant = run_variant

    def _catalogue_ids(self) -> dict[str, tuple[str, str, str]]:
        if self._ids is None:
            self._ids = {}
            try:
                from repro.scenarios import load_catalogue

                for sc in load_catalogue().values():
                    for v in sc.variants:
                        for sep in (":", "-", "/", "."):
                            self._ids.setdefault(f"{sc.name}{sep}{v.name}", (sc.name, v.name, v.kind))
            except Exception:  # noqa: BLE001
                pass
        return self._ids

    def _case(self, item: pytest.Item) -> dict[str, str] | None:
        """Which scenario variant a test item is about, from its parameters or its id."""
        if not hasattr(item, "_splitrepro_case"):
            item._splitrepro_case = self._find_case(item)  # type: ignore[attr-defined]
        return item._splitrepro_case  # type: ignore[attr-defined]

    def _find_case(self, item: pytest.Item) -> dict[str, str] | None:
        callspec = getattr(item, "callspec", None)
        if callspec is None:
            return None
        scenario = variant = kind = None
        try:
            from repro.harness.spec import Scenario, Variant
        except ImportError:
            Scenario = Variant = ()  # type: ignore[assignment]
        for value in callspec.params.values():
            values = value if isinstance(value, (tuple, list)) else (value,)
            for v in values:
                if Scenario and isinstance(v, Scenario):
                    scenario = v.name
                elif Variant and isinstance(v, Variant):
                    variant, kind = v.name, v.kind
        if scenario and variant:
            return {"scenario": scenario, "variant": variant, "kind": kind or ""}
        ids = self._catalogue_ids()
        for part in [callspec.id, *callspec.id.split("-")]:
            if part in ids:
                s, v, k = ids[part]
                return {"scenario": s, "variant": v, "kind": k}
        for value in callspec.params.values():
            if isinstance(value, str) and value in ids:
                s, v, k = ids[value]
                return {"scenario": s, "variant": v, "kind": k}
        return None

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None):
        self.current = item.nodeid
        try:
            yield
        finally:
            self.current = None

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        case = self._case(item)
        for data in self.captured.pop(item.nodeid, []):
            # Only the run of the item's own catalogue variant is the cell's result; tests of the
            # harness itself (which run scenarios of their own) are not.
            if case and (data.get("scenario"), data.get("variant")) == (case["scenario"], case["variant"]):
                item.user_properties.append((RESULT_KEY, slim_result(data)))
        if call.when == "setup" and case:
            item.user_properties.append((CASE_KEY, case))
        yield

    # -- collect (in the controller, or the only process) ---------------------------------------
    _RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.is_worker:
            return
        if report.failed:
            outcome = "failed" if report.when == "call" else "error"
        else:
            outcome = "skipped" if report.skipped else "passed"
        if report.failed:
            case = any(k == CASE_KEY for k, _ in report.user_properties)
            self.failed[report.nodeid] = self.failed.get(report.nodeid, False) or case
        prior = self.outcomes.get(report.nodeid)
        if prior is None or self._RANK[outcome] > self._RANK[prior]:
            self.outcomes[report.nodeid] = outcome
        if report.skipped and report.when in ("setup", "call"):
            case = dict(next((v for k, v in report.user_properties if k == CASE_KEY), None) or {})
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            if case:
                case["reason"] = str(reason).removeprefix("Skipped: ")
                case["nodeid"] = report.nodeid
                self.skipped.append(case)
        if report.when != "teardown":
            return
        for key, value in report.user_properties:
            if key == RESULT_KEY and isinstance(value, dict):
                value = dict(value)
                value["nodeid"] = report.nodeid
                self.results.append(value)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.is_worker:
            return
        self.write(int(exitstatus), session.testscollected)
        # only once the results are written: a run that could not write them leaves the marker,
        # and the report calls the older file it finds incomplete
        if self.marker is not None:
            self.marker.unlink(missing_ok=True)

    def write(self, exitstatus: int, collected: int | None = None) -> None:
        fingerprint: dict[str, Any] = {}
        fingerprint_error = None
        if os.environ.get("SPLITREPRO_CELL_FINGERPRINT", "1") != "0":
            try:
                from repro.harness.fingerprint import get_fingerprint

                fingerprint = get_fingerprint(sys.executable)
            except Exception as exc:  # noqa: BLE001
                fingerprint_error = repr(exc)[:2000]
        catalogue = []
        try:
            from repro.scenarios import load_catalogue

            for sc in load_catalogue().values():
                for v in sc.variants:
                    catalogue.append(
                        {
                            "scenario": sc.name,
                            "variant": v.name,
                            "kind": v.kind,
                            "claims": list(sc.claims),
                            "seed": sc.seed,
                        }
                    )
        except Exception as exc:  # noqa: BLE001
            catalogue_error = repr(exc)[:2000]
        else:
            catalogue_error = None
        # scenario items that failed before their run gave a result (a fixture, the harness, a
        # pytest-timeout; a crashed xdist worker's report names no case, only the scenario's item)
        recorded = {r.get("nodeid") for r in self.results}
        names = {c["scenario"] for c in catalogue}
        unrecorded = sorted(
            n for n, case in self.failed.items() if n not in recorded and (case or _item_scenario(n) in names)
        )
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        build = fingerprint.get("build") or os.environ.get("SPLITREPRO_BUILD") or ""
        cell = (
            self.config.getoption("--repro-cell")
            or os.environ.get("REPRO_CELL")
            or (f"py{platform.python_version_tuple()[0]}.{platform.python_version_tuple()[1]}-{build or 'unknown'}")
        )
        data = {
            "schema": SCHEMA,
            "cell": cell,
            "build": build,
            "python": platform.python_version(),
            "machine": _machine(),
            "source": self.source,
            "started": _iso(self.started),
            "wall_seconds": round(time.time() - self.started, 1),
            "pytest": {
                "exitstatus": exitstatus,
                "tests": counts,
                "args": list(self.config.invocation_params.args),
                "narrowed": narrowed(self.config),
                "collected": collected,
                "unrecorded": unrecorded,
            },
            "fingerprint": fingerprint,
            "fingerprint_error": fingerprint_error,
            "catalogue": catalogue,
            "catalogue_error": catalogue_error,
            "results": self.results,
            "skipped": self.skipped,
        }
        path = self.path
        if path.is_dir() or str(path).endswith(os.sep) or not path.suffix:
            path = path / f"{cell}.json"  # a directory: the file is named after the cell
        path.parent.mkdir(parents=True, exist_ok=True)
        note = ""
        stopped = stopped_early(data["pytest"])
        if stopped and path.exists():
            if _stopped_early_file(path):  # no finished results to keep: the newer partial run replaces it
                note = f" ({stopped}; it replaces an earlier run that stopped early too)"
            else:
                # a run that stopped early (Ctrl-C, -x, nothing collected...) must not replace a
                # finished one: it goes beside it, under a name the report does not read (*.json)
                path = path.with_name(path.name + (".interrupted" if exitstatus == pytest.ExitCode.INTERRUPTED else ".incomplete"))
                note = f" ({stopped}: the earlier results are kept)"
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        line = f"splitrepro: cell {cell}: {len(self.results)} scenario results, {len(self.skipped)} skipped -> {path}{note}"
        if tr is not None:
            tr.write_line(line)
        else:
            print(line, file=sys.stderr)
