"""Helpers inside scenarios, tested directly where a whole run cannot steer them (a race
lost or won by timing)."""

from __future__ import annotations

import pytest


def test_fork_share_lock_retries_a_copy_it_did_not_catch_then_says_so(tmp_path, monkeypatch):
    import torch

    from repro.harness.context import Context, ScenarioFailure
    from repro.scenarios import fork_share_lock as fsl

    ctx = Context(scenario="fork_share_lock", variant="spawn", kind="fix", params={}, workdir=tmp_path, result_path=None, timeout=60)
    monkeypatch.setattr(fsl, "ELEMENTS", 1024)  # a copy far too fast to catch
    seen: list[int] = []

    def caught_the_third_time(ctx, torch, thread) -> bool:
        thread.join(10)
        seen.append(1)
        return len(seen) == 3

    monkeypatch.setattr(fsl, "_wait_sharing", caught_the_third_time)
    t, sharer, attempt = fsl._start_sharing(ctx, torch)
    assert attempt == 3 and len(seen) == 3 and t.numel() == 1024
    sharer.join(10)
    assert t.is_shared()

    # the real wait sees each tiny copy finish before it can catch it: every attempt, then a clear failure
    monkeypatch.undo()
    monkeypatch.setattr(fsl, "ELEMENTS", 16)
    calls: list[bool] = []
    real_wait = fsl._wait_sharing

    def finished_first(ctx, torch, thread) -> bool:
        thread.join(10)  # the copy is over before the first look
        calls.append(real_wait(ctx, torch, thread))
        return calls[-1]

    monkeypatch.setattr(fsl, "_wait_sharing", finished_first)
    with pytest.raises(ScenarioFailure, match=f"{fsl.ATTEMPTS} times: the tensor copy was too fast to catch"):
        fsl._start_sharing(ctx, torch)
    assert calls == [False] * fsl.ATTEMPTS
