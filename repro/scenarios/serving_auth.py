"""Authentication mismatches between a client and a listener (seed 002's
``multiprocessing.connection`` transport).

Hazards (the standard library's own handshake):

* ``stdlib_key_vs_open_listener``: ``Client(address, authkey=k)`` against a
  ``Listener(address)`` without an authkey. The client waits in ``answer_challenge`` for a
  challenge the listener never sends; the listener's owner waits in ``recv_bytes`` for a
  request the client never sends. Both reads are untimed: HANG (CPython issue 123736, open;
  ``Client`` has no timeout parameter on any version).
* ``stdlib_silent_client_blocks_accept``: ``Listener(authkey=k).accept()`` runs the handshake
  inside ``accept``; one client that connects and says nothing holds ``accept``, and every
  later, well-behaved client waits for its challenge forever: HANG.

Fixes (what :mod:`splitlearn.serving.transport` does: raw accept, the same HMAC handshake
per connection under a deadline that shuts the socket down when it expires):

* ``key_vs_open_listener``: our client with a key against a listener without one: a clear
  ``HandshakeError`` ("the server may have no authkey") within the handshake timeout;
* ``open_client_vs_key_server``: a client without a key against our server: the first reply
  is the server's challenge, which the client reports as "requires an authkey"; the server
  records an auth failure and keeps serving;
* ``wrong_key``: ``HandshakeError`` ("wrong authkey?") within the timeout, server keeps serving;
* ``silent_client``: a client that connects and never speaks does not delay anyone else, and
  is dropped at the server's handshake deadline.

A flood of silent clients against our own server (``max_connections`` 8, handshake timeout
60 s, eight connections that never speak, then a good client):

* ``silent_flood_no_grace`` (hazard): ``handshake_grace=None``, the server as it was before
  its :class:`~splitlearn.serving.server.HandshakeGate` cut anything: the silent eight hold
  every place for the whole handshake timeout and the good client gives up at its own handshake
  timeout (FAIL; ``ctx.symptom``: any other failed check, a refusal or a wrong answer, is an ERROR);
* ``silent_flood`` (fix): the default gate: once every place is taken, the oldest handshake
  past the grace (0.5 s here) is cut for the next connection that comes, and the good
  client is in within about the grace.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

from repro.harness.spec import Outcome, fix, frame, hazard, scenario

ECHO = "splitlearn.serving.demo_models:EchoNet"


def _stdlib_hang(build):
    return Outcome.HANG, (
        f"Python {'.'.join(map(str, build.python))}: multiprocessing.connection's handshake has no timeout "
        "(CPython issue 123736 open); both ends wait in untimed reads"
    )


def _private_path():
    from splitlearn.serving.transport import private_socket_path

    return private_socket_path("splitrepro-auth-")


def _stdlib_key_vs_open_listener(ctx):
    from multiprocessing.connection import Client, Listener

    d, path = _private_path()
    listener = Listener(path, family="AF_UNIX")  # no authkey
    got: list = []

    def serve():
        c = listener.accept()  # returns at once: no handshake without a key
        ctx.observe("listener accepted; waiting for the first request (recv_bytes)")
        got.append(c.recv_bytes())

    def connect():
        ctx.observe("client with authkey connecting (answer_challenge waits for a challenge)")
        Client(path, family="AF_UNIX", authkey=b"k" * 32)
        got.append("connected")

    ts = [threading.Thread(target=serve, name="listener"), threading.Thread(target=connect, name="client")]
    ctx.stage("stdlib Client(authkey) -> Listener(no authkey)")
    for t in ts:
        t.start()
    for t in ts:
        t.join()  # untimed, as the seed's code would wait
    ctx.record(result=got)


def _stdlib_silent_client(ctx):
    from multiprocessing.connection import Client, Listener

    d, path = _private_path()
    key = os.urandom(32)
    listener = Listener(path, family="AF_UNIX", authkey=key)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(path)  # connects, never answers the challenge
    served: list = []

    def serve():
        for _ in range(2):
            served.append(listener.accept())

    def good_client():
        ctx.observe("well-behaved client connecting after the silent one")
        Client(path, family="AF_UNIX", authkey=key)
        served.append("good client in")

    ts = [threading.Thread(target=serve, name="accept"), threading.Thread(target=good_client, name="client")]
    ctx.stage("stdlib Listener(authkey).accept() behind a silent client")
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    ctx.record(served=len(served))


def _ours_key_vs_open_listener(ctx, timeout):
    from splitlearn.serving import HandshakeError, transport

    d, path = _private_path()
    lsock = transport.listen_unix(path)
    seen: list = []

    def serve():  # a listener with no authkey: accepts and waits for a request
        s, _ = lsock.accept()
        c = transport.wrap(s)
        try:
            seen.append(c.recv_bytes())
        except (EOFError, OSError) as exc:
            seen.append(type(exc).__name__)
        finally:
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ctx.stage("our client(authkey) -> listener without authkey")
    t0 = time.monotonic()
    try:
        transport.connect(path, authkey=os.urandom(32), timeout=timeout)
    except HandshakeError as exc:
        waited = time.monotonic() - t0
        ctx.observe(f"HandshakeError after {waited:.2f}s: {exc}")
        ctx.record(error=str(exc), waited_s=round(waited, 3))
        ctx.check(waited < timeout + 2, f"took {waited:.1f}s, timeout {timeout}s")
        ctx.check("no authkey" in str(exc), f"error does not say why: {exc}")
    else:
        ctx.fail("connected to a listener without an authkey")
    t.join(10)
    ctx.check(not t.is_alive(), "the listener side still waits after the client gave up")
    ctx.record(listener_saw=[str(x) for x in seen])
    lsock.close()
    shutil.rmtree(d, ignore_errors=True)


def _silent_flood(ctx, grace, timeout):
    import torch

    from splitlearn.serving import HandshakeError, InferenceServer, ServerUnavailable

    # In the hazard variant only the lock-out itself is the FAIL it predicts; a wrong answer, a
    # refusal or the server gone is an ERROR there (in the fix variant every failed check fails).
    ctx.only_symptoms_fail()
    n = 8
    srv = InferenceServer(
        ECHO, {"scale": 2.0}, max_connections=n, handshake_grace=grace, handshake_timeout=60.0, start_timeout=120
    )
    ctx.stage("start server")
    srv.start()
    silent: list[socket.socket] = []
    try:
        ctx.stage(f"{n} silent connections (max_connections {n}, handshake_grace {grace})")
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(srv.address)  # never answers the challenge
            silent.append(s)
        ctx.stage("a good client behind them")
        t0 = time.monotonic()
        try:
            with srv.client(timeout=timeout, connect_timeout=timeout) as c:
                answer = c.infer(torch.ones(1, 3))
                waited = time.monotonic() - t0
                st = c.stats()
        except (HandshakeError, ServerUnavailable) as exc:
            waited = time.monotonic() - t0
            ctx.record(good_client_error=str(exc), good_client_waited_s=round(waited, 3))
            # refused, or the server gone: not the lock-out
            ctx.check(
                isinstance(exc, HandshakeError) and "did not finish within" in str(exc) and waited >= timeout,
                f"the good client failed after {waited:.1f}s, not at its {timeout}s handshake timeout: {exc}",
            )
            ctx.symptom(f"a good client was locked out by {n} silent connections (gave up after {waited:.1f}s): {exc}")
        ctx.observe(f"good client in and answered after {waited:.2f}s")
        ctx.record(good_client_s=round(waited, 3), server_stats=st)
        ctx.check(torch.equal(answer, torch.full((1, 3), 2.0)), "wrong answer")
        if grace is not None:
            ctx.check(waited < grace + 3.0, f"the good client waited {waited:.1f}s, grace {grace}s")
            ctx.check(st["handshakes_cut"] >= 1, "no silent connection was cut")
    finally:
        for s in silent:
            s.close()
        srv.close()


def _with_server(ctx, body):
    from splitlearn.serving import InferenceServer

    srv = InferenceServer(ECHO, {"scale": 2.0}, handshake_timeout=3.0, start_timeout=120)
    ctx.stage("start server")
    srv.start()
    try:
        body(srv)
        ctx.stage("server still serves")
        import torch

        with srv.client(timeout=10) as c:
            ctx.check(
                torch.equal(c.infer(torch.ones(1, 3)), torch.full((1, 3), 2.0)), "wrong answer after the bad client"
            )
            st = c.stats()
        ctx.record(server_stats=st)
        return st
    finally:
        srv.close()


@scenario(
    name="serving_auth",
    seed="002",
    claims=(),  # no seed claim: the seed's transport, checked for the failure modes it did not test
    timeout=60,
    variants=[
        hazard(
            "stdlib_key_vs_open_listener",
            expect=_stdlib_hang,
            # the client waits for a challenge, the listener's owner for a request
            hang_where=(frame("multiprocessing/connection.py", "answer_challenge"), frame("serving_auth.py", "serve")),
            doc="CPython issue 123736",
        ),
        hazard(
            "stdlib_silent_client_blocks_accept",
            expect=_stdlib_hang,
            # accept sits in the silent client's handshake; the good client waits for its challenge
            hang_where=(
                frame("multiprocessing/connection.py", "deliver_challenge"),
                frame("multiprocessing/connection.py", "answer_challenge"),
            ),
            doc="handshake inside Listener.accept",
        ),
        fix("key_vs_open_listener", params={"timeout": 3.0}),
        fix("open_client_vs_key_server", params={"timeout": 5.0}),
        fix("wrong_key", params={"timeout": 5.0}),
        fix("silent_client", params={"timeout": 5.0}),
        hazard(
            "silent_flood_no_grace",
            expect=Outcome.FAIL,
            params={"timeout": 3.0},
            doc="places held for the handshake timeout: a good client is locked out",
        ),
        fix("silent_flood", params={"timeout": 10.0, "grace": 0.5}),
    ],
)
def serving_auth(ctx):
    from splitlearn.serving import HandshakeError, InferenceClient, ServerUnavailable, WireError

    v = ctx.variant
    timeout = float(ctx.params.get("timeout", 5.0))
    if v == "stdlib_key_vs_open_listener":
        return _stdlib_key_vs_open_listener(ctx)
    if v == "stdlib_silent_client_blocks_accept":
        return _stdlib_silent_client(ctx)
    if v == "key_vs_open_listener":
        return _ours_key_vs_open_listener(ctx, timeout)
    if v == "silent_flood_no_grace":
        return _silent_flood(ctx, None, timeout)
    if v == "silent_flood":
        return _silent_flood(ctx, float(ctx.params["grace"]), timeout)

    if v == "open_client_vs_key_server":

        def body(srv):
            import torch

            ctx.stage("client without authkey")
            t0 = time.monotonic()
            c = InferenceClient(srv.address, authkey=None, timeout=timeout, connect_timeout=timeout)
            try:
                c.infer(torch.ones(1, 3))
            except (WireError, ServerUnavailable) as exc:
                waited = time.monotonic() - t0
                ctx.observe(f"{type(exc).__name__} after {waited:.2f}s: {exc}")
                ctx.record(error=str(exc), waited_s=round(waited, 3))
                ctx.check(waited < timeout, f"took {waited:.1f}s")
                ctx.check("requires an authkey" in str(exc), f"error does not say why: {exc}")
            else:
                ctx.fail("an unauthenticated client got an answer")
            finally:
                c.close()

        st = _with_server(ctx, body)
        ctx.check(st["auth_failures"] >= 1, "server did not count the failed handshake")
        return

    if v == "wrong_key":

        def body(srv):
            ctx.stage("client with the wrong key")
            t0 = time.monotonic()
            try:
                InferenceClient(srv.address, authkey=b"x" * 32, connect_timeout=timeout)
            except HandshakeError as exc:
                waited = time.monotonic() - t0
                ctx.observe(f"HandshakeError after {waited:.2f}s: {exc}")
                ctx.record(error=str(exc), waited_s=round(waited, 3))
                ctx.check(waited < timeout, f"took {waited:.1f}s")
                ctx.check("wrong authkey" in str(exc), f"error does not say why: {exc}")
            else:
                ctx.fail("a client with the wrong key was let in")

        st = _with_server(ctx, body)
        ctx.check(st["auth_failures"] >= 1, "server did not count the failed handshake")
        return

    if v == "silent_client":

        def body(srv):
            import torch

            ctx.stage("silent client, then a good one")
            silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            silent.connect(srv.address)
            try:
                t0 = time.monotonic()
                with srv.client(timeout=timeout, connect_timeout=timeout) as c:
                    c.infer(torch.ones(1, 3))
                good_s = time.monotonic() - t0
                ctx.record(good_client_s=round(good_s, 3))
                ctx.check(good_s < 2.0, f"the good client waited {good_s:.2f}s behind the silent one")
                silent.settimeout(srv.handshake_timeout + 5)
                t1 = time.monotonic()
                data = silent.recv(4096)  # the challenge
                while data:
                    data = silent.recv(4096)  # then EOF when the server's deadline drops us
                dropped = time.monotonic() - t1
                ctx.record(silent_dropped_after_s=round(dropped, 3))
                ctx.check(dropped <= srv.handshake_timeout + 2, f"silent client held for {dropped:.1f}s")
            finally:
                silent.close()

        st = _with_server(ctx, body)
        ctx.check(st["auth_failures"] >= 1, "server did not count the dropped handshake")
        return
    ctx.fail(f"unknown variant {v}")
