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


def test_fork_midregion_forks_again_until_the_child_was_forked_mid_op(tmp_path, monkeypatch):
    import threading

    from repro.harness.context import Context, ScenarioFailure
    from repro.scenarios import fork_threads as ft

    ctx = Context(scenario="fork_after_threads", variant="fork-midregion", kind="hazard", params={}, workdir=tmp_path, result_path=None, timeout=60)
    in_op = threading.Event()
    in_op.set()
    ran: list[int | None] = []
    monkeypatch.setattr(ft, "child_op", ran.append)
    at_fork = iter([False, False, True])  # the flag as the child's copy has it, fork by fork

    def fake_fork_run(ctx, child, *, stage):  # no fork in the pytest process: the child runs here
        (in_op.set if next(at_fork) else in_op.clear)()
        code = child()
        in_op.set()
        return code

    monkeypatch.setattr(ft, "fork_run", fake_fork_run)
    ft._fork_midregion(ctx, None, in_op)
    assert ctx.metrics["attempts"] == 3 and ctx.metrics["bg_in_op_at_fork"] and ran == [None]

    at_fork = iter([False] * ft.ATTEMPTS)
    with pytest.raises(ScenarioFailure, match="every fork came between two ops"):
        ft._fork_midregion(ctx, None, in_op)
    assert ctx.metrics["attempts"] == ft.ATTEMPTS and not ctx.metrics["bg_in_op_at_fork"] and ran == [None]


def test_loading_memory_worker_peak_is_its_own_not_its_parents():
    """The worker's peak RSS must not carry its parent's: started by subprocess (vfork + exec)
    from a process whose peak is high, ``ru_maxrss`` reports that peak, ``VmHWM`` does not."""
    import subprocess
    import sys

    parent = bytearray(600 << 20)
    parent[::4096] = b"\1" * len(parent[::4096])  # every page touched: this process peaked >= 600 MiB
    code = "from repro.scenarios.loading_memory import _peak_rss_kib; print(_peak_rss_kib())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    del parent
    assert int(out.stdout) < 300 << 10, f"the child's peak is {int(out.stdout) >> 10} MiB: its parent's"


@pytest.mark.parametrize("stall", ["gc_other_thread", "loop_computes", "off_cpu"])
def test_heartbeat_tells_where_a_stall_was_spent(stall):
    """manager_lock:cold_real counts a stall as its hazard only when the process computed through
    it; the heartbeat also says whether the loop's own thread did (or waited for the GIL while
    another thread held it) and how much of the stall was the cyclic collector, and where."""
    import asyncio
    import gc
    import threading
    import time

    from repro.scenarios._manager_common import Heartbeat

    junk = [[i] for i in range(2_000_000)] if stall == "gc_other_thread" else None  # ~0.1 s a full collection

    async def main() -> Heartbeat:
        hb = Heartbeat(0.005)
        hb.start()
        await asyncio.sleep(0.05)
        if stall == "gc_other_thread":
            # what the seed blames: a full collection in the loading thread, which holds the GIL
            # throughout, so the loop's thread can only wait
            t = threading.Thread(target=gc.collect)
            t.start()
            await asyncio.get_running_loop().run_in_executor(None, t.join)
        elif stall == "loop_computes":
            end = time.perf_counter() + 0.3
            while time.perf_counter() < end:  # the loop's own thread busy
                pass
        else:
            time.sleep(0.3)  # the loop's thread blocked and off the CPU
        await asyncio.sleep(0.05)
        await hb.stop()
        return hb

    hb = asyncio.run(main())
    del junk
    assert hb._on_gc not in gc.callbacks  # stop() unhooks it
    summary = hb.summary()
    gap = summary["heartbeat_max_gap_ms"]
    share = summary["heartbeat_max_gap_cpu_share"]
    loop_share = summary["heartbeat_max_gap_loop_cpu_share"]
    if stall == "gc_other_thread":
        assert gap >= 50, summary
        assert summary["heartbeat_max_gap_gc_ms"] >= 0.5 * gap, summary
        assert summary["heartbeat_max_gap_gc_max_generation"] == 2, summary
        assert summary["heartbeat_max_gap_gc_on_loop_ms"] == 0, summary
        assert loop_share < 0.2 and share >= 2 * loop_share + 0.3, summary
    elif stall == "loop_computes":
        assert gap >= 290, summary
        assert share >= 0.5 and loop_share >= 0.5, summary  # 0.5: the threshold cold_real uses
        assert summary["heartbeat_max_gap_gc_ms"] < 0.5 * gap, summary
    else:
        assert gap >= 290, summary
        assert share < 0.2 and loop_share < 0.2, summary


def test_heartbeat_times_a_collection_on_the_loop_thread():
    import asyncio
    import gc

    from repro.scenarios._manager_common import Heartbeat

    junk = [[i] for i in range(1_000_000)]

    async def main() -> Heartbeat:
        hb = Heartbeat(0.005)
        hb.start()
        await asyncio.sleep(0.03)
        gc.collect()
        await asyncio.sleep(0.03)
        await hb.stop()
        return hb

    hb = asyncio.run(main())
    del junk
    full = [(b - a, on_loop) for a, b, gen, on_loop in hb.collections if gen == 2]
    assert len(full) == 1 and full[0][0] > 0 and full[0][1] is True, hb.collections
    assert hb.summary()["heartbeat_gc_n"] == len(hb.collections)


def test_a_heartbeat_whose_task_was_cancelled_stops_timing_collections():
    """stop() awaits the heartbeat's task; a task that was cancelled (or raised) made it raise
    before it took its gc callback back, and the collector went on calling it."""
    import asyncio
    import gc

    from repro.scenarios._manager_common import Heartbeat

    async def main() -> Heartbeat:
        hb = Heartbeat(0.005)
        hb.start()
        await asyncio.sleep(0.02)
        hb._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hb.stop()
        return hb

    hb = asyncio.run(main())
    assert hb._on_gc not in gc.callbacks


# -- the load variants' statistics ---------------------------------------------------------------
@pytest.mark.parametrize(
    "xs",
    [[1.0, 2.0, 3.0, 4.0], [3.0, 1.0, 6.0, 2.0, 5.0, 4.0], [float(i) for i in range(300)], [2.0, 1.0, 3.0]],
)
def test_the_load_variants_medians_are_medians(xs):
    """serving_batching's and ipc_transports' percentile helpers give their figures' medians (the
    figures' medians (the 300 sets of serving_batching's overhead, the blocks of ipc_transports'
    ratios): with an even count the median lies between the two middle samples, not on one
    picked by rounding (each module had its own helper that did that)."""
    import statistics

    from repro.figures import percentile
    from repro.scenarios import ipc_transports, serving_batching

    assert ipc_transports.percentile is percentile and serving_batching.percentile is percentile
    assert percentile(xs, 50) == pytest.approx(statistics.median(xs))
    assert percentile(xs, 0) == min(xs) and percentile(xs, 100) == max(xs)


def test_the_manager_scenarios_tail_percentiles_are_not_the_maximum():
    """The manager scenarios' p95 latency and p99 heartbeat gap are nearest-rank percentiles: of
    20 latencies the p95 is the 19th smallest, of 100 gaps the p99 the 99th; one rank higher
    reported the single worst sample under the percentile's name."""
    from repro.scenarios._manager_common import Heartbeat, latency_summary

    lat = [(float(i), (i + 1) / 1e3) for i in range(20)]  # 1..20 ms
    s = latency_summary(lat, "x")
    assert s["x_max_ms"] == 20.0
    assert s["x_p95_ms"] == 19.0
    assert latency_summary(lat[:1], "x")["x_p95_ms"] == 1.0

    hb = Heartbeat.__new__(Heartbeat)  # its figures only: no loop, no task
    hb.interval = 0.005
    hb.gaps = [(i + 1) / 1e3 for i in range(100)]  # 1..100 ms
    hb.ends = [sum(hb.gaps[: i + 1]) for i in range(100)]
    hb.cpu = [0.0] * 100
    hb.loop_cpu = [0.0] * 100
    hb.collections = []
    out = hb.summary()
    assert out["heartbeat_max_gap_ms"] == 100.0
    assert out["heartbeat_p99_gap_ms"] == 99.0


class _FakeTransport:
    """An in-process echo with the parent side's interface (name, send, recv)."""

    def __init__(self, name: str, log: list):
        import collections

        self.name, self._q, self._log = name, collections.deque(), log

    def send(self, msg: bytes) -> None:
        self._log.append(self.name)
        self._q.append(msg)

    def recv(self) -> bytes:
        return self._q.popleft()


def test_ipc_throughput_is_measured_side_by_side(monkeypatch):
    """The Manager's share of the socket's throughput is a ratio: its two rates must come from
    rounds interleaved across the transports (order rotating), as the latencies do, not from
    each transport's throughput measured once after the other's, and the fraction is the median
    of the rounds' ratios."""
    from repro.scenarios import ipc_transports as ipc

    log: list[str] = []
    names = ("manager_queue", "mp_queue", "unix_connection")
    ts = {n: _FakeTransport(n, log) for n in names}
    # a rate per call that drifts with the call's position: every transport's rates differ by round
    calls: list[str] = []
    speed = {"manager_queue": 100.0, "mp_queue": 300.0, "unix_connection": 1000.0}

    def fake_throughput(t, msg, n, window):
        calls.append(t.name)
        return speed[t.name] * (1 + 0.1 * len(calls))

    monkeypatch.setattr(ipc, "_throughput", fake_throughput)
    p = {"warmup": 2, "rounds": 40, "block": 10, "budget_s": 60.0, "window": 4}
    out, blocks = ipc._measure_all(ts, 64, p)
    assert all(calls.count(n) >= 3 for n in names), calls
    # round-robin: between two rounds of one transport, every other transport runs once
    first = {n: calls.index(n) for n in names}
    assert max(first.values()) < len(names), calls
    assert {calls[i] for i in range(len(names))} == set(names)
    assert calls[: len(names)] != calls[len(names) : 2 * len(names)], "the order does not rotate"
    rounds = {n: out[n]["throughput_msgs_per_s_rounds"] for n in names}
    ratios = sorted(a / b for a, b in zip(rounds["manager_queue"], rounds["unix_connection"], strict=True))
    import statistics

    assert ipc._throughput_fraction(out, "manager_queue", "unix_connection") == round(statistics.median(ratios), 3)
    assert out["manager_queue"]["throughput_msgs_per_s"] == round(statistics.median(rounds["manager_queue"]), 1)


def test_loading_memory_figures_named_mb_are_in_megabytes(monkeypatch):
    """loading_memory's ``*_mb`` figures are shown in MB (10^6 bytes); the worker divided bytes
    by 2^20 (and VmHWM's KiB by 1024), so they were MiB read as MB, 5 % short."""
    import types

    import psutil
    import torch

    from repro.scenarios import loading_memory as lm
    from splitlearn.factory import ModelFactory

    class Trunk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(lm.SPLIT[1] - lm.SPLIT[0]))
            self.config = types.SimpleNamespace(hidden_size=4)

        def forward(self, x):
            return x

    class Proc:
        def memory_info(self):
            return types.SimpleNamespace(rss=300_000_000)

    monkeypatch.setattr(psutil, "Process", Proc)
    monkeypatch.setattr(ModelFactory, "create_split_models", staticmethod(lambda *a, **k: (None, Trunk(), None)))
    monkeypatch.setattr(ModelFactory, "last_load_info", staticmethod(lambda: {}))
    monkeypatch.setattr(lm, "_peak_rss_kib", lambda: 1_000_000)  # 1.024e9 bytes
    res = lm._worker("incremental", "unused")
    assert res["rss_imported_mb"] == pytest.approx(300.0)
    assert res["peak_rss_mb"] == pytest.approx(1024.0)
    assert res["load_peak_mb"] == pytest.approx(724.0)
    assert res["load_only_peak_mb"] == pytest.approx(724.0)
