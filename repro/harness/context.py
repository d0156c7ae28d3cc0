"""What a scenario function sees in its child interpreter.

``ctx.record(**metrics)`` and ``ctx.stage(name)`` rewrite the result file atomically at once,
so that a scenario that later hangs or crashes still leaves its figures and the stage it was
in for the parent to read. Nothing goes through pipes.

Only the process that made the context (the run's root) writes the result file. A process
forked from it (``os.fork`` without exec) holds a copy of the context whose state goes stale at
once; its ``record``/``stage``/``observe`` change that copy only (``observe`` still echoes to
stderr), so that it can never overwrite the root's result.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


class ScenarioFailure(AssertionError):
    """The scenario's own check failed: verdict FAIL (not ERROR)."""


class Symptom(ScenarioFailure):
    """The hazard's symptom, verified by the scenario (``ctx.symptom``): verdict FAIL."""


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Context:
    def __init__(
        self,
        *,
        scenario: str,
        variant: str,
        kind: str,
        params: dict[str, Any],
        workdir: str | os.PathLike,
        result_path: str | os.PathLike | None,
        timeout: float,
        deadline: float | None = None,
    ) -> None:
        self.scenario = scenario
        self.variant = variant
        self.kind = kind
        self.params = dict(params)
        self.workdir = Path(workdir)
        self.timeout = float(timeout)
        self.started = time.monotonic()
        # Absolute CLOCK_MONOTONIC deadline of the parent (shared by all processes on the
        # machine); without one, the deadline is counted from this context's start.
        self.deadline = float(deadline) if deadline else self.started + self.timeout
        self._result_path = Path(result_path) if result_path else None
        self._state: dict[str, Any] = {
            "status": "running",
            "pid": os.getpid(),
            "metrics": {},
            "observations": [],
            "stage": None,
            "stages": [],
            "t0_monotonic": self.started,
        }
        self.symptoms_only = False
        self._flush()

    # -- reporting -----------------------------------------------------------------
    @property
    def metrics(self) -> dict[str, Any]:
        return self._state["metrics"]

    def record(self, **metrics: Any) -> None:
        """Store figures (JSON-serialisable) in the result; written at once."""
        self._state["metrics"].update(metrics)
        self._flush()

    def observe(self, message: str) -> None:
        """A line of evidence in the result (also echoed to stderr)."""
        self._state["observations"].append(str(message))
        print(f"[{self.scenario}:{self.variant}] {message}", file=sys.stderr, flush=True)
        self._flush()

    def stage(self, name: str) -> None:
        """Mark the stage the scenario enters; a HANG report names the last one."""
        self._state["stage"] = name
        self._state["stages"].append([name, round(time.monotonic() - self.started, 4)])
        self._flush()

    def remaining(self) -> float:
        """Seconds left before the parent's hard deadline (use for inner timeouts)."""
        return max(0.0, self.deadline - time.monotonic())

    # -- checks --------------------------------------------------------------------
    def fail(self, message: str) -> None:
        raise ScenarioFailure(message)

    def only_symptoms_fail(self) -> None:
        """From now on, in a hazard variant, only ``symptom`` gives FAIL: any other failed check
        (a setup step, a leak, a wrong count) is an ERROR, so it can never pass for the hazard
        reproduced. Fix, load and probe variants keep FAIL for every failed check."""
        self.symptoms_only = True

    def symptom(self, message: str) -> None:
        """Report the hazard's symptom, once the scenario has verified it is the predicted one."""
        raise Symptom(message)

    def check(self, condition: Any, message: str) -> None:
        if not condition:
            raise ScenarioFailure(message)

    # -- internals -------------------------------------------------------------------
    def _finish(self, status: str, error: dict[str, Any] | None = None) -> None:
        self._state["status"] = status
        self._state["seconds"] = round(time.monotonic() - self.started, 6)
        if error:
            self._state["error"] = error
        self._flush()

    def is_owner(self) -> bool:
        """Whether this process made the context (and so writes the result), not a fork of it."""
        return os.getpid() == self._state["pid"]

    def _flush(self) -> None:
        if self._result_path is not None and self.is_owner():
            write_json_atomic(self._result_path, self._state)
