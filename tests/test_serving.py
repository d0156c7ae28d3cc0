"""InferenceServer / InferenceClient: answers, batching, bad input, auth, faults, lifecycle.

Servers are real spawned processes; every wait is bounded and every process is reaped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import pytest
import torch

from splitlearn.serving import (
    HandshakeError,
    InferenceClient,
    InferenceServer,
    ServerError,
    ServerStartError,
    ServerUnavailable,
    wire,
)
from splitlearn.serving.demo_models import DemoNet, EchoNet

DEMO = "splitlearn.serving.demo_models:DemoNet"
ECHO = "splitlearn.serving.demo_models:EchoNet"
KW = {"in_features": 8, "hidden": 64, "depth": 2, "out_features": 4}


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    model = DemoNet(**KW).eval()
    srv = InferenceServer(DEMO, KW, state_dict=model.state_dict(), num_threads=1, max_wait_ms=20, start_timeout=120)
    srv.start()
    try:
        yield srv, model
    finally:
        srv.close()
    assert not psutil.pid_exists(srv.info["pid"]) or psutil.Process(srv.info["pid"]).status() == psutil.STATUS_ZOMBIE


@pytest.fixture()
def slow():
    """A model whose forward takes about a second or more (repeat), for fault tests."""
    kw = dict(KW, hidden=512, depth=4, repeat=12000)
    srv = InferenceServer(DEMO, kw, num_threads=1, start_timeout=120, warmup=False)
    srv.start()
    try:
        yield srv
    finally:
        srv.close()


def _wait_until(pred, timeout, what):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if pred():
            return
        threading.Event().wait(0.02)  # bounded poll of a condition we do not own, not a sync sleep
    raise AssertionError(f"{what} not reached within {timeout}s")


def test_answers_equal_direct_model(demo):
    srv, model = demo
    x = torch.randn(3, 8)
    with srv.client() as c:
        y = c.infer(x)
    with torch.inference_mode():
        ref = model(x)
    assert torch.allclose(y, ref, atol=1e-6)
    assert srv.info["input_shape"] == [8] and srv.info["input_dtype"] == "float32"


def test_numpy_client(demo):
    srv, model = demo
    import numpy as np

    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    with InferenceClient(srv.address, authkey=srv.authkey, as_numpy=True) as c:
        y = c.infer(x)
    assert isinstance(y, np.ndarray)
    with torch.inference_mode():
        np.testing.assert_allclose(y, model(torch.from_numpy(x)).numpy(), atol=1e-6)


def _clients_in_threads(srv, inputs, scale: float, requests: int) -> list[str]:
    """Client k sends ``requests`` requests ``inputs(k, i)`` to an EchoNet(scale) server, all
    clients starting together; returns what went wrong (wrong answers, errors, hung clients)."""
    errors: list[str] = []
    n = len(inputs)
    barrier = threading.Barrier(n)

    def worker(k: int) -> None:
        try:
            with srv.client(timeout=30) as c:
                barrier.wait(30)
                for i in range(requests):
                    x = inputs[k](i)
                    y = c.infer(x)
                    if y.dtype != x.dtype or not torch.equal(y, x * scale):
                        errors.append(f"client {k} request {i}: got {y.dtype} {list(y.shape)} {y.flatten()[0].item()}")
        except Exception as exc:  # noqa: BLE001
            errors.append(f"client {k}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors + [f"client {k} still running after 60 s" for k, t in enumerate(threads) if t.is_alive()]


def test_concurrent_clients_get_their_own_answers_and_batch():
    srv = InferenceServer(ECHO, {"scale": 3.0}, max_batch_size=8, max_wait_ms=50, start_timeout=120)
    srv.start()
    try:
        inputs = [lambda i, k=k: torch.full((1, 5), float(k * 1000 + i)) for k in range(4)]
        assert _clients_in_threads(srv, inputs, 3.0, 25) == []
        st = srv.stats()
        assert st["responses"] == 100 and st["errors"] == 0
        assert st["mean_batch"] > 1.0, st  # four busy clients share forwards
    finally:
        srv.close()


def test_a_batch_of_mixed_shapes_and_dtypes_is_split_by_kind():
    """Requests batched together but of different per-sample shapes or dtypes run as separate
    forwards of one batch; each caller gets its own answer, several requests long or one."""
    srv = InferenceServer(ECHO, {"scale": 2.0}, max_batch_size=8, max_wait_ms=200, start_timeout=120)
    srv.start()
    try:
        kinds = [((1, 5), torch.float32), ((2, 3), torch.float32), ((1, 5), torch.float64), ((3, 5), torch.float32)]
        inputs = [lambda i, k=k, s=s, d=d: torch.full(s, float(k * 100 + i), dtype=d) for k, (s, d) in enumerate(kinds)]
        assert _clients_in_threads(srv, inputs, 2.0, 10) == []
        st = srv.stats()
        assert st["responses"] == 40 and st["errors"] == 0
        assert st["max_batch"] > 1, st  # kinds were batched together, then split
    finally:
        srv.close()


def test_one_client_never_waits_for_a_batch(demo):
    srv, _ = demo  # max_wait_ms=20: a lone client must not pay it
    with srv.client() as c:
        for _ in range(10):
            c.infer(torch.randn(1, 8))
        after = c.stats()
    assert after["queue_wait_ms_max"] < 20.0, after


def _hybrid_server(repeat: int):
    """A server of a DemoNet whose forward repeats ``repeat`` times, a sample and its answer."""
    kw = dict(KW, hidden=256, depth=4, repeat=repeat)
    torch.manual_seed(0)
    model = DemoNet(**kw).eval()
    x = torch.randn(2, 8)
    with torch.inference_mode():
        ref = model(x)
    return InferenceServer(DEMO, kw, state_dict=model.state_dict(), num_threads=1, start_timeout=120), x, ref


def test_hybrid_wait_answers_as_blocking_does_and_finds_its_answers_by_polling():
    # A forward of about 13 ms, asleep for half of it: the answer comes while the caller polls,
    # also when a busy machine (CI: two workers and their scenarios on 2 cores) holds the caller
    # back for a few milliseconds after its send or its sleep. With a 1 ms forward, CI once found
    # 10 of 17 answers already there when the wait began.
    server, x, ref = _hybrid_server(repeat=200)
    with server as srv:
        with srv.client(wait="hybrid", hybrid_sleep=0.5) as c:
            for _ in range(20):
                assert torch.allclose(c.infer(x), ref, atol=1e-5)
            assert c.ping() < 10 and c.stats()["requests"] >= 20  # untimed calls wait as before
            counts = dict(c.wait_counts)
            c.wait = "block"
            c.infer(x)
            assert c.wait_counts == counts, "a blocking call went through the hybrid wait"
    # the first answers are timed while blocking; after that every wait ended one of four ways
    assert counts["no_history"] == 3
    assert sum(counts.values()) == 20
    # the answer comes during the wait's polling part, not to a caller asleep
    assert counts["answered_while_spinning"] >= 9, counts
    # each sleep that the timer ended measured the timer's lateness, which the next sleep allows for
    assert 1 <= len(c._oversleeps) <= counts["answered_while_spinning"] + counts["spin_gave_up"]
    assert all(v >= 0 for v in c._oversleeps)


def test_hybrid_wait_without_select_falls_back_to_poll(monkeypatch):
    """A socket past select()'s FD_SETSIZE makes select() raise ValueError: the sleep then
    uses poll(2) (whole milliseconds) and the call goes on as before."""
    import splitlearn.serving.client as client_mod

    server, x, ref = _hybrid_server(repeat=20)
    calls = []

    def no_select(*args, **kwargs):
        calls.append(args)
        raise ValueError("filedescriptor out of range in select()")

    with server as srv:
        with srv.client(wait="hybrid") as c:
            monkeypatch.setattr(client_mod.select, "select", no_select)
            for _ in range(10):
                assert torch.allclose(c.infer(x), ref, atol=1e-5)
            monkeypatch.undo()
    assert calls, "the hybrid wait never tried select()"
    assert c.wait_counts["no_history"] == 3 and sum(c.wait_counts.values()) == 10, c.wait_counts


def test_wait_modes_are_checked():
    with pytest.raises(ValueError, match="wait must be one of block, hybrid"):
        InferenceClient("/nonexistent/sock", authkey=None, wait="spin")
    with pytest.raises(ValueError, match="hybrid_sleep"):
        InferenceClient("/nonexistent/sock", authkey=None, hybrid_sleep=1.0)
    with pytest.raises(ServerUnavailable):  # a valid mode gets as far as connecting
        InferenceClient("/nonexistent/sock", authkey=None, wait="hybrid", connect_timeout=1)


def test_hybrid_wait_keeps_the_call_timeout_and_reports_a_dead_server(slow):
    srv = slow
    with srv.client(wait="hybrid") as c:
        c._answer_times.extend([0.01] * 5)  # expects answers in 10 ms: spins 20 ms, then blocks
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            c.infer(torch.randn(1, 8), timeout=0.5)
        assert time.monotonic() - t0 < 3
        assert c.wait_counts["spin_gave_up"] == 1
    result: list[BaseException | None] = []
    with srv.client(wait="hybrid", timeout=60) as c:
        c._answer_times.extend([20.0] * 5)  # expects 20 s: asleep for 18 s when the server dies

        def call() -> None:
            try:
                c.infer(torch.randn(1, 8))
                result.append(None)
            except BaseException as exc:  # noqa: BLE001
                result.append(exc)

        t = threading.Thread(target=call)
        t.start()
        with srv.client(timeout=10) as probe:
            _wait_until(lambda: probe.stats()["in_batch"], 30, "a batch in progress")
        t_kill = time.monotonic()
        os.kill(srv.pid, signal.SIGKILL)
        t.join(15)
        assert not t.is_alive(), "a hybrid wait outlived the server"
        assert time.monotonic() - t_kill < 5
        assert len(result) == 1 and isinstance(result[0], ServerUnavailable), result
        assert c.wait_counts["answered_while_asleep"] == 1  # the EOF woke the sleep


def test_bad_dtype_and_shape_are_errors_to_that_caller_only(demo):
    srv, model = demo
    with srv.client() as bad, srv.client() as good:
        with pytest.raises(ServerError, match="dtype float64") as e:
            bad.infer(torch.randn(1, 8, dtype=torch.float64))
        assert e.value.code == "bad_input"
        with pytest.raises(ServerError, match=r"shape \[1, 9\]"):
            bad.infer(torch.randn(1, 9))
        with pytest.raises(ServerError, match="leading batch"):
            bad.infer(torch.tensor(1.0))
        x = torch.randn(1, 8)
        assert bad.infer(x).shape == (1, 4)  # the same connection still works
        assert good.infer(x).shape == (1, 4)


def test_malformed_frame_gets_error_and_connection_survives(demo):
    srv, _ = demo
    with srv.client() as c:
        c.send_raw(b"this is not a splitlearn frame")
        f = c.recv_frame(timeout=10)
        assert f.type == wire.MsgType.ERROR and f.meta["error"] == "bad_frame" and "bad magic" in f.meta["message"]
        assert c.infer(torch.randn(1, 8)).shape == (1, 4)


def test_oversized_frame_closes_only_that_connection(demo):
    srv, _ = demo
    with srv.client() as bystander:
        with srv.client(max_frame=1 << 30) as c:
            try:
                c.send_raw(b"\x00" * (srv.max_frame + 1))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server read the length, answered, and closed while we still sent
            f = c.recv_frame(timeout=10)
            assert f.meta["error"] == "frame_too_large"
            with pytest.raises(ServerUnavailable):
                c.recv_frame(timeout=10)
        assert bystander.infer(torch.randn(1, 8)).shape == (1, 4)
    with srv.client() as c:
        with pytest.raises(wire.WireError, match="maximum frame size"):
            c.infer(torch.zeros(1, srv.max_frame // 4 + 1))  # refused before sending


def test_wrong_authkey_is_a_clear_error_within_timeout(demo):
    srv, _ = demo
    t0 = time.monotonic()
    with pytest.raises(HandshakeError, match="wrong authkey"):
        InferenceClient(srv.address, authkey=b"not the key", connect_timeout=5)
    assert time.monotonic() - t0 < 5
    with srv.client() as c:
        assert c.infer(torch.randn(1, 8)).shape == (1, 4)
        assert c.stats()["auth_failures"] >= 1


def test_client_without_authkey_is_rejected(demo):
    srv, _ = demo
    c = InferenceClient(srv.address, authkey=None, connect_timeout=5, timeout=5)
    try:
        with pytest.raises((wire.WireError, ServerUnavailable), match="authkey|closed|went away"):
            c.infer(torch.randn(1, 8))
    finally:
        c.close()


@pytest.mark.parametrize("how", ["wrong_key", "no_answer"])
def test_a_peer_that_fails_authentication_is_never_served(demo, how):
    srv, _ = demo
    with srv.client() as c:
        failures = c.stats()["auth_failures"]
    from fixtures.peers import served_after_a_failed_handshake

    asks = [wire.Frame(wire.MsgType.STATS, 1), wire.Frame(wire.MsgType.PING, 2)]
    served = served_after_a_failed_handshake(srv.address, how, asks)
    assert served == [], f"served after a failed handshake: {[getattr(f, 'meta', f) for f in served]}"
    with srv.client() as c:
        assert c.stats()["auth_failures"] == failures + 1
        assert c.infer(torch.randn(1, 8)).shape == (1, 4)


def test_start_error_is_clear():
    srv = InferenceServer("splitlearn.serving.demo_models:NoSuchNet", {}, start_timeout=60)
    with pytest.raises(ServerStartError, match="NoSuchNet"):
        srv.start()
    assert not srv.alive
    srv.close()


def test_child_dying_while_starting_is_clear():
    srv = InferenceServer("splitlearn.serving.demo_models:CrashNet", {"exit_code": 7}, start_timeout=60)
    with pytest.raises(ServerStartError, match="exit code 7"):
        srv.start()
    srv.close()


def test_child_hanging_while_starting_times_out_and_is_reaped():
    srv = InferenceServer("splitlearn.serving.demo_models:StuckNet", {}, start_timeout=8)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match="not ready within 8"):
        srv.start()
    assert time.monotonic() - t0 < 20
    assert srv.pid is None and not srv.alive
    srv.close()


def test_server_killed_mid_batch_every_caller_errors_then_restart(slow):
    srv = slow
    results: dict[int, BaseException | None] = {}

    def call(k: int) -> None:
        try:
            with srv.client(timeout=60) as c:
                c.infer(torch.randn(1, 8))
            results[k] = None
        except BaseException as exc:  # noqa: BLE001
            results[k] = exc

    threads = [threading.Thread(target=call, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    with srv.client(timeout=10) as probe:
        _wait_until(lambda: (lambda st: st["requests"] >= 3 and st["in_batch"])(probe.stats()), 30, "all requests in, a batch in progress")
    t_kill = time.monotonic()
    os.kill(srv.pid, signal.SIGKILL)
    for t in threads:
        t.join(15)
    assert not any(t.is_alive() for t in threads), "a caller still waits after the server died"
    assert time.monotonic() - t_kill < 15
    assert all(isinstance(e, ServerUnavailable) for e in results.values()), results
    srv.restart()
    with srv.client(timeout=60) as c:
        assert c.ping(timeout=10) < 10


def test_call_timeout_and_late_answer_is_not_misdelivered(slow):
    srv = slow
    x1, x2 = torch.randn(1, 8), torch.randn(1, 8)
    with srv.client() as c:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            c.infer(x1, timeout=0.3)
        assert time.monotonic() - t0 < 3
        y2 = c.infer(x2, timeout=120)  # the late answer to x1 arrives first and must be dropped
        y1 = c.infer(x1, timeout=120)
        assert torch.equal(c.infer(x2, timeout=120), y2)
    assert not torch.allclose(y1, y2)


def test_client_disconnecting_mid_request_does_not_hurt_others(slow):
    srv = slow
    gone = srv.client()
    gone.send_raw(wire.encode(wire.Frame(wire.MsgType.REQUEST, 1, tensors=[torch.randn(1, 8)])))
    with srv.client(timeout=10) as probe:
        _wait_until(lambda: probe.stats()["requests"] >= 1, 30, "request queued")
    gone.close()
    with srv.client(timeout=120) as c:
        assert c.infer(torch.randn(1, 8)).shape == (1, 4)
        st = c.stats()
    assert srv.alive and st["requests"] >= 2 and st["connections_open"] == 1
    assert st["requests"] == st["responses"] + st["errors"] + st["undeliverable"], st  # the lost answer counted too


def test_stop_is_clean_and_idempotent(demo):
    srv = InferenceServer(ECHO, {}, start_timeout=120)
    srv.start()
    path, pid = srv.address, srv.pid
    with srv.client() as c:
        c.infer(torch.ones(1, 2))
    stats = srv.stop()
    assert stats is not None and stats["responses"] == 1
    assert not os.path.exists(path)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert srv.stop() == stats
    srv.close()


def test_server_exits_when_its_owner_dies_and_removes_the_owners_directory(tmp_path):
    code = (
        "import sys\n"
        "from splitlearn.serving import InferenceServer\n"
        "if __name__ == '__main__':\n"
        "    s = InferenceServer('splitlearn.serving.demo_models:EchoNet', {}, start_timeout=120)\n"
        "    s.start(); print(s.pid, s.address, flush=True)\n"
        "    import os; os._exit(0)\n"
    )
    script = tmp_path / "owner.py"
    script.write_text(code)
    scratch = tempfile.mkdtemp(prefix="sr-owner-")  # short: tmp_path is too long for a socket path
    try:
        env = dict(os.environ, TMPDIR=scratch)
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        pid_s, address = out.stdout.strip().splitlines()[-1].split(" ", 1)
        assert os.path.dirname(address).startswith(scratch)
        try:
            psutil.Process(int(pid_s)).wait(30)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            psutil.Process(int(pid_s)).kill()
            pytest.fail("server outlived its owner by 30 s")
        # the owner never called close(): the server removed its directory (socket, weights) itself
        assert not os.path.exists(os.path.dirname(address)), sorted(os.listdir(scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture()
def scratch_tmp(monkeypatch):
    """A short, empty temp dir in place of the system's (tmp_path is too long for a socket)."""
    scratch = tempfile.mkdtemp(prefix="sr-t-")
    monkeypatch.setattr(tempfile, "tempdir", scratch)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_a_server_that_fails_to_start_in_a_with_block_leaves_nothing_behind(scratch_tmp):
    crash = "splitlearn.serving.demo_models:CrashNet"
    with pytest.raises(ServerStartError, match="exit code 7"):
        with InferenceServer(crash, {"exit_code": 7}, state_dict={"w": torch.ones(3)}, start_timeout=60):
            pytest.fail("the body ran although the server did not start")
    assert os.listdir(scratch_tmp) == []  # its directory and the weights file written into it are gone


def test_a_server_dropped_without_close_removes_its_directory(scratch_tmp):
    import gc

    srv = InferenceServer(ECHO, {}, state_dict=EchoNet(3.0).state_dict(), start_timeout=120)
    srv.start()
    d, pid = srv._dir, srv.pid
    assert os.path.exists(os.path.join(d, "weights.safetensors"))
    del srv
    gc.collect()
    assert os.listdir(scratch_tmp) == []
    try:
        psutil.Process(pid).wait(10)
    except psutil.NoSuchProcess:
        pass


def test_an_owner_that_exits_on_an_error_without_close_leaves_nothing_behind(tmp_path):
    code = (
        "from splitlearn.serving import InferenceServer\n"
        "from splitlearn.serving.demo_models import EchoNet\n"
        "if __name__ == '__main__':\n"
        "    s = InferenceServer('splitlearn.serving.demo_models:EchoNet', {}, state_dict=EchoNet().state_dict(), start_timeout=120)\n"
        "    s.start(); print(s.pid, flush=True)\n"
        "    raise RuntimeError('the owner fails')\n"
    )
    script = tmp_path / "owner.py"
    script.write_text(code)
    scratch = tempfile.mkdtemp(prefix="sr-owner-")
    try:
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=dict(os.environ, TMPDIR=scratch))
        assert out.returncode == 1 and "the owner fails" in out.stderr, out.stderr[-3000:]
        pid = int(out.stdout.strip().splitlines()[-1])
        try:
            psutil.Process(pid).wait(30)
        except psutil.NoSuchProcess:
            pass
        assert os.listdir(scratch) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_a_socket_path_too_long_is_a_clear_error_before_anything_starts(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    srv = InferenceServer(ECHO, {}, start_timeout=60)
    with pytest.raises(ValueError, match="the limit is 107: point TMPDIR"):
        srv.start()
    assert srv.pid is None and os.listdir(deep) == []  # nothing spawned, nothing left


def test_requests_in_flight_per_connection_are_capped():
    kw = dict(KW, hidden=512, depth=4, repeat=1500)
    srv = InferenceServer(DEMO, kw, num_threads=1, start_timeout=120, warmup=False, max_pending=2)
    srv.start()
    try:
        with srv.client(timeout=120) as c:
            for rid in range(1, 5):  # pipelined: the first is still computing when the others arrive
                c.send_raw(wire.encode(wire.Frame(wire.MsgType.REQUEST, rid, tensors=[torch.randn(1, 8)])))
            frames = {f.request_id: f for f in (c.recv_frame(timeout=120) for _ in range(4))}
        assert sorted(frames) == [1, 2, 3, 4]
        kinds = [frames[i].type for i in range(1, 5)]
        assert kinds[:2] == [wire.MsgType.RESPONSE, wire.MsgType.RESPONSE]
        assert all(frames[i].meta.get("error") == "too_many_pending" for i in (3, 4))
        with srv.client(timeout=120) as c:  # the count came back down
            assert c.infer(torch.randn(1, 8)).shape == (1, 4)
    finally:
        srv.close()


def test_client_that_stops_reading_does_not_stall_the_others():
    """A client that sends and never reads fills its socket: its answers wait in an outbox (not
    in the batch loop's send), and past max_outbox it is dropped; everyone else is served as
    before. With a blocking send the batch loop would sit in the stuck client's send for
    send_timeout (30 s here) and the prompt caller below would time out."""
    srv = InferenceServer(ECHO, {"scale": 2.0}, max_outbox=2 << 20, send_timeout=30, start_timeout=120)
    srv.start()
    try:
        stuck = srv.client(timeout=30)
        big = torch.ones(1, 256 * 1024)  # 1 MiB in, 1 MiB out
        sent = 0
        for rid in range(1, 17):
            try:
                stuck.send_raw(wire.encode(wire.Frame(wire.MsgType.REQUEST, rid, tensors=[big])))
            except OSError:  # dropped already: the server stopped reading it too
                break
            sent += 1
        assert sent >= 3
        with srv.client(timeout=5) as c:
            t0 = time.monotonic()
            for i in range(20):
                x = torch.full((1, 4), float(i))
                assert torch.equal(c.infer(x), x * 2)
            assert time.monotonic() - t0 < 5
            _wait_until(lambda: c.stats()["slow_clients_dropped"] == 1, 30, "the stuck client dropped")
            st = c.stats()
        assert st["connections_open"] == 1 and st["responses"] >= 20
        # the stuck client reads what was sent before it was dropped (possibly nothing whole:
        # the first answer may have been cut mid-frame), then the end of the stream
        got = 0
        with pytest.raises(ServerUnavailable):
            while True:
                f = stuck.recv_frame(timeout=10)
                assert f.type == wire.MsgType.RESPONSE and torch.equal(f.tensors[0], big * 2)
                got += 1
        assert got < sent
        stuck.close()
    finally:
        srv.close()


def test_connection_cap_refuses_extra_clients_and_frees_slots():
    srv = InferenceServer(ECHO, {}, max_connections=2, start_timeout=120)
    srv.start()
    try:
        a, b = srv.client(timeout=10), srv.client(timeout=10)
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailable, match="closed the connection during authentication"):
            srv.client(timeout=10, connect_timeout=10)
        assert time.monotonic() - t0 < 5  # refused at once, not at a timeout
        b.close()
        _wait_until(lambda: a.stats()["connections_open"] == 1, 30, "the closed client forgotten")
        with srv.client(timeout=10) as c:
            assert torch.equal(c.infer(torch.ones(1, 2)), torch.full((1, 2), 2.0))
            assert c.stats()["connections_refused"] == 1
        a.close()
    finally:
        srv.close()
    with pytest.raises(ValueError):
        InferenceServer(ECHO, {}, max_connections=0)


def _silent_unix(path, n):
    import socket

    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)  # and never answers the challenge
        socks.append(s)
    return socks


def test_silent_connections_hold_places_for_the_grace_not_the_handshake_timeout():
    # every place a connection may hold (max_connections 4) taken by clients that never speak,
    # two more queued behind them: good clients still get in, each by cutting the oldest silent
    # one once it has run the grace (0.3 s), long before the 30 s handshake timeout frees it
    srv = InferenceServer(ECHO, {}, max_connections=4, handshake_grace=0.3, handshake_timeout=30.0, start_timeout=120)
    srv.start()
    silent = _silent_unix(srv.address, 6)
    clients = []
    try:
        t0 = time.monotonic()
        clients.append(srv.client(timeout=10, connect_timeout=10))
        waited = time.monotonic() - t0
        assert waited < 8, f"the first good client waited {waited:.1f}s"
        # one cut per newcomer (silent 5, silent 6, the good client); the other three hold the
        # places left, and nobody waits behind them, so they are not cut
        st = clients[0].stats()
        assert (st["handshakes_cut"], st["handshakes_pending"]) == (3, 3)
        for s in silent[:3]:
            s.settimeout(10)
            while s.recv(4096):  # the challenge, then EOF
                pass
        for _ in range(2):  # each newcomer cuts one more
            clients.append(srv.client(timeout=10, connect_timeout=10))
        for c in clients:
            assert torch.equal(c.infer(torch.ones(1, 2)), torch.full((1, 2), 2.0))
        st = clients[0].stats()
        assert (st["handshakes_cut"], st["handshakes_pending"], st["connections_open"]) == (5, 1, 3)
        assert st["auth_failures"] == 0 and st["connections_refused"] == 0
        waited = time.monotonic() - t0
        assert waited < 20, f"three good clients took {waited:.1f}s"
    finally:
        for c in clients:
            c.close()
        for s in silent:
            s.close()
        srv.close()


def test_without_a_grace_silent_connections_lock_everyone_out():
    # the same flood with handshake_grace=None (places held for the whole handshake timeout, as
    # before the gate cut anything): the good client gives up while it waits for a place
    srv = InferenceServer(ECHO, {}, max_connections=4, handshake_grace=None, handshake_timeout=30.0, start_timeout=120)
    srv.start()
    silent = _silent_unix(srv.address, 4)
    try:
        with pytest.raises(HandshakeError, match="did not finish within"):
            srv.client(timeout=2, connect_timeout=2)
    finally:
        for s in silent:
            s.close()  # their places come back at EOF, not at the timeout
        try:
            with srv.client(timeout=10, connect_timeout=10) as c:
                assert c.stats()["handshakes_cut"] == 0
        finally:
            srv.close()


def test_recv_frame_waits_for_its_timeout_and_reports_eof():
    import socket
    from multiprocessing.connection import Connection

    from splitlearn.serving import transport

    sa, sb = socket.socketpair()
    a, b = transport.Channel(sa.detach()), Connection(sb.detach())  # CPython's framing on the other end
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        transport.recv_frame(a, timeout=0.2)
    assert 0.15 < time.monotonic() - t0 < 5
    b.send_bytes(wire.encode(wire.Frame(wire.MsgType.PONG, 5)))
    assert transport.recv_frame(a, timeout=1e12).request_id == 5  # past poll(2)'s range of milliseconds
    b.close()
    with pytest.raises(ServerUnavailable):
        transport.recv_frame(a, timeout=5)
    a.close()


@pytest.fixture()
def silent_server():
    """A peer that authenticates a client and then never answers (nor, unless told, reads): a
    server paused or partitioned mid-call. Yields (address, authkey, the accepted Channels)."""
    from splitlearn.serving import transport

    d, path = transport.private_socket_path("splitrepro-silent-")
    lsock = transport.listen_unix(path)
    key = os.urandom(16)
    accepted: list = []

    def serve() -> None:
        s, _ = lsock.accept()
        ch = transport.wrap(s)
        transport.server_handshake(ch, key, 10)
        accepted.append(ch)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield path, key, accepted
    finally:
        lsock.close()
        t.join(10)
        for ch in accepted:
            ch.close()
        shutil.rmtree(d, ignore_errors=True)


def _call_in_thread(fn) -> tuple[threading.Thread, list]:
    out: list = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - examined by the test
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_close_from_another_thread_ends_a_waiting_call(silent_server):
    """close() wakes a call blocked on the connection (Linux does not wake a poll(2) whose
    descriptor another thread closes: the call waited out its whole timeout, and could then read
    from whatever connection took the descriptor number)."""
    path, key, accepted = silent_server
    c = InferenceClient(path, authkey=key, timeout=60, as_numpy=True)
    t, out = _call_in_thread(lambda: c.infer(np.zeros((1, 8), np.float32)))
    _wait_until(lambda: accepted and accepted[0].poll(0), 10, "the request reached the server")
    t0 = time.monotonic()
    c.close()
    t.join(10)
    assert not t.is_alive(), "the call still waits 10 s after close()"
    assert time.monotonic() - t0 < 5 and len(out) == 1 and isinstance(out[0], ServerUnavailable), out
    c.close()  # again: nothing to do


@pytest.mark.parametrize("cut", ["answer_stops_mid_frame", "server_stops_reading"])
def test_call_timeout_covers_the_whole_frame_both_ways(silent_server, cut):
    """A server that sends part of an answer and stops, or stops taking a large request: the call
    ends at its timeout (TimeoutError), the connection is then marked unusable (out of step)."""
    path, key, accepted = silent_server
    with InferenceClient(path, authkey=key, timeout=0.3, as_numpy=True) as c:
        _wait_until(lambda: accepted, 10, "the connection accepted")
        if cut == "answer_stops_mid_frame":
            x = np.zeros((1, 8), np.float32)
            os.write(accepted[0].fileno(), (1000).to_bytes(4, "big") + b"y" * 10)  # 10 bytes of 1000
        else:
            x = np.zeros((2048, 1024), np.float32)  # 8 MiB: more than the socket buffers hold
        t, out = _call_in_thread(lambda: c.infer(x))
        t.join(10)
        assert not t.is_alive(), "the call outlived its 0.3 s timeout by 10 s"
        assert len(out) == 1 and isinstance(out[0], TimeoutError) and "no longer usable" in str(out[0]), out
        with pytest.raises(ServerUnavailable, match="unusable"):
            c.infer(np.zeros((1, 8), np.float32))


def test_accept_errors_do_not_end_the_accept_loop():
    """EMFILE and the like lose one connection, not the listener (the loop used to end on any
    OSError, leaving a live server that never accepted again)."""
    import errno

    from splitlearn.serving.server import ConnServer

    srv = ConnServer({"authkey": "00", "max_frame": 1 << 20}, None)
    calls = []

    class Flaky:
        def accept(self):
            calls.append(1)
            if len(calls) == 1:
                raise OSError(errno.EMFILE, "Too many open files")
            srv.stopping.set()  # as begin_stop does before it closes the socket
            raise OSError(errno.EBADF, "Bad file descriptor")

    srv.lsock = Flaky()
    srv.accept_loop()
    assert len(calls) == 2 and srv.snapshot()["accept_errors"] == 1


@pytest.mark.parametrize("code", ["EBADF", "ENOTSOCK", "EINVAL"])
def test_a_listening_socket_gone_stops_the_server_instead_of_retrying_forever(code, capsys):
    """EBADF (or ENOTSOCK, EINVAL) from accept outside a stop: the listener itself is unusable and
    no retry clears it. The loop stops the server (so its owner sees it exit and can restart it)
    rather than polling a dead socket every 50 ms behind a server that looks alive."""
    import errno

    from splitlearn.serving.server import ConnServer

    err = getattr(errno, code)
    srv = ConnServer({"authkey": "00", "max_frame": 1 << 20}, None)
    calls = []

    class Gone:
        closed = False

        def accept(self):
            calls.append(1)
            if len(calls) > 1:  # a retry: end the loop, the assertion below reports it
                srv.stopping.set()
            raise OSError(err, os.strerror(err))

        def shutdown(self, how):
            pass

        def close(self):
            self.closed = True

    srv.lsock = lsock = Gone()
    srv.accept_loop()
    assert calls == [1], f"{code}: accept retried, {len(calls)} calls"
    assert srv.stopping.is_set() and lsock.closed and srv.snapshot()["accept_errors"] == 1
    assert "listening socket unusable" in capsys.readouterr().err


def test_close_all_survives_a_connection_closed_under_it():
    from splitlearn.serving.server import ConnServer, _Conn

    held = []

    class ClosedMeanwhile:  # its reader closed it between close_all's look and its shutdown
        closed = False

        def fileno(self):
            held.append(srv.conns[1].send_lock.locked())
            raise OSError("handle is closed")

    srv = ConnServer({"authkey": "00", "max_frame": 1 << 20}, None)
    srv.conns = {1: _Conn(ClosedMeanwhile(), 1)}
    srv.close_all()
    assert not srv.conns[1].alive
    # looked at under the send lock, under which the reader closes it (a closed descriptor's
    # number may already be another connection's)
    assert held == [True]


def test_hybrid_wait_unlearns_a_burst_of_late_timers(silent_server):
    """The timer's lateness is learnt from the sleeps. Once a busy spell had made it larger than
    the sleep, no wait slept any more, nothing new was learnt, and every wait spun from its start
    for good (a matrix cell: 2.1 ms of client CPU per 2.1 ms call). The allowance is now at most
    half the sleep: a wait still sleeps and measures the timer again."""
    path, key, accepted = silent_server
    with InferenceClient(path, authkey=key, wait="hybrid") as c:
        c._answer_times.extend([0.01] * 32)  # answers take 10 ms
        c._oversleeps.extend([0.05] * 32)  # and the timer was 50 ms late, once
        t = time.monotonic()
        c._hybrid_wait(t, t + 0.2)  # no answer comes: sleeps, then spins to 2x the median
    assert c.wait_counts["spin_gave_up"] == 1
    assert c._oversleeps[-1] < 0.05, "the wait did not sleep, so it learnt nothing new"


def test_a_request_that_stops_half_way_is_dropped_at_send_timeout():
    """An (authenticated) client that sends part of a request and stops held its connection's
    thread for ever. Idle between requests it may be as long as it likes; half-way through one,
    the rest must come within send_timeout: then it gets an error and the connection is closed."""
    srv = InferenceServer(ECHO, {}, send_timeout=0.5, start_timeout=120)
    srv.start()
    try:
        with srv.client(timeout=10) as c:
            assert torch.equal(c.infer(torch.ones(1, 2)), torch.full((1, 2), 2.0))  # idle before: fine
            os.write(c._conn.fileno(), (1000).to_bytes(4, "big") + b"y" * 10)  # 10 bytes of 1000
            t0 = time.monotonic()
            f = c.recv_frame(timeout=10)
            assert f.type == wire.MsgType.ERROR and f.meta["error"] == "frame_timeout", f.meta
            assert time.monotonic() - t0 < 5
            with pytest.raises(ServerUnavailable):
                c.recv_frame(timeout=10)
        with srv.client(timeout=10) as c:
            assert c.stats()["slow_clients_dropped"] == 1 and c.stats()["connections_open"] == 1
    finally:
        srv.close()


KINDS = "splitlearn.serving.demo_models:OutputKindNet"


def test_an_answer_the_wire_cannot_carry_is_an_error_to_that_caller_only():
    """A model whose output cannot be encoded (sparse, on the meta device, not a tensor): the
    encoding failure escaped the batch loop and the server process exited, so every client got
    ServerUnavailable. Now that caller gets an error answer (bad_output), everyone else, that
    caller included, is served as before; a lazy negation is sent as its values."""
    srv = InferenceServer(KINDS, {}, max_wait_ms=1, start_timeout=120)
    srv.start()
    try:
        with srv.client(timeout=30) as a, srv.client(timeout=30) as b:
            for kind, match in [(1, "sparse_coo"), (3, "returned dict, not a tensor"), (4, "meta device")]:
                with pytest.raises(ServerError, match=match) as e:
                    a.infer(torch.full((2, 3), float(kind)))
                assert e.value.code == "bad_output"
                assert b.ping(timeout=10) < 10  # the server is still there
            assert torch.equal(a.infer(torch.full((2, 3), 2.0)), torch.full((2, 3), -2.0))
            assert torch.equal(b.infer(torch.zeros(1, 3)), torch.zeros(1, 3))
            st = b.stats()
        assert srv.alive
        assert (st["requests"], st["responses"], st["errors"], st["undeliverable"]) == (5, 2, 3, 0), st
    finally:
        srv.close()


def _worker(model, **cfg):
    """An inference server's worker in this process, without sockets: what it sends is decoded
    into ``sent`` as (connection id, frame)."""
    from splitlearn.serving.server import _InferenceWorker

    w = _InferenceWorker({"authkey": "00", "max_frame": 1 << 20, "max_batch_size": 8, "max_wait_ms": 0, **cfg}, None)
    w.torch, w.device, w.model = torch, torch.device("cpu"), model
    w.input_shape = w.input_dtype = w._input_tdtype = None
    sent: list = []

    def send_encoded(c, data):
        if not c.alive:
            return False
        sent.append((c.cid, wire.decode(data)))
        return True

    w._send_encoded = send_encoded
    return w, sent


def _request(w, c, rid, x):
    w.on_frame(c, wire.Frame(wire.MsgType.REQUEST, rid, tensors=[x]))


def test_outputs_that_cannot_be_split_among_batched_requests_go_again_one_by_one():
    """Requests batched together, and a model whose output has no row per sample (or is no
    tensor): never a model_error from inside split. The batch goes again one request at a time:
    an output with no batch rows is answered as the model returned it (as for a lone request),
    one that is no tensor is bad_output to each caller, saying why."""
    from splitlearn.serving.demo_models import OutputKindNet
    from splitlearn.serving.server import _Conn

    for kind, match in [(5, None), (3, "returned dict, not a tensor")]:
        w, sent = _worker(OutputKindNet())
        a, b = _Conn(None, 1), _Conn(None, 2)
        _request(w, a, 1, torch.full((1, 3), float(kind)))
        _request(w, b, 2, torch.full((2, 3), float(kind)))
        w.begin_stop()
        w.batch_loop()  # both requests waited in the queue: one batch of two
        assert sorted(cid for cid, _ in sent) == [1, 2]
        for _, f in sent:
            if match is None:
                assert f.type == wire.MsgType.RESPONSE, f.meta
            else:
                assert f.type == wire.MsgType.ERROR and f.meta["error"] == "bad_output" and match in f.meta["message"], f.meta
        st = w.snapshot()
        assert st["max_batch"] == 2 and st["batch_retries"] == 1, st


class _FailsOnNegative(torch.nn.Module):
    """Doubles its input; raises on a negative value (a request the model cannot take, like a
    token id its embedding lacks)."""

    def forward(self, x):
        if bool((x < 0).any()):
            raise ValueError("negative input")
        return x * 2


def test_a_request_that_fails_the_model_fails_alone_not_its_whole_batch():
    """One request the model raises on, batched with others from other clients: before, every
    request of the batch got its model_error; now the batch goes again one request at a time
    and only that request's caller gets the error."""
    from splitlearn.serving.server import _Conn

    w, sent = _worker(_FailsOnNegative())
    conns = [_Conn(None, i) for i in (1, 2, 3)]
    xs = [torch.ones(1, 2), -torch.ones(2, 2), torch.full((3, 2), 3.0)]
    for rid, (c, x) in enumerate(zip(conns, xs, strict=True), 1):
        _request(w, c, rid, x)
    w.begin_stop()
    w.batch_loop()  # all three waited in the queue: one batch of three
    by_conn = {cid: f for cid, f in sent}
    assert sorted(by_conn) == [1, 2, 3]
    assert by_conn[2].type == wire.MsgType.ERROR and by_conn[2].meta["error"] == "model_error"
    assert "negative input" in by_conn[2].meta["message"]
    for cid, x in ((1, xs[0]), (3, xs[2])):
        f = by_conn[cid]
        assert f.type == wire.MsgType.RESPONSE and f.request_id == cid and torch.equal(f.tensors[0], x * 2), f
    st = w.snapshot()
    assert (st["batches"], st["max_batch"], st["batch_retries"]) == (1, 3, 1), st
    assert (st["requests"], st["responses"], st["errors"], st["undeliverable"]) == (3, 2, 1, 0), st


def test_every_request_is_counted_once_however_it_ends():
    """requests == responses + errors + undeliverable. A request whose client went away while it
    waited in the queue was dropped from its batch uncounted; and one that came in as the server
    stopped (after the stop check, after the batch loop's last drain) was put in a queue nobody
    read again, never answered."""
    import threading as th

    from splitlearn.serving.server import _Conn

    w, sent = _worker(EchoNet(2.0))
    a, gone = _Conn(None, 1), _Conn(None, 2)
    _request(w, a, 1, torch.ones(1, 2))
    _request(w, gone, 2, torch.ones(1, 2))
    _request(w, a, 3, torch.ones(1, 2))
    gone.alive = False  # went away while its request waited
    w.begin_stop()
    w.batch_loop()
    assert [(cid, f.request_id, f.type) for cid, f in sent] == [(1, 1, wire.MsgType.RESPONSE), (1, 3, wire.MsgType.RESPONSE)]
    # a request that passed the stop check before the stop, and reaches the queue after the drain
    w.stopping = th.Event()
    _request(w, a, 4, torch.ones(1, 2))
    assert sent[-1][1].request_id == 4 and sent[-1][1].meta.get("error") == "shutting_down"
    assert w.queue.empty() and a.pending == 0 and gone.pending == 0
    st = w.snapshot()
    assert (st["requests"], st["responses"], st["errors"], st["undeliverable"]) == (4, 2, 1, 1), st
    assert st["requests"] == st["responses"] + st["errors"] + st["undeliverable"]


def test_an_answer_that_finds_no_writer_thread_drops_that_client_without_raising(monkeypatch):
    """An answer the socket does not take at once needs the connection's writer thread; when no
    thread can be started, Thread.start's RuntimeError escaped send (and the batch loop). Now
    that client is dropped and send returns False."""
    import socket

    from splitlearn.serving import transport
    from splitlearn.serving.server import ConnServer, _Conn

    srv = ConnServer({"authkey": "00", "max_frame": 1 << 22}, None)
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    try:
        while True:  # the peer reads nothing: fill the socket
            ours.send(b"x" * 65536)
    except BlockingIOError:
        pass
    c = _Conn(transport.Channel(ours.detach()), 1)
    c.sock = socket.socket(fileno=c.conn.fileno())

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    try:
        assert srv.send(c, wire.Frame(wire.MsgType.PONG, 1, {"pad": "x" * 10_000})) is False
        assert not c.alive and not c.outbox and c.outbox_bytes == 0 and c.writer is None
    finally:
        monkeypatch.undo()
        c.sock.detach()
        c.conn.close()
        peer.close()


def test_an_answer_that_cannot_even_be_an_error_shuts_the_connection_under_its_send_lock(monkeypatch):
    """With a max_frame too small for even the error answer, the connection is given up; its
    descriptor was shut down without the send lock, under which the reader closes it: closed
    meanwhile, that number may already be another client's connection. Now under the lock."""
    import socket

    from splitlearn.serving import server, transport
    from splitlearn.serving.server import ConnServer, _Conn

    srv = ConnServer({"authkey": "00", "max_frame": 16}, None)
    ours, peer = socket.socketpair()
    c = _Conn(transport.Channel(ours.detach()), 1)
    held = []
    real = transport.shutdown_fd

    def shutdown_fd(fd):
        held.append(c.send_lock.locked())
        real(fd)

    monkeypatch.setattr(server.transport, "shutdown_fd", shutdown_fd)
    try:
        assert srv.send(c, wire.Frame(wire.MsgType.PONG, 1, {"pad": "x" * 100})) is False
        assert held == [True] and not c.alive
        assert peer.recv(1) == b""  # shut down: the peer reads EOF
    finally:
        c.conn.close()
        peer.close()


def test_an_answer_read_whole_but_undecodable_leaves_the_connection_usable():
    """An as_numpy client that gets a bfloat16 answer: the frame was read whole, so the stream is
    in step, yet the client marked the connection broken on any WireError and every later call
    raised ServerUnavailable. Now that call raises WireError and the next ones work."""
    srv = InferenceServer(ECHO, {"scale": 2.0}, start_timeout=120)
    srv.start()
    try:
        with srv.client(timeout=30, as_numpy=True) as c:
            with pytest.raises(wire.WireError, match="bfloat16"):
                c.infer(torch.ones(1, 3, dtype=torch.bfloat16))
            assert c.ping(timeout=10) < 10
            np.testing.assert_array_equal(c.infer(np.ones((1, 3), np.float32)), np.full((1, 3), 2.0, np.float32))
    finally:
        srv.close()


def test_an_earlier_calls_late_answer_that_cannot_be_decoded_is_dropped(silent_server):
    """A call times out; its answer comes late and cannot be decoded (bfloat16 for an as_numpy
    client). The next call drops it, as it drops a late answer it can read, and gets its own."""
    from splitlearn.serving import transport

    path, key, accepted = silent_server
    with InferenceClient(path, authkey=key, timeout=0.3, as_numpy=True) as c:
        with pytest.raises(TimeoutError):
            c.infer(np.zeros((1, 8), np.float32))  # request 1: the server does not answer in time
        _wait_until(lambda: accepted, 10, "the connection accepted")
        ch = accepted[0]
        late = wire.Frame(wire.MsgType.RESPONSE, 1, tensors=[torch.zeros(1, 8, dtype=torch.bfloat16)])
        ch.send_bytes(wire.encode(late))
        ch.send_bytes(wire.encode(wire.Frame(wire.MsgType.PONG, 2)))  # the answer to the next call
        assert c.ping(timeout=10) < 10
        # an answer over max_frame is never read: that one does break the connection
        c.max_frame = 1000
        ch.send_bytes(wire.encode(wire.Frame(wire.MsgType.PONG, 3, {"pad": "x" * 2000})))
        with pytest.raises(transport.UnreadFrame):
            c.ping(timeout=10)
        with pytest.raises(ServerUnavailable, match="unusable"):
            c.ping(timeout=10)


def test_answers_that_cannot_be_encoded_say_why():
    """Every encoding failure of an answer was reported as response_too_large (a model that
    returned something not a tensor too); the error frame now names the real cause."""
    from splitlearn.serving.server import ConnServer

    srv = ConnServer({"authkey": "00", "max_frame": 4096}, None)
    cases = [
        (wire.Frame(wire.MsgType.RESPONSE, 7, tensors=[torch.zeros(2000)]), "response_too_large", "maximum frame size of 4096"),
        (wire.Frame(wire.MsgType.RESPONSE, 8, tensors=[{"a": 1}]), "bad_output", "cannot encode dict: not a tensor"),
        (wire.Frame(wire.MsgType.RESPONSE, 9, tensors=[torch.eye(2).to_sparse()]), "bad_output", "sparse_coo"),
        (wire.Frame(wire.MsgType.STATS_REPLY, 10, {"pad": "x" * 5000}), "response_too_large", "maximum frame size"),
    ]
    for frame, code, match in cases:
        data, got = srv.encode_answer(frame)
        f = wire.decode(data)
        assert got == code and f.type == wire.MsgType.ERROR and f.request_id == frame.request_id, f
        assert f.meta["error"] == code and match in f.meta["message"], f.meta
    data, got = srv.encode_answer(wire.Frame(wire.MsgType.RESPONSE, 11, tensors=[torch.ones(2)]))
    assert got is None and torch.equal(wire.decode(data).tensor, torch.ones(2))
    tiny = ConnServer({"authkey": "00", "max_frame": 40}, None)  # not even an error answer fits
    assert tiny.encode_answer(cases[0][0]) == (None, "response_too_large")


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("value", [NAN, INF, -1.0, 0.0], ids=["nan", "inf", "negative", "zero"])
@pytest.mark.parametrize(
    "make",
    [
        lambda v: InferenceServer(ECHO, {}, handshake_timeout=v),
        lambda v: InferenceServer(ECHO, {}, send_timeout=v),
        lambda v: InferenceServer(ECHO, {}, start_timeout=v),
        lambda v: InferenceClient("/nonexistent/sock", authkey=None, timeout=v),
        lambda v: InferenceClient("/nonexistent/sock", authkey=None, connect_timeout=v),
    ],
    ids=["handshake_timeout", "send_timeout", "start_timeout", "client_timeout", "connect_timeout"],
)
def test_timeouts_must_be_finite_and_positive(make, value):
    """NaN and inf were taken and crashed threads later: OverflowError from a poll or a lock
    given inf (a connection's reader, its writer, the handshake's watchdog), ValueError for NaN.
    They are refused when the server or client is built; None is the way to say no limit, where
    there may be none."""
    with pytest.raises(ValueError, match="must be finite"):
        make(value)


@pytest.mark.parametrize("value", [NAN, INF, -1.0], ids=["nan", "inf", "negative"])
def test_waits_that_may_be_zero_refuse_nan_and_inf(value):
    """max_wait_ms=inf made the batch loop's queue.get(timeout=inf) raise OverflowError, which
    ended the batch loop and with it the server; handshake_grace=inf did the same to the accept
    loop's wait. 0 is a valid value for both."""
    with pytest.raises(ValueError, match="max_wait_ms must be finite and >= 0"):
        InferenceServer(ECHO, {}, max_wait_ms=value)
    with pytest.raises(ValueError, match="handshake_grace must be finite and >= 0"):
        InferenceServer(ECHO, {}, handshake_grace=value)
    from splitlearn.serving.server import HandshakeGate

    with pytest.raises(ValueError, match="handshake_grace must be finite"):
        HandshakeGate(4, grace=value)
    srv = InferenceServer(ECHO, {}, max_wait_ms=0, handshake_grace=0, start_timeout=None)  # and None: no limit
    assert (srv.max_wait_ms, srv.handshake_grace, srv.start_timeout) == (0.0, 0.0, None)
    assert InferenceServer(ECHO, {}, handshake_grace=None).handshake_grace is None


def test_a_call_with_a_nan_or_inf_timeout_is_refused_before_it_sends(silent_server):
    """A per-call timeout of inf raised OverflowError out of the wait for the answer, after the
    request was sent; NaN timed out at once. Both are refused before anything is sent, and the
    connection stays usable."""
    from splitlearn.serving import transport

    path, key, accepted = silent_server
    with InferenceClient(path, authkey=key, timeout=0.3, as_numpy=True) as c:
        for bad in (NAN, INF):
            with pytest.raises(ValueError, match="timeout must be finite"):
                c.infer(np.zeros((1, 8), np.float32), timeout=bad)
        _wait_until(lambda: accepted, 10, "the connection accepted")
        assert not accepted[0].poll(0)  # nothing was sent
        assert c._broken is None
        with pytest.raises(TimeoutError):
            c.ping(timeout=0)  # 0: no wait at all (the request goes, the answer is not waited for)
    assert transport._ms(INF) == transport._ms(1e12) == 2**31 - 1  # a wait past poll's range polls again


def test_a_call_waiting_behind_another_on_the_same_client_keeps_its_timeout(silent_server):
    """Calls on one client take turns on its connection. A call that found another one under way
    waited for it without a limit: with the first call's timeout at 60 s, a ping(timeout=0.3)
    from a second thread hung for the full 60 s. Its timeout covers the wait for its turn too."""
    path, key, accepted = silent_server
    c = InferenceClient(path, authkey=key, timeout=60, as_numpy=True)
    try:
        t1, out1 = _call_in_thread(lambda: c.infer(np.zeros((1, 8), np.float32)))  # never answered
        _wait_until(lambda: accepted and accepted[0].poll(0), 10, "the first request reached the server")
        t0 = time.monotonic()
        t2, out2 = _call_in_thread(lambda: c.ping(timeout=0.3))
        t2.join(5)
        assert not t2.is_alive(), "a call with a 0.3 s timeout still waits 5 s later"
        assert len(out2) == 1 and isinstance(out2[0], TimeoutError) and time.monotonic() - t0 < 3, out2
        assert c._broken is None  # nothing of it was sent: the connection is still usable
    finally:
        c.close()
        t1.join(10)
        t2.join(10)


def test_two_threads_closing_one_client_never_shut_down_a_descriptor_it_no_longer_owns(silent_server, monkeypatch):
    """close() read the descriptor number, shut it down, then closed it under the call lock. A
    second close() in another thread (a watchdog, and the owner's ``with`` block ending) could
    read the same number, lose the processor, and shut the number down after the first close()
    had closed it: by then it may be another connection's (the next socket opened takes the
    lowest free number). Now one close() at a time: the second finds the connection closed."""
    from splitlearn.serving import client as client_mod

    path, key, accepted = silent_server
    c = InferenceClient(path, authkey=key, timeout=10, as_numpy=True)
    fd = c._conn.fileno()
    real_shutdown = client_mod.transport.shutdown_fd
    first_in, go, a_progress = threading.Event(), threading.Event(), threading.Event()
    stale: list = []

    def shutdown_fd(n):
        if not first_in.is_set():  # the first close(): paused between reading the number and using it
            first_in.set()
            assert go.wait(10)
        stale.append(c._conn.closed)  # the number is no longer the client's
        real_shutdown(n)

    class Watched:  # the lock a fixed close() holds: the second close() waiting on it is progress
        def __init__(self):
            self.lock = threading.Lock()

        def __enter__(self):
            if threading.current_thread() is not first:
                a_progress.set()
            self.lock.acquire()

        def __exit__(self, *exc):
            self.lock.release()

    monkeypatch.setattr(client_mod.transport, "shutdown_fd", shutdown_fd)
    c._close_lock = Watched()
    first = threading.Thread(target=c.close, daemon=True)
    first.start()
    assert first_in.wait(10)
    second = threading.Thread(target=lambda: (c.close(), a_progress.set()), daemon=True)
    second.start()
    assert a_progress.wait(10)  # the second close() finished, or waits for the first
    go.set()
    first.join(10)
    second.join(10)
    assert not first.is_alive() and not second.is_alive()
    assert c._conn.closed and stale == [False], f"a shutdown of descriptor {fd} after it was closed: {stale}"
