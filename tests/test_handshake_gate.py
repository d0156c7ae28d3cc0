"""HandshakeGate: places for connections still authenticating (total, per peer, grace).

The clock is injected, so ages are exact; a cut is seen for real, as EOF on the other end of
a socket pair whose descriptor the gate shut down."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from splitlearn.serving.server import HandshakeGate, _is_loopback


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def pairs():
    made: list[tuple[socket.socket, socket.socket]] = []

    def new() -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        b.settimeout(5)
        made.append((a, b))
        return a, b

    yield new
    for a, b in made:
        a.close()
        b.close()


@pytest.fixture()
def listener():
    """A listening TCP socket on loopback, closed after the test whatever happens."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    yield lsock
    lsock.close()  # a no-op once detached


def _was_cut(far: socket.socket) -> bool:
    return far.recv(1) == b""  # the gate shut the near end down: EOF here at once


def _alive(far: socket.socket) -> bool:
    far.setblocking(False)
    try:
        far.recv(1)
    except BlockingIOError:
        return True
    finally:
        far.settimeout(5)
    return False


def test_full_gate_cuts_the_oldest_past_the_grace_and_no_other(pairs):
    clock = Clock()
    gate = HandshakeGate(2, grace=1.0, clock=clock)
    (a, fa), (b, fb) = pairs(), pairs()
    ta, _ = gate.enter(None, a.fileno())
    clock.t += 0.4
    tb, _ = gate.enter(None, b.fileno())
    clock.t += 0.6  # a has run 1.0 s, b 0.6 s
    assert gate.wait_for_room() is True
    assert _alive(fa) and gate.cut == 0  # nothing is cut before the newcomer is in
    c, fc = pairs()
    tc, _ = gate.enter(None, c.fileno())
    assert tc is not None
    assert _was_cut(fa) and _alive(fb) and _alive(fc)
    assert gate.cut == 1 and gate.waiting() == 2
    assert gate.leave(ta) is True  # its thread learns it was cut
    assert gate.leave(tb) is False and gate.leave(tc) is False
    assert gate.waiting() == 0


def test_a_full_gate_refuses_while_every_handshake_is_young(pairs):
    clock = Clock()
    gate = HandshakeGate(1, grace=1.0, clock=clock)
    a, fa = pairs()
    gate.enter(None, a.fileno())
    clock.t += 0.5
    b, _ = pairs()
    token, why = gate.enter(None, b.fileno())
    assert token is None and "younger than handshake_grace" in why
    assert _alive(fa) and gate.cut == 0


def test_room_is_given_at_once_below_the_total(pairs):
    gate = HandshakeGate(2, grace=1.0, clock=Clock())
    a, fa = pairs()
    gate.enter(None, a.fileno())
    assert gate.wait_for_room() is True
    assert _alive(fa) and gate.cut == 0


def test_a_full_gate_waits_for_a_place_then_for_the_grace(pairs):
    gate = HandshakeGate(1, grace=None)  # never cuts: only leave() frees the place
    a, fa = pairs()
    tok, _ = gate.enter(None, a.fileno())
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(gate.wait_for_room()), daemon=True)
    t.start()
    t.join(0.3)
    assert t.is_alive() and not got  # still waiting: nothing to cut, nothing left
    assert gate.leave(tok) is False
    t.join(5)
    assert got == [True] and _alive(fa)

    real = HandshakeGate(1, grace=0.2)  # the real clock: waits out the grace, then cuts
    b, fb = pairs()
    real.enter(None, b.fileno())
    assert real.wait_for_room() is True
    c, _ = pairs()
    assert real.enter(None, c.fileno())[0] is not None
    assert _was_cut(fb) and real.cut == 1


def test_the_connection_cap_leaves_fewer_places(pairs):
    clock = Clock()
    room = [3]  # max_connections less the connections in
    gate = HandshakeGate(8, grace=1.0, room=lambda: room[0], clock=clock)
    (a, fa), (b, fb) = pairs(), pairs()
    gate.enter(None, a.fileno())
    clock.t += 0.5
    tb, _ = gate.enter(None, b.fileno())
    assert gate.wait_for_room() is True  # 2 of 3: room
    room[0] = 2  # one more connection got in: full
    clock.t += 0.6  # a has run 1.1 s, b 0.6 s
    assert gate.wait_for_room() is True
    c, fc = pairs()
    tc, _ = gate.enter(None, c.fileno())  # takes a's place
    assert tc is not None and _was_cut(fa) and _alive(fb) and _alive(fc)
    for tok in (tb, tc):  # both get in: the connections in fill the cap
        assert gate.leave(tok, admit=lambda: room.__setitem__(0, room[0] - 1)) is False
    assert room == [0]
    d, _ = pairs()
    token, why = gate.enter(None, d.fileno())
    assert token is None and "max_connections" in why
    assert gate.wait_for_room() is True  # no place held: returns at once


def test_close_releases_a_waiting_accept_loop(pairs):
    gate = HandshakeGate(1, grace=None)
    a, _ = pairs()
    gate.enter(None, a.fileno())
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(gate.wait_for_room()), daemon=True)
    t.start()
    t.join(0.2)
    assert t.is_alive()  # waiting in the condition, which close() must wake
    gate.close()
    t.join(5)
    assert got == [False]


def test_a_handshake_past_the_grace_is_cut_only_for_a_newcomer(pairs, listener):
    # with the listening socket: the oldest handshake is cut when a connection waits behind it,
    # not merely because it is slow (a slow client nobody waits for keeps its place)
    lsock = listener
    clock = Clock()
    gate = HandshakeGate(1, grace=1.0, clock=clock)
    a, fa = pairs()
    gate.enter(None, a.fileno())
    clock.t += 5.0  # far past the grace
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(gate.wait_for_room(lsock)), daemon=True)
    t.start()
    t.join(0.3)
    assert t.is_alive() and _alive(fa) and gate.cut == 0  # nobody waits: no cut
    newcomer = socket.create_connection(lsock.getsockname(), timeout=5)
    try:
        t.join(5)
        assert got == [True]
        s, _ = lsock.accept()
        tok_s, _ = gate.enter(None, s.fileno())
        assert tok_s is not None and _was_cut(fa) and gate.cut == 1
        assert gate.leave(tok_s) is False
        s.close()
    finally:
        newcomer.close()
    # a place given back wakes the poll too
    b, fb = pairs()
    tok, _ = gate.enter(None, b.fileno())
    clock.t += 5.0
    got.clear()
    t = threading.Thread(target=lambda: got.append(gate.wait_for_room(lsock)), daemon=True)
    t.start()
    t.join(0.3)
    assert t.is_alive()
    assert gate.leave(tok) is False
    t.join(5)
    assert got == [True] and _alive(fb)
    # and close() ends it
    c, _ = pairs()
    gate.enter(None, c.fileno())
    clock.t += 5.0
    got.clear()
    t = threading.Thread(target=lambda: got.append(gate.wait_for_room(lsock)), daemon=True)
    t.start()
    t.join(0.3)
    assert t.is_alive()
    gate.close()
    t.join(5)
    assert got == [False]


def test_a_listening_socket_that_goes_bad_hands_the_error_to_accept(pairs, listener):
    # a closed descriptor polls as POLLNVAL: wait_for_room returns (accept meets the error and
    # the accept loop sees the server stopping) instead of spinning through poll
    lsock = listener
    clock = Clock()
    gate = HandshakeGate(1, grace=1.0, clock=clock)
    a, fa = pairs()
    gate.enter(None, a.fileno())
    clock.t += 5.0
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(gate.wait_for_room(lsock)), daemon=True)
    t.start()
    t.join(0.3)
    assert t.is_alive()
    fd = lsock.detach()  # the poll keeps polling this number, now closed
    os.close(fd)
    gate.notify()  # wakes the poll, which then meets the closed descriptor
    t.join(5)
    assert not t.is_alive() and got == [True] and _alive(fa) and gate.cut == 0


def test_admit_runs_only_for_a_place_not_cut(pairs):
    clock = Clock()
    gate = HandshakeGate(1, grace=1.0, clock=clock)
    (a, _), (b, _) = pairs(), pairs()
    ta, _ = gate.enter(None, a.fileno())
    clock.t += 2.0
    assert gate.wait_for_room() is True
    tb, _ = gate.enter(None, b.fileno())  # cuts a
    admitted: list[str] = []
    assert gate.leave(ta, admit=lambda: admitted.append("a")) is True
    assert gate.leave(tb, admit=lambda: admitted.append("b")) is False
    assert admitted == ["b"]


def test_a_remote_peer_holds_at_most_per_peer_places(pairs):
    clock = Clock()
    gate = HandshakeGate(10, per_peer=2, grace=1.0, clock=clock)
    (a, fa), (b, fb), (c, fc), (d, fd) = pairs(), pairs(), pairs(), pairs()
    gate.enter("192.0.2.7", a.fileno())
    clock.t += 0.5
    gate.enter("192.0.2.7", b.fileno())
    other, _ = gate.enter("192.0.2.8", c.fileno())  # another host is not counted against it
    assert other is not None
    token, why = gate.enter("192.0.2.7", d.fileno())
    assert token is None and "192.0.2.7 already has 2" in why  # its two are young: refused
    clock.t += 0.5  # a has run 1.0 s: the peer's next one cuts it
    assert gate.enter("192.0.2.7", d.fileno())[0] is not None
    assert _was_cut(fa) and _alive(fb) and _alive(fc) and _alive(fd)
    assert gate.waiting() == 3


def test_a_peer_at_its_limit_never_costs_another_peer_a_place(pairs):
    # a full gate, another host's handshake the oldest and past the grace: a newcomer from a
    # peer already at its limit is refused (its own are young) and nobody is cut for it
    clock = Clock()
    gate = HandshakeGate(3, per_peer=2, grace=1.0, clock=clock)
    (a, fa), (b, fb), (c, fc), (d, _) = pairs(), pairs(), pairs(), pairs()
    gate.enter("192.0.2.8", a.fileno())
    clock.t += 1.5
    gate.enter("192.0.2.7", b.fileno())
    gate.enter("192.0.2.7", c.fileno())
    token, why = gate.enter("192.0.2.7", d.fileno())
    assert token is None and "max_handshakes_per_peer" in why
    assert _alive(fa) and _alive(fb) and _alive(fc) and gate.cut == 0
    e, _ = pairs()
    assert gate.enter("192.0.2.9", e.fileno())[0] is not None  # a third host: a is cut for it
    assert _was_cut(fa) and gate.cut == 1


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1", None])
def test_loopback_and_unix_peers_share_the_total_only(pairs, peer):
    gate = HandshakeGate(10, per_peer=1, grace=None, clock=Clock())
    for _ in range(5):
        s, _ = pairs()
        assert gate.enter(peer, s.fileno())[0] is not None
    assert gate.waiting() == 5


def test_loopback_test():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("::ffff:127.0.0.2")
    assert not _is_loopback("192.0.2.1") and not _is_loopback("::ffff:192.0.2.1") and not _is_loopback("fe80::1%eth0")
    assert not _is_loopback("not an address")


def test_bad_settings_are_refused():
    for kw in ({"total": 0}, {"total": 1, "per_peer": 0}, {"total": 1, "grace": -1.0}):
        with pytest.raises(ValueError):
            HandshakeGate(**kw)
        with pytest.raises(ValueError):
            HandshakeGate.validate(**{"per_peer": None, "grace": 1.0, **kw})


def _until(pred, limit=5.0):
    end = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


def test_a_newcomer_seen_as_a_handshake_gets_in_waits_for_the_grace_again(pairs, listener):
    # max_connections is the tighter cap: a handshake let in takes its place with it, so the
    # gate stays full; if that happens while the accept loop is woken by a newcomer, the gate
    # is now full of young handshakes and the newcomer must wait in the backlog, not be
    # accepted only to be refused
    clock = Clock()
    open_conns = [2]
    gate = HandshakeGate(4, grace=1.0, room=lambda: 4 - open_conns[0], clock=clock)
    (a, _), (b, fb) = pairs(), pairs()
    ta, _ = gate.enter(None, a.fileno())
    clock.t += 0.5
    gate.enter(None, b.fileno())
    clock.t += 0.7  # a 1.2 s, b 0.7 s: full, a past the grace
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(gate.wait_for_room(listener)), daemon=True)
    t.start()
    _until(lambda: gate._polling)
    with gate.cond:  # the accept loop cannot take the lock back before a is in
        newcomer = socket.create_connection(listener.getsockname(), timeout=5)
        gate.pending.pop(ta)  # what leave(ta, admit=...) does, as one step under the lock
        open_conns[0] += 1
    try:
        t.join(0.5)
        assert t.is_alive() and not got  # b is young: the newcomer waits in the backlog
        clock.t += 0.5  # b past the grace
        t.join(5)
        assert got == [True]
        s, _ = listener.accept()
        tok, why = gate.enter(None, s.fileno())
        assert tok is not None, why
        assert _was_cut(fb) and gate.cut == 1
        s.close()
    finally:
        newcomer.close()


def test_enter_with_wait_waits_out_the_grace_instead_of_refusing(pairs):
    gate = HandshakeGate(1, grace=0.2)  # the real clock
    (a, fa), (b, _) = pairs(), pairs()
    gate.enter(None, a.fileno())
    assert gate.enter(None, b.fileno())[0] is None  # young, no wait: refused
    tok, why = gate.enter(None, b.fileno(), wait=True)
    assert tok is not None, why
    assert _was_cut(fa) and gate.cut == 1
    closer = HandshakeGate(1, grace=None)
    c, _ = pairs()
    closer.enter(None, c.fileno())
    got: list[tuple] = []
    d, _ = pairs()
    t = threading.Thread(target=lambda: got.append(closer.enter(None, d.fileno(), wait=True)), daemon=True)
    t.start()
    t.join(0.2)
    assert t.is_alive()
    closer.close()
    t.join(5)
    assert got and got[0][0] is None
