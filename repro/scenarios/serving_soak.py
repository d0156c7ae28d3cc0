"""Soak: many clients, many requests, bounded time, against one InferenceServer.

Each client process sends requests whose every element encodes (client id, sequence number)
and checks that the answer is exactly ``2 * request`` for *its own* request; it counts answers
per sequence number. At the end: every request answered exactly once, nothing delivered to the
wrong caller, the server's counters equal the clients' totals, and no process is left.
Requests vary in batch size (1-3 rows) so that batches mix shapes of different callers.
"""

from __future__ import annotations

import time

from repro.harness.spec import fix, scenario

ECHO = "splitlearn.serving.demo_models:EchoNet"


def soak_client(address: str, authkey_hex: str, k: int, seconds: float, max_requests: int, start, results) -> None:
    import numpy as np

    from splitlearn.serving import InferenceClient

    sent = 0
    wrong = []
    answered: dict[int, int] = {}
    error = None
    try:
        with InferenceClient(address, authkey=bytes.fromhex(authkey_hex), as_numpy=True, timeout=30) as c:
            start.wait(60)
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end and sent < max_requests:
                rows = 1 + (sent % 3)
                x = np.full((rows, 4), k * 1_000_000 + sent, dtype=np.float64)
                x[:, 1] = np.arange(rows)
                sent += 1
                y = c.infer(x)
                seq = int(y[0, 0] // 2) - k * 1_000_000
                if y.shape != x.shape or not np.array_equal(y, 2 * x):
                    wrong.append(sent - 1)
                answered[seq] = answered.get(seq, 0) + 1
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        error = f"{type(exc).__name__}: {exc}"
    results.put(
        {"k": k, "sent": sent, "wrong": wrong[:10], "n_wrong": len(wrong), "answered": answered, "error": error}
    )


@scenario(
    name="serving_soak",
    seed="002",
    claims=("002-server-overhead",),
    timeout=180,
    variants=[
        fix(
            "soak",
            params={"clients": 12, "seconds": 15.0, "max_requests": 20000, "max_batch_size": 8, "max_wait_ms": 2.0},
        )
    ],
)
def serving_soak(ctx):
    import multiprocessing as mp

    import psutil

    from splitlearn.serving import InferenceServer

    p = ctx.params
    srv = InferenceServer(
        ECHO, {"scale": 2.0}, max_batch_size=p["max_batch_size"], max_wait_ms=p["max_wait_ms"], start_timeout=120
    )
    ctx.stage("start server")
    srv.start()
    mpctx = mp.get_context("spawn")
    procs = []
    try:
        start, results = mpctx.Event(), mpctx.Queue()
        procs = [
            mpctx.Process(
                target=soak_client,
                args=(srv.address, srv.authkey.hex(), k, p["seconds"], p["max_requests"], start, results),
                daemon=True,
            )
            for k in range(p["clients"])
        ]
        ctx.stage(f"{p['clients']} clients for {p['seconds']} s")
        for pr in procs:
            pr.start()
        deadline = time.monotonic() + 120
        while srv.stats()["connections_open"] < p["clients"] + 1:  # the asking connection is one of them
            ctx.check(time.monotonic() < deadline, "clients did not connect within 120 s")
            ctx.check(all(pr.is_alive() or pr.exitcode == 0 for pr in procs), "a client died while starting")
            start.wait(0.05)  # bounded poll of the server's counters (start is not set yet)
        before = srv.stats()
        start.set()
        outs = [results.get(timeout=p["seconds"] + 90) for _ in procs]
        for pr in procs:
            pr.join(30)
        ctx.stage("check")
        after = srv.stats()
        sent = sum(o["sent"] for o in outs)
        errors = [o["error"] for o in outs if o["error"]]
        n_wrong = sum(o["n_wrong"] for o in outs)
        lost = dup = 0
        for o in outs:
            for seq in range(o["sent"]):
                n = o["answered"].get(str(seq), o["answered"].get(seq, 0))
                lost += n == 0
                dup += n > 1
        served = after["responses"] - before["responses"]
        ctx.record(
            sent=sent,
            served=served,
            lost=lost,
            duplicated=dup,
            misdelivered=n_wrong,
            client_errors=errors,
            throughput_rps=round(sent / p["seconds"], 1),
            mean_batch=after["mean_batch"],
            max_batch=after["max_batch"],
            batch_hist=after["batch_hist"],
        )
        ctx.check(not errors, f"client errors: {errors[:3]}")
        ctx.check(n_wrong == 0, f"{n_wrong} answers carried another caller's data")
        ctx.check(lost == 0 and dup == 0, f"lost {lost}, duplicated {dup}")
        ctx.check(served == sent, f"server answered {served}, clients sent {sent}")
        ctx.check(after["errors"] == before["errors"], "server reported errors")
        ctx.check(sent >= p["clients"], "the soak sent almost nothing")
    finally:
        for pr in procs:
            if pr.is_alive():
                pr.kill()
                pr.join(5)
        srv.close()
    left = [c.pid for c in psutil.Process().children(recursive=True) if "resource_tracker" not in " ".join(c.cmdline())]
    ctx.check(not left, f"processes left: {left}")
