"""TrunkServer + SplitClient: generation equals the full model's, per-session KV caches, bad
input, auth, and faults (server killed mid-generation, client gone mid-request)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
import torch

from fixtures.models import tiny_model_dir
from fixtures.reference import full_model, mask_positions, padded_batch, split_parts
from splitlearn.serving import HandshakeError, ServerError, ServerUnavailable, wire
from splitlearn.serving.split_client import SplitClient, TrunkClient
from splitlearn.serving.trunk_server import TrunkServer

SPLITS = {"gpt2": (1, 3), "qwen2": (2, 4)}


@pytest.fixture(scope="module")
def server():
    models = {f: {"model_type": f, "path": str(tiny_model_dir(f)), "split_points": list(s)} for f, s in SPLITS.items()}
    srv = TrunkServer(models, start_timeout=180, handshake_timeout=3.0)
    srv.start()
    try:
        yield srv
    finally:
        srv.close()


def _split_client(srv, family, **kw):
    return SplitClient.connect(srv.address, srv.authkey, family, model_type=family, path=tiny_model_dir(family), split_points=SPLITS[family], **kw)


def test_bound_to_loopback_and_lists_models(server):
    assert server.address[0] == "127.0.0.1"
    with server.client() as c:
        models = c.list_models()
    assert set(models) == {"gpt2", "qwen2"}
    assert models["gpt2"]["layers"] == [1, 3] and models["gpt2"]["hidden_size"] == 64


@pytest.mark.parametrize("wait", ["block", "hybrid"])
@pytest.mark.parametrize("family", sorted(SPLITS))
def test_generation_equals_full_model(server, family, wait):
    full = full_model(family)
    ids, mask = padded_batch(seed=3, batch=3, length=7, pad_lengths=[0, 2, 4], side="left", vocab=250)
    eos = int(full.config.eos_token_id)
    expected = full.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    with _split_client(server, family, wait=wait) as sc:
        got = sc.generate(ids, 10, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
        assert sc.calls >= 2  # the trunk really ran remotely, prefill + steps
        st = sc.trunk.stats()
        counts = sc.trunk.wait_counts
    assert torch.equal(got, expected)
    assert st["sessions_open"] == 0  # the session was closed at the end
    waited = sum(v for k, v in counts.items() if k != "no_history")
    if wait == "hybrid":  # every trunk step after the first three went through the hybrid wait
        assert counts["no_history"] == 3 and waited == sc.calls - 3, counts
    else:
        assert sum(counts.values()) == 0, counts


def test_sessions_are_isolated_when_interleaved(server):
    bottom, trunk, _ = split_parts("gpt2", *SPLITS["gpt2"])
    torch.manual_seed(0)
    seqs = {"a": torch.randint(3, 250, (1, 9)), "b": torch.randint(3, 250, (2, 5))}
    with server.client() as c:
        sid = {k: c.open_session("gpt2") for k in seqs}
        caches = {k: None for k in seqs}
        bcaches = {k: None for k in seqs}
        for step in range(3):  # prefill, then two single-token steps, alternating sessions
            for k, ids in seqs.items():
                n = ids.shape[1]
                cur = ids if step == 0 else torch.randint(3, 250, (ids.shape[0], 1))
                total = n + step
                mask = torch.ones(ids.shape[0], total, dtype=torch.long)
                pos = mask_positions(mask)[:, -cur.shape[1] :]
                with torch.inference_mode():
                    b = bottom(cur, mask, pos, bcaches[k], True)
                    bcaches[k], h = b.past_key_values, b.hidden_states
                    local = trunk(h, mask, pos, caches[k], True)
                caches[k] = local.past_key_values
                remote = c.forward(h, mask, pos, session=sid[k], step=step)
                assert torch.allclose(remote, local.hidden_states, atol=1e-5), (k, step)
        for s in sid.values():
            c.close_session(s)


def test_stateless_forward_equals_local_trunk(server):
    bottom, trunk, _ = split_parts("qwen2", *SPLITS["qwen2"])
    ids = torch.randint(3, 250, (2, 6))
    with torch.inference_mode():
        h = bottom(ids).hidden_states
        ref = trunk(h).hidden_states
    with server.client() as c:
        assert torch.allclose(c.forward(h, model="qwen2"), ref, atol=1e-5)


def test_bad_requests_get_errors_on_a_connection_that_keeps_working(server):
    h = torch.randn(1, 4, 64)
    with server.client() as c:
        cases = [
            (lambda: c.open_session("gpt3"), "unknown_model"),
            (lambda: c.forward(h, model="nope"), "unknown_model"),
            (lambda: c.forward(h.double(), model="gpt2"), "bad_input"),
            (lambda: c.forward(torch.randn(1, 4, 65), model="gpt2"), "bad_input"),
            (lambda: c.forward(torch.randn(4, 64), model="gpt2"), "bad_input"),
            (lambda: c.forward(h, torch.ones(1, 3, dtype=torch.long), model="gpt2"), "bad_input"),
            (lambda: c.forward(h, torch.ones(1, 4), model="gpt2"), "bad_input"),  # float mask
            (lambda: c.forward(h, session="0123456789abcdef"), "unknown_session"),
            (lambda: c.close_session("0123456789abcdef"), "unknown_session"),
        ]
        for call, code in cases:
            with pytest.raises(ServerError) as e:
                call()
            assert e.value.code == code, (code, e.value)
        sid = c.open_session("gpt2")
        with pytest.raises(ServerError, match="does not follow") as e:
            c.forward(h, torch.ones(1, 4, dtype=torch.long), session=sid, step=1)  # no prefill yet
        assert e.value.code == "bad_step"
        c.forward(h, torch.ones(1, 4, dtype=torch.long), session=sid, step=0)
        with pytest.raises(ServerError, match="does not follow"):
            c.forward(h[:, :1], torch.ones(1, 5, dtype=torch.long), session=sid, step=2)  # skipped a step
        out = c.forward(h[:, :1], torch.ones(1, 5, dtype=torch.long), session=sid, step=1)
        assert out.shape == (1, 1, 64)
        c.send_raw(b"SLW garbage that is long enough")
        f = c.recv_frame(timeout=10)
        assert f.meta["error"] == "bad_frame"
        assert set(c.list_models()) == {"gpt2", "qwen2"}


def test_oversized_frame_closes_only_that_connection(server):
    with server.client() as bystander, server.client(max_frame=1 << 30) as c:
        try:
            c.send_raw(b"\x00" * (server.max_frame + 1))
        except (BrokenPipeError, ConnectionResetError):
            pass
        # TCP may reset before the error frame is read; either way the connection ends, promptly
        with pytest.raises((ServerUnavailable, wire.WireError, ServerError)):
            f = c.recv_frame(timeout=10)
            assert f.meta["error"] == "frame_too_large"
            c.recv_frame(timeout=10)
        assert set(bystander.list_models()) == {"gpt2", "qwen2"}


def test_wrong_authkey_and_no_authkey(server):
    t0 = time.monotonic()
    with pytest.raises(HandshakeError, match="wrong authkey"):
        TrunkClient(server.address, authkey=b"wrong" * 8, connect_timeout=5)
    c = TrunkClient(server.address, authkey=None, connect_timeout=5, timeout=5)
    try:
        with pytest.raises((wire.WireError, ServerUnavailable)):
            c.list_models()
    finally:
        c.close()
    assert time.monotonic() - t0 < 10
    with server.client() as ok:
        assert ok.stats()["auth_failures"] >= 2


@pytest.mark.parametrize("how", ["wrong_key", "no_answer"])
def test_a_peer_that_fails_authentication_is_never_served(server, how):
    """The client's HandshakeError above comes from CPython's deliver_challenge, which tells the
    client it failed whatever the server does next: a peer without the key that ignores the
    #FAILURE# and asks anyway (STATS, LIST_MODELS, PING) must find the connection closed."""
    from fixtures.peers import served_after_a_failed_handshake

    with server.client() as ok:
        failures = ok.stats()["auth_failures"]
    asks = [wire.Frame(wire.MsgType.STATS, 1), wire.Frame(wire.MsgType.LIST_MODELS, 2), wire.Frame(wire.MsgType.PING, 3)]
    served = served_after_a_failed_handshake(server.address, how, asks)
    assert served == [], f"served after a failed handshake: {[getattr(f, 'meta', f) for f in served]}"
    with server.client() as ok:
        assert ok.stats()["auth_failures"] == failures + 1


def test_client_gone_mid_request_frees_its_sessions(server):
    c = server.client()
    sid = c.open_session("gpt2")
    c.send_raw(wire.encode(wire.Frame(wire.MsgType.TRUNK, 99, {"session": sid, "step": 0}, [torch.randn(1, 30, 64)])))
    c.close()
    with server.client() as probe:
        t_end = time.monotonic() + 30
        while probe.stats()["sessions_open"] and time.monotonic() < t_end:
            threading.Event().wait(0.02)  # bounded poll of the server's counters
        st = probe.stats()
        assert st["sessions_open"] == 0
        assert set(probe.list_models()) == {"gpt2", "qwen2"}


def test_server_killed_mid_generation_then_restarted():
    d = tiny_model_dir("gpt2")
    srv = TrunkServer({"gpt2": {"model_type": "gpt2", "path": str(d), "split_points": [1, 3]}}, start_timeout=180)
    srv.start()
    try:
        sc = _split_client(srv, "gpt2")
        sc.trunk.timeout = 30
        orig = sc.trunk_fn

        def killing_trunk_fn(h, m, p, step):
            if step == 2:
                os.kill(srv.pid, signal.SIGKILL)
            return orig(h, m, p, step)

        sc.trunk_fn = killing_trunk_fn
        ids = torch.randint(3, 250, (1, 5))
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailable):
            sc.generate(ids, 6)
        assert time.monotonic() - t0 < 30
        sc.close()
        port = srv.address[1]
        srv.restart()
        assert srv.address[1] == port
        with _split_client(srv, "gpt2") as sc2:
            assert sc2.generate(ids, 3).shape == (1, 8)
    finally:
        srv.close()


def test_a_failed_step_drops_the_sessions_cache():
    """The trunk's KV cache grows in place, layer by layer: a step that fails part-way leaves it
    half updated. The session then refuses the next step (bad_step) instead of running on it.
    In process, with a trunk that fails: no server needed."""
    import threading

    from splitlearn.serving.server import _Conn
    from splitlearn.serving.trunk_server import TrunkWorker, _Session

    class Failing(torch.nn.Module):
        def forward(self, hidden, **kw):
            raise RuntimeError("out of memory (simulated)")

    w = TrunkWorker({"authkey": "00", "max_frame": 1 << 20, "max_sessions": 4}, None)
    w.torch, w.device = torch, torch.device("cpu")
    w.models, w.locks = {"m": Failing()}, {"m": threading.Lock()}
    w.info = {"m": {"hidden_size": 4, "dtype": "float32"}}
    session = _Session("m", cache=object(), cache_len=3, step=0, batch=1)
    w.sessions = {1: {"s": session}}
    sent = []
    w.send = lambda c, frame: sent.append(frame) or True
    c = _Conn(None, 1)
    for step in (1, 2):
        w.on_trunk(c, wire.Frame(wire.MsgType.TRUNK, step, {"session": "s", "step": step}, [torch.zeros(1, 1, 4)]))
    assert [f.meta["error"] for f in sent] == ["model_error", "bad_step"], [f.meta for f in sent]
    assert "start again at step 0" in sent[0].meta["message"]
    assert session.cache is None and session.step == -1


def _local_non_loopback_ipv4():
    import ipaddress

    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return a.address
    return None


def test_a_remote_peer_cannot_take_every_place_to_authenticate():
    # the server bound to this machine's own non-loopback address: connections from it are a
    # remote peer's, held to max_handshakes_per_peer (2) places while they authenticate
    ip = _local_non_loopback_ipv4()
    if ip is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    srv = TrunkServer(
        {"echo": {"import": "splitlearn.serving.demo_models:EchoNet"}},
        host=ip,
        max_handshakes_per_peer=2,
        handshake_grace=60.0,
        handshake_timeout=60.0,
        start_timeout=120,
    )
    srv.start()
    silent = []
    try:
        for _ in range(2):
            silent.append(socket.create_connection(srv.address, timeout=10))
            silent[-1].recv(4096)  # the challenge: its handshake holds a place
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailable, match="closed the connection during authentication"):
            srv.client(timeout=10, connect_timeout=10)
        assert time.monotonic() - t0 < 5  # refused at once, not at a timeout
        for s in silent:
            s.close()  # their places come back at EOF
        deadline = time.monotonic() + 30
        while True:  # the server sees the EOFs on its own time: retry until a place is free
            try:
                c = srv.client(timeout=10, connect_timeout=10)
                break
            except ServerUnavailable:
                if time.monotonic() > deadline:
                    raise
                threading.Event().wait(0.05)  # bounded poll of a condition we do not own
        with c:
            st = c.stats()
            assert st["connections_refused"] >= 1 and st["handshakes_cut"] == 0
            assert set(c.list_models()) == {"echo"}
    finally:
        for s in silent:
            s.close()
        srv.close()


def test_error_answers_quote_a_peers_strings_clipped():
    """A model name or session id of a megabyte came back whole in the error answer."""
    import threading

    from splitlearn.serving.server import _Conn
    from splitlearn.serving.trunk_server import TrunkWorker

    w = TrunkWorker({"authkey": "00", "max_frame": 1 << 22, "max_sessions": 4}, None)
    w.torch, w.device = torch, torch.device("cpu")
    w.models, w.locks, w.info = {"m": None}, {"m": threading.Lock()}, {"m": {"hidden_size": 4, "dtype": "float32"}}
    sent = []
    w.send = lambda c, frame: sent.append(frame) or True
    c = _Conn(None, 1)
    huge = "x" * 1_000_000
    w.on_frame(c, wire.Frame(wire.MsgType.OPEN_SESSION, 1, {"model": huge}))
    w.on_frame(c, wire.Frame(wire.MsgType.CLOSE_SESSION, 2, {"session": huge}))
    w.on_frame(c, wire.Frame(wire.MsgType.TRUNK, 3, {"session": huge, "step": 0}, [torch.zeros(1, 1, 4)]))
    w.on_frame(c, wire.Frame(wire.MsgType.TRUNK, 4, {"model": huge}, [torch.zeros(1, 1, 4)]))
    assert [f.meta["error"] for f in sent] == ["unknown_model", "unknown_session", "unknown_session", "unknown_model"]
    for f in sent:
        assert len(f.meta["message"]) < 400 and "(1000002 characters)" in f.meta["message"], f.meta["message"][:100]
    st = w.snapshot()  # two TRUNK requests, answered with errors; the session errors are frame errors
    assert (st["requests"], st["errors"], st["frame_errors"]) == (2, 2, 2)


def test_a_sessions_cache_is_bounded_by_the_models_positions_and_max_cache_tokens():
    """Steps extended a session's KV cache without bound (only the number of sessions was): past
    the model's positions, or past max_cache_tokens (batch x positions), a step now gets
    bad_input, and the cache stays as it was. In process, with a stand-in trunk."""
    import threading
    from types import SimpleNamespace

    from splitlearn.serving.server import _Conn
    from splitlearn.serving.trunk_server import TrunkWorker

    class Trunk(torch.nn.Module):
        def forward(self, hidden, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
            return SimpleNamespace(hidden_states=hidden, past_key_values=object())

    w = TrunkWorker({"authkey": "00", "max_frame": 1 << 20, "max_sessions": 4, "max_cache_tokens": 12}, None)
    w.torch, w.device = torch, torch.device("cpu")
    w.models, w.locks = {"m": Trunk()}, {"m": threading.Lock()}
    w.info = {"m": {"hidden_size": 4, "dtype": "float32", "max_positions": 10}}
    sent = []
    w.send = lambda c, frame: sent.append(frame) or True
    w._send_encoded = lambda c, data: sent.append(wire.decode(data)) or True
    c = _Conn(None, 1)
    for rid in (1, 2):
        w.on_frame(c, wire.Frame(wire.MsgType.OPEN_SESSION, rid, {"model": "m"}))
    s, t = (f.meta["session"] for f in sent)
    sent.clear()

    def step(session, n, b, q):
        w.on_frame(c, wire.Frame(wire.MsgType.TRUNK, 100 + n, {"session": session, "step": n}, [torch.zeros(b, q, 4)]))
        f = sent.pop()
        return f.meta.get("error"), f.meta.get("message", f.meta.get("cache_len"))

    # batch 2: 8, 10, 12 tokens, then 14 > max_cache_tokens
    assert [step(s, n, 2, 4 if n == 0 else 1)[0] for n in range(3)] == [None, None, None]
    code, message = step(s, 3, 2, 1)
    assert code == "bad_input" and "2 x 7 = 14 tokens, more than max_cache_tokens=12" in message, message
    session = w.sessions[1][s]
    assert (session.cache_len, session.step) == (6, 2)  # as it was: the refused step changed nothing
    # batch 1: 9, 10 positions, then 11 > the model's 10
    assert [step(t, n, 1, 9 if n == 0 else 1)[0] for n in range(2)] == [None, None]
    code, message = step(t, 2, 1, 1)
    assert code == "bad_input" and "11 positions (10 cached + 1 new) exceed the 10 of model 'm'" in message, message
    # a stateless forward longer than the model's positions
    w.on_frame(c, wire.Frame(wire.MsgType.TRUNK, 200, {"model": "m"}, [torch.zeros(1, 11, 4)]))
    assert sent.pop().meta["error"] == "bad_input"
    w.on_frame(c, wire.Frame(wire.MsgType.TRUNK, 201, {"model": "m"}, [torch.zeros(3, 10, 4)]))
    assert sent.pop().type == wire.MsgType.RESPONSE  # no cache kept: max_cache_tokens does not apply


def test_steps_past_the_models_positions_are_refused(server):
    with server.client() as c:
        assert c.list_models()["gpt2"]["max_positions"] == 128  # the tiny gpt2's n_positions
        with pytest.raises(ServerError, match="129 positions") as e:
            c.forward(torch.randn(1, 129, 64), model="gpt2")
        assert e.value.code == "bad_input"
        sid = c.open_session("gpt2")
        c.forward(torch.randn(1, 127, 64), torch.ones(1, 127, dtype=torch.long), session=sid, step=0)
        c.forward(torch.randn(1, 1, 64), torch.ones(1, 128, dtype=torch.long), session=sid, step=1)
        with pytest.raises(ServerError, match=r"129 positions \(128 cached \+ 1 new\) exceed the 128") as e:
            c.forward(torch.randn(1, 1, 64), torch.ones(1, 129, dtype=torch.long), session=sid, step=2)
        assert e.value.code == "bad_input"
        c.close_session(sid)
    with pytest.raises(ValueError, match="max_cache_tokens"):
        TrunkServer({"gpt2": {"import": "x:Y"}}, max_cache_tokens=0)


def test_malformed_model_names_and_steps_are_client_errors_not_internal_errors():
    """A model name that is not a string (a list, a dict: unhashable) or a step that is not a
    number raised TypeError/ValueError inside the handler, and the client got internal_error
    with Python's message, as if the server had a bug. They are the peer's errors: unknown_model,
    bad_input; the connection keeps working and the counts hold. In process: the connection's
    reader (serve_conn) on one end of a socket pair, the frames written to the other."""
    from splitlearn.serving import transport
    from splitlearn.serving.server import _Conn
    from splitlearn.serving.trunk_server import TrunkWorker, _Session

    w = TrunkWorker({"authkey": "00", "max_frame": 1 << 20, "max_sessions": 4, "send_timeout": 5.0}, None)
    w.torch, w.device = torch, torch.device("cpu")
    w.models, w.locks, w.info = {"m": None}, {"m": threading.Lock()}, {"m": {"hidden_size": 4, "dtype": "float32"}}
    w.sessions = {1: {"s": _Session("m")}}
    sent = []
    w.send = lambda c, frame: sent.append(frame) or True
    ours, peer = socket.socketpair()
    c = _Conn(transport.Channel(ours.detach()), 1)
    h = [torch.zeros(1, 1, 4)]
    frames = [wire.Frame(wire.MsgType.OPEN_SESSION, 1, {"model": ["m"]}), wire.Frame(wire.MsgType.TRUNK, 2, {"model": {"m": 1}}, h)]
    for i, step in enumerate(["one", None, [1], "XXXXXX"]):  # the last becomes Infinity, which JSON parses
        frames.append(wire.Frame(wire.MsgType.TRUNK, 3 + i, {"session": "s", "step": step}, h))
    frames.append(wire.Frame(wire.MsgType.LIST_MODELS, 7))  # still served
    with transport.Channel(peer.detach()) as p:
        for f in frames:
            p.send_bytes(wire.encode(f).replace(b'"XXXXXX"', b"Infinity"))  # as long: the meta length holds
    try:
        w.serve_conn(c)  # to the peer's EOF
    finally:
        c.conn.close()
    got = [(f.request_id, f.meta.get("error")) for f in sent]
    assert got == [(1, "unknown_model"), (2, "unknown_model")] + [(3 + i, "bad_input") for i in range(4)] + [(7, None)], [f.meta for f in sent]
    assert all("step" in f.meta["message"] for f in sent[2:6]), [f.meta["message"] for f in sent[2:6]]
    st = w.snapshot()  # five TRUNK requests, each answered with an error; OPEN_SESSION's is a frame error
    assert (st["requests"], st["errors"], st["frame_errors"]) == (5, 5, 1), st


def test_every_sessions_cache_together_is_bounded_by_max_cache_bytes():
    """max_cache_tokens bounds one session's cache; sessions were bounded only in number per
    connection, so enough of them (on enough connections) could fill the server's memory. All
    caches together are now bounded by max_cache_bytes: a step past it gets cache_full and
    changes nothing; a closed session, a failed step and a gone connection give their bytes
    back. In process, with a stand-in trunk whose cache is a real tensor of 8 bytes a token
    (and one that cannot say its bytes per token beforehand: counted from what it left)."""
    from types import SimpleNamespace

    from splitlearn.serving.server import _Conn
    from splitlearn.serving.trunk_server import TrunkWorker

    class Trunk(torch.nn.Module):  # the cache: [batch, positions, 2] float32 = 8 bytes a token
        def forward(self, hidden, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
            if hidden.shape[2] == 5:
                raise RuntimeError("five is right out")
            new = torch.zeros(hidden.shape[0], hidden.shape[1], 2)
            cache = new if past_key_values is None else torch.cat([past_key_values[0], new], dim=1)
            return SimpleNamespace(hidden_states=hidden, past_key_values=(cache,))

    for known in (8, None):
        w = TrunkWorker({"authkey": "00", "max_frame": 1 << 20, "max_sessions": 4, "max_cache_bytes": 80}, None)
        w.torch, w.device = torch, torch.device("cpu")
        w.models, w.locks = {"m": Trunk()}, {"m": threading.Lock()}
        w.info = {"m": {"hidden_size": None, "dtype": "float32", "max_positions": 100, "kv_bytes_per_token": known}}
        sent = []
        w.send = lambda c, frame, sent=sent: sent.append(frame) or True
        w._send_encoded = lambda c, data, sent=sent: sent.append(wire.decode(data)) or True
        c, d = _Conn(None, 1), _Conn(None, 2)
        opened = []
        for conn in (c, c, d):
            w.on_frame(conn, wire.Frame(wire.MsgType.OPEN_SESSION, 1, {"model": "m"}))
            opened.append(sent.pop().meta["session"])
        s, t, u = opened

        def step(conn, session, n, q, width=4, w=w, sent=sent):
            w.on_frame(conn, wire.Frame(wire.MsgType.TRUNK, 9, {"session": session, "step": n}, [torch.zeros(1, q, width)]))
            return sent.pop().meta.get("error")

        assert step(c, s, 0, 6) is None and w.cache_bytes == 48
        if known is None:  # a first step is counted only from what it left: it may pass the bound
            assert step(d, u, 0, 6) is None and w.cache_bytes == 96
            assert step(d, u, 1, 1) == "cache_full" and w.sessions[2][u].cache_len == 6  # 7 more tokens' worth: refused
            w.on_frame(d, wire.Frame(wire.MsgType.CLOSE_SESSION, 1, {"session": u}))
            sent.pop()
            assert w.cache_bytes == 48
        else:
            assert step(d, u, 0, 5) == "cache_full" and w.cache_bytes == 48  # 48 + 40 > 80: refused, nothing counted
            assert w.sessions[2][u].cache is None
            assert step(c, s, 1, 1) is None and w.cache_bytes == 56  # its own session grows: 7 tokens
            assert step(c, t, 0, 4) == "cache_full"  # another session of the same connection: 56 + 32 > 80
            assert step(c, t, 0, 3) is None and w.cache_bytes == 80  # exactly at the bound
            assert step(c, t, 0, 3, width=5) == "model_error" and w.cache_bytes == 56  # a failed step drops its cache
            assert step(d, u, 0, 3) is None and w.cache_bytes == 80
            w.on_disconnect(d)  # its connection gone: its sessions' bytes back
            assert w.cache_bytes == 56
            w.on_frame(c, wire.Frame(wire.MsgType.CLOSE_SESSION, 1, {"session": s}))
            sent.pop()
            assert w.cache_bytes == 0
        st = w.snapshot()
        assert st["max_cache_bytes"] == 80 and st["cache_bytes"] == w.cache_bytes and st["cache_full"] >= 1


def test_the_kv_bytes_per_token_are_measured_at_load_and_bound_a_real_server():
    """End to end with the tiny GPT-2 trunk: the server measures its KV bytes per token (what a
    one-token forward's cache holds, as a local trunk's), counts each session's cache at that,
    and refuses a step past max_cache_bytes with cache_full while other sessions go on."""
    family, (s1, s2) = "gpt2", SPLITS["gpt2"]
    _, trunk, _ = split_parts(family, s1, s2)
    with torch.inference_mode():
        from splitlearn.serving.trunk_server import cache_nbytes

        per_token = cache_nbytes(trunk(torch.zeros(1, 1, 64), use_cache=True).past_key_values)
        five = cache_nbytes(trunk(torch.zeros(1, 5, 64), use_cache=True).past_key_values)
    assert per_token and five == 5 * per_token
    models = {family: {"model_type": family, "path": str(tiny_model_dir(family)), "split_points": [s1, s2]}}
    srv = TrunkServer(models, start_timeout=180, max_cache_bytes=10 * per_token)
    srv.start()
    try:
        with srv.client(timeout=30) as a, srv.client(timeout=30) as b:
            assert a.list_models()[family]["kv_bytes_per_token"] == per_token
            sa, sb = a.open_session(family), b.open_session(family)
            a.forward(torch.randn(1, 6, 64), session=sa, step=0)
            with pytest.raises(ServerError, match="max_cache_bytes") as e:
                b.forward(torch.randn(1, 6, 64), session=sb, step=0)
            assert e.value.code == "cache_full"
            a.forward(torch.randn(1, 1, 64), torch.ones(1, 7, dtype=torch.long), session=sa, step=1)
            st = a.stats()
            assert (st["cache_bytes"], st["max_cache_bytes"], st["cache_full"]) == (7 * per_token, 10 * per_token, 1), st
            a.close_session(sa)
            b.forward(torch.randn(1, 6, 64), session=sb, step=0)  # room again
            assert b.stats()["cache_bytes"] == 6 * per_token
    finally:
        srv.close()


def test_max_cache_bytes_defaults_to_a_quarter_of_the_devices_memory(server):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with server.client() as c:
        assert c.stats()["max_cache_bytes"] == ram // 4
    for bad in (0, -1, "lots", True, float("inf"), float("nan"), [1]):
        with pytest.raises(ValueError, match="max_cache_bytes"):
            TrunkServer({"gpt2": {"import": "x:Y"}}, max_cache_bytes=bad)
