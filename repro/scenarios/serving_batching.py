"""Seed 002: server overhead and dynamic batching under 1, 2, 4 and 8 concurrent clients.

The seed reported 5.58 ms per direct inference, 5.75 ms through the server (1.03x), and
255 req/s at mean batch 3.5 from 4 workers.

Method (one run, ratios within it):

* ``direct``: the same model (``DemoNet``, same kwargs, same thread count as the server) run in
  this process on one sample, ``n_direct`` calls after warm-up: mean/median ms;
* ``server_1``: one client, the same sample through the server: mean/median ms and the
  ratio to ``direct`` (target <= 1.05x);
* ``clients_N``: N spawned client processes (numpy only, no torch) each send requests back
  to back for ``seconds``; throughput (req/s), p50/p99 latency, and the server's own mean
  batch. Targets: 4 clients >= 2.5x the throughput of 1, mean batch >= 3.

The server runs with ``max_batch_size=8`` and ``max_wait_ms`` from the params; its batch loop
never waits for more requests than there are connected clients (so one client never waits).
"""

from __future__ import annotations

import time

from repro.harness.spec import load, scenario

MODEL = "splitlearn.serving.demo_models:DemoNet"


def client_proc(address: str, authkey_hex: str, in_features: int, seconds: float, start, results, k: int) -> None:
    import numpy as np

    from splitlearn.serving import InferenceClient

    rng = np.random.default_rng(k)
    lat = []
    errors = 0
    with InferenceClient(address, authkey=bytes.fromhex(authkey_hex), as_numpy=True, timeout=30) as c:
        x = rng.standard_normal((1, in_features)).astype(np.float32)
        c.infer(x)
        start.wait(60)
        t_end = time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                break
            try:
                c.infer(x)
            except Exception:  # noqa: BLE001 - counted, reported
                errors += 1
                break
            lat.append(time.perf_counter() - t0)
    results.put({"k": k, "lat": lat, "errors": errors})


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))] if xs else float("nan")


@scenario(
    name="serving_batching",
    seed="002",
    claims=("002-server-overhead",),
    timeout=300,
    serial=True,
    variants=[
        load(
            "demo",
            params={
                "model_kwargs": {"in_features": 64, "hidden": 512, "depth": 32, "out_features": 16},
                "threads": 1,
                "n_direct": 300,
                "n_server": 300,
                "clients": [1, 2, 4, 8],
                "seconds": 4.0,
                "max_batch_size": 8,
                "max_wait_ms": 5.0,
            },
        ),
    ],
)
def serving_batching(ctx):
    import multiprocessing as mp

    import torch

    from splitlearn.serving import InferenceServer
    from splitlearn.serving.demo_models import DemoNet

    p = ctx.params
    kw = p["model_kwargs"]
    torch.set_num_threads(p["threads"])
    torch.manual_seed(0)
    model = DemoNet(**kw).eval()
    x = torch.randn(1, kw["in_features"])

    ctx.stage("direct calls")
    with torch.inference_mode():
        for _ in range(30):
            model(x)
        d = []
        for _ in range(p["n_direct"]):
            t0 = time.perf_counter()
            ref = model(x)
            d.append(time.perf_counter() - t0)
    direct_ms = 1e3 * sum(d) / len(d)

    srv = InferenceServer(
        MODEL,
        kw,
        state_dict=model.state_dict(),
        num_threads=p["threads"],
        max_batch_size=p["max_batch_size"],
        max_wait_ms=p["max_wait_ms"],
    )
    ctx.stage("start server")
    srv.start()
    try:
        ctx.stage("one client through the server")
        with srv.client(timeout=30) as c:
            for _ in range(30):
                y = c.infer(x)
            ctx.check(torch.allclose(y, ref, atol=1e-5), "server answer differs from the direct call")
            s = []
            for _ in range(p["n_server"]):
                t0 = time.perf_counter()
                c.infer(x)
                s.append(time.perf_counter() - t0)
        server_ms = 1e3 * sum(s) / len(s)
        overhead = server_ms / direct_ms
        ctx.record(
            direct_ms_mean=round(direct_ms, 4),
            direct_ms_median=round(1e3 * _pct(d, 50), 4),
            server_ms_mean=round(server_ms, 4),
            server_ms_median=round(1e3 * _pct(s, 50), 4),
            server_over_direct=round(overhead, 4),
            server_over_direct_median=round(_pct(s, 50) / _pct(d, 50), 4),
        )
        ctx.observe(f"direct {direct_ms:.3f} ms, server {server_ms:.3f} ms: {overhead:.3f}x")

        mpctx = mp.get_context("spawn")
        rows = {}
        for n in p["clients"]:
            ctx.stage(f"{n} concurrent clients")
            before = srv.stats()
            start = mpctx.Event()
            results = mpctx.Queue()
            procs = [
                mpctx.Process(
                    target=client_proc,
                    args=(srv.address, srv.authkey.hex(), kw["in_features"], p["seconds"], start, results, k),
                    daemon=True,
                )
                for k in range(n)
            ]
            for pr in procs:
                pr.start()
            # every client connects and sends one warm-up request before the clock starts
            deadline = time.monotonic() + 120
            while srv.stats()["responses"] - before["responses"] < n:
                ctx.check(time.monotonic() < deadline, f"{n} clients did not connect within 120 s")
                ctx.check(all(pr.is_alive() or pr.exitcode == 0 for pr in procs), "a client died while starting")
                start.wait(0.05)  # bounded poll of the server's counters (start is not set yet)
            mid = srv.stats()
            start.set()
            outs = [results.get(timeout=p["seconds"] + 60) for _ in procs]
            for pr in procs:
                pr.join(30)
                if pr.is_alive():
                    pr.kill()
                    pr.join(5)
            after = srv.stats()
            lat = [v for o in outs for v in o["lat"]]
            errors = sum(o["errors"] for o in outs)
            batches = after["batches"] - mid["batches"]
            reqs = after["responses"] - mid["responses"]
            rows[str(n)] = {
                "requests": len(lat),
                "errors": errors,
                "throughput_rps": round(len(lat) / p["seconds"], 1),
                "latency_ms_p50": round(1e3 * _pct(lat, 50), 3),
                "latency_ms_p99": round(1e3 * _pct(lat, 99), 3),
                "mean_batch": round(reqs / batches, 3) if batches else 0.0,
                "forward_ms_mean": round(after["forward_ms_mean"], 3),
            }
            ctx.record(clients=rows)
            ctx.check(errors == 0, f"{errors} failed requests with {n} clients")
            ctx.observe(f"{n} clients: {rows[str(n)]}")
        speedup4 = rows["4"]["throughput_rps"] / rows["1"]["throughput_rps"] if "4" in rows and "1" in rows else None
        ctx.record(
            method=(
                f"DemoNet {kw}, torch threads={p['threads']} in both; direct = mean of {p['n_direct']} calls on 1 sample; "
                f"server = mean of {p['n_server']} calls by one client; N clients = spawned numpy clients, back to back "
                f"for {p['seconds']} s; max_batch_size={p['max_batch_size']}, max_wait_ms={p['max_wait_ms']}"
            ),
            targets={
                "server_over_direct_le_1.05": {"value": round(overhead, 4), "target": 1.05, "met": overhead <= 1.05},
                "4_clients_throughput_ge_2.5x": {
                    "value": round(speedup4, 3) if speedup4 else None,
                    "target": 2.5,
                    "met": bool(speedup4 and speedup4 >= 2.5),
                },
                "4_clients_mean_batch_ge_3": {
                    "value": rows.get("4", {}).get("mean_batch"),
                    "target": 3,
                    "met": rows.get("4", {}).get("mean_batch", 0) >= 3,
                },
            },
        )
    finally:
        ctx.stage("stop server")
        srv.close()
