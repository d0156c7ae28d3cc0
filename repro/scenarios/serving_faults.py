"""Faults around the inference server: who is left waiting when something dies.

* ``queue_server_killed`` (hazard): the seed's pre-fix shape: a server process answering on a
  response ``Queue``; the caller waits in ``Queue.get()`` with no timeout, as the seed's
  workers did. The server is killed while the caller waits: nothing ever tells the caller,
  which waits forever in an untimed read (HANG, on every build).
* ``server_killed_mid_batch`` (fix): our server is SIGKILLed while a batch is running with
  several callers waiting: every caller gets ``ServerUnavailable`` within its timeout (the
  socket closes with the process), and the owner restarts the server on the same address.
* ``client_gone_mid_request`` (fix): a client sends a request and disconnects before the
  answer; the server drops the answer and keeps serving the others.
* ``slow_reader`` (fix): a client sends 1 MiB requests and never reads its answers. Its
  socket fills; the batch loop must not wait in its send (up to ``send_timeout``, 30 s
  here): its answers wait in an outbox drained by a writer thread of its own, and past
  ``max_outbox`` it is dropped. A prompt client meanwhile gets every answer, each within
  ``prompt_limit`` (5 s). Its own timeout is longer than ``send_timeout``, so that a batch loop
  held by the stuck socket shows as a measured wait (FAIL), not as the prompt client's timeout.
* ``bad_input_storm`` (fix): bad clients send malformed frames, oversized frames, wrong
  dtypes and shapes, and fail authentication, while a good client runs: the good client gets
  every answer right, the server counts the bad ones and stays up.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from repro.harness.spec import Outcome, fix, frame, hazard, scenario

DEMO = "splitlearn.serving.demo_models:DemoNet"
SLOW = {"in_features": 8, "hidden": 512, "depth": 4, "out_features": 4, "repeat": 3000}
ECHO = "splitlearn.serving.demo_models:EchoNet"


def queue_server(req, resp) -> None:
    """The seed's server loop: get a request, put the answer."""
    while True:
        item = req.get()
        if item is None:
            return
        resp.put(item)


def _wait_for(pred, timeout: float, what: str, ev: threading.Event) -> None:
    t_end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > t_end:
            raise AssertionError(f"{what} not reached within {timeout}s")
        ev.wait(0.02)  # bounded poll of another process's state (ev is never set)


@scenario(
    name="serving_faults",
    seed="002",
    claims=("002-server-overhead",),
    timeout=120,
    variants=[
        hazard(
            "queue_server_killed",
            expect=(Outcome.HANG, "a caller in Queue.get() without timeout is never told that the server died"),
            hang_where=(frame("multiprocessing/queues.py", "get"),),
        ),
        fix("server_killed_mid_batch", params={"callers": 4, "timeout": 60.0}),
        fix("client_gone_mid_request"),
        fix("bad_input_storm", params={"rounds": 20}),
        fix("slow_reader", params={"answers": 40, "send_timeout": 30.0, "max_outbox": 2 << 20, "prompt_limit": 5.0}),
    ],
)
def serving_faults(ctx):
    import multiprocessing as mp

    import torch

    from splitlearn.serving import (
        HandshakeError,
        InferenceClient,
        InferenceServer,
        ServerError,
        ServerUnavailable,
        WireError,
        wire,
    )

    never = threading.Event()
    v = ctx.variant
    if v == "queue_server_killed":
        mpctx = mp.get_context("spawn")
        req, resp = mpctx.Queue(), mpctx.Queue()
        proc = mpctx.Process(target=queue_server, args=(req, resp), daemon=True)
        proc.start()
        req.put(b"warm-up")
        ctx.check(resp.get(timeout=60) == b"warm-up", "queue server did not answer")
        ctx.stage("server killed, caller waits in Queue.get()")
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        ctx.observe(f"queue server killed (exit code {proc.exitcode}); caller now waits without timeout")
        req.put(b"request")
        resp.get()  # the seed's workers: no timeout
        ctx.fail("Queue.get() returned after the server died")

    if v == "server_killed_mid_batch":
        p = ctx.params
        srv = InferenceServer(DEMO, SLOW, num_threads=1, warmup=False, start_timeout=120)
        ctx.stage("start slow server")
        srv.start()
        try:
            results: dict[int, object] = {}

            def call(k):
                try:
                    with srv.client(timeout=p["timeout"]) as c:
                        c.infer(torch.randn(1, 8))
                    results[k] = "answered"
                except BaseException as exc:  # noqa: BLE001
                    results[k] = exc

            threads = [threading.Thread(target=call, args=(k,), daemon=True) for k in range(p["callers"])]
            for t in threads:
                t.start()
            with srv.client(timeout=10) as probe:
                # every caller connected and sent its request, and a batch is computing
                _wait_for(
                    lambda: (lambda st: st["requests"] >= p["callers"] and st["in_batch"])(probe.stats()),
                    60,
                    "all requests in, a batch in progress",
                    never,
                )
            ctx.stage("SIGKILL the server mid-batch")
            t_kill = time.monotonic()
            os.kill(srv.pid, signal.SIGKILL)
            for t in threads:
                t.join(p["timeout"])
            waited = time.monotonic() - t_kill
            ctx.record(
                callers_released_after_s=round(waited, 3), results={k: repr(r)[:120] for k, r in results.items()}
            )
            ctx.check(not any(t.is_alive() for t in threads), "a caller still waits after the server died")
            ctx.check(
                all(isinstance(r, ServerUnavailable) for r in results.values()),
                f"not every caller got ServerUnavailable: {results}",
            )
            ctx.stage("owner restarts the server")
            addr = srv.address
            srv.restart()
            ctx.check(srv.address == addr, "restart moved the server")
            with srv.client(timeout=120) as c:
                ctx.check(tuple(c.infer(torch.randn(1, 8)).shape) == (1, 4), "restarted server answers wrongly")
        finally:
            srv.close()
        return

    if v == "client_gone_mid_request":
        srv = InferenceServer(DEMO, SLOW, num_threads=1, warmup=False, start_timeout=120)
        ctx.stage("start slow server")
        srv.start()
        try:
            gone = srv.client()
            gone.send_raw(wire.encode(wire.Frame(wire.MsgType.REQUEST, 1, tensors=[torch.randn(1, 8)])))
            with srv.client(timeout=10) as probe:
                _wait_for(lambda: probe.stats()["requests"] >= 1, 60, "request received", never)
            ctx.stage("client disconnects before its answer")
            gone.close()
            with srv.client(timeout=120) as c:
                ctx.check(tuple(c.infer(torch.randn(1, 8)).shape) == (1, 4), "wrong answer")
                st = c.stats()
            ctx.record(server_stats=st)
            ctx.check(srv.alive, "server died")
            # the gone client's answer was dropped: else it was answered before it left, and nothing was tested
            ctx.check(st["undeliverable"] >= 1, f"no answer was undeliverable: the client left after its answer ({st})")
        finally:
            srv.close()
        return

    if v == "bad_input_storm":
        srv = InferenceServer(
            ECHO, {"scale": 2.0}, input_shape=(3,), input_dtype="float32", handshake_timeout=3.0, start_timeout=120
        )
        ctx.stage("start server")
        srv.start()
        bad_results: list[str] = []
        stop = threading.Event()

        def bad_client():
            n = 0
            while not stop.is_set() and n < ctx.params["rounds"]:
                n += 1
                try:
                    kind = n % 5
                    if kind == 0:
                        try:
                            InferenceClient(srv.address, authkey=b"bad" * 11, connect_timeout=5)
                        except HandshakeError:
                            bad_results.append("auth")
                        continue
                    with srv.client(timeout=10, max_frame=1 << 30) as c:
                        if kind == 1:
                            c.send_raw(os.urandom(64))
                            bad_results.append(c.recv_frame(timeout=10).meta["error"])
                        elif kind == 2:
                            try:
                                c.infer(torch.ones(1, 3, dtype=torch.float64))
                            except ServerError as e:
                                bad_results.append(e.code)
                        elif kind == 3:
                            try:
                                c.infer(torch.ones(2, 4))
                            except ServerError as e:
                                bad_results.append(e.code)
                        else:
                            try:
                                c.send_raw(b"\x00" * (srv.max_frame + 1))
                            except OSError:
                                pass
                            try:
                                bad_results.append(c.recv_frame(timeout=10).meta["error"])
                            except (ServerUnavailable, WireError):
                                bad_results.append("closed")
                except Exception as exc:  # noqa: BLE001 - recorded: a bad client may fail any way it likes
                    bad_results.append(f"unexpected {type(exc).__name__}: {exc}")

        bads = [threading.Thread(target=bad_client, daemon=True) for _ in range(2)]
        try:
            for t in bads:
                t.start()
            ctx.stage("good client under a storm of bad ones")
            good = 0
            with srv.client(timeout=30) as c:
                while any(t.is_alive() for t in bads) or good < 50:
                    x = torch.full((1, 3), float(good))
                    ctx.check(torch.equal(c.infer(x), 2 * x), f"good client got a wrong answer at {good}")
                    good += 1
                    if good > 100000:
                        break
            stop.set()
            for t in bads:
                t.join(30)
            st = srv.stats()
            ctx.record(good_answers=good, bad_outcomes=sorted(set(bad_results)), server_stats=st)
            unexpected = [r for r in bad_results if r.startswith("unexpected")]
            ctx.check(not unexpected, f"bad clients saw unclear failures: {unexpected[:3]}")
            ctx.check(
                st["auth_failures"] >= 1 and st["bad_frames"] >= 1 and st["errors"] >= 1,
                f"server did not count the bad clients: {st}",
            )
            ctx.check(srv.alive, "server died")
        finally:
            stop.set()
            srv.close()
        return
    if v == "slow_reader":
        p = ctx.params
        srv = InferenceServer(
            ECHO, {"scale": 2.0}, send_timeout=p["send_timeout"], max_outbox=p["max_outbox"], start_timeout=120
        )
        ctx.stage("start server")
        srv.start()
        try:
            stuck = srv.client(timeout=30)
            big = torch.ones(1, 256 * 1024)
            sent = 0
            ctx.stage("a client sends 1 MiB requests and never reads")
            for rid in range(1, 17):
                try:
                    stuck.send_raw(wire.encode(wire.Frame(wire.MsgType.REQUEST, rid, tensors=[big])))
                except OSError:
                    break  # dropped already
                sent += 1
            ctx.stage("a prompt client meanwhile")
            lat = []
            with srv.client(timeout=p["send_timeout"] + 15) as c:
                for i in range(p["answers"]):
                    x = torch.full((1, 4), float(i))
                    t0 = time.monotonic()
                    y = c.infer(x)
                    lat.append(time.monotonic() - t0)
                    ctx.check(torch.equal(y, 2 * x), f"prompt client got a wrong answer at {i}")
                _wait_for(lambda: c.stats()["slow_clients_dropped"] >= 1, 30, "the stuck client dropped", never)
                st = c.stats()
            stuck.close()
            ctx.record(
                stuck_requests_sent=sent,
                prompt_answers=len(lat),
                prompt_latency_ms_max=round(1e3 * max(lat), 2),
                server_stats=st,
            )
            ctx.check(
                max(lat) < p["prompt_limit"],
                f"a prompt answer waited {max(lat):.1f}s (limit {p['prompt_limit']:g}s): stuck behind the slow reader",
            )
            ctx.check(st["slow_clients_dropped"] == 1 and srv.alive, f"server stats {st}")
        finally:
            srv.close()
        return
    ctx.fail(f"unknown variant {v}")
