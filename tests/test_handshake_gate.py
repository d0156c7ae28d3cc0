"""HandshakeGate: places for connections still authenticating (total, per peer, grace).

The clock is injected, so ages are exact; a cut is seen for real, as EOF on the other end of
a socket pair whose descriptor the gate shut down."""

from __future__ import annotations

import socket
import threading

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
    assert _was_cut(fa) and _alive(fb)
    assert gate.cut == 1 and gate.waiting() == 1
    assert gate.leave(ta) is True  # its thread learns it was cut
    assert gate.leave(tb) is False
    assert gate.waiting() == 0


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
    t = threading.Thread(target=lambda: got.append(gate.wait_for_room()))
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
    assert _was_cut(fb) and real.cut == 1


def test_the_connection_cap_leaves_fewer_places(pairs):
    clock = Clock()
    room = [3]  # max_connections less the connections in
    gate = HandshakeGate(8, grace=1.0, room=lambda: room[0], clock=clock)
    (a, fa), (b, fb) = pairs(), pairs()
    gate.enter(None, a.fileno())
    clock.t += 0.5
    gate.enter(None, b.fileno())
    assert gate.wait_for_room() is True  # 2 of 3: room
    room[0] = 2  # one more connection got in: full
    clock.t += 0.6  # a has run 1.1 s, b 0.6 s
    assert gate.wait_for_room() is True
    assert _was_cut(fa) and _alive(fb)
    room[0] = 0  # the connections in fill the cap: nothing to wait for, the next one is refused
    clock.t += 1.0
    assert gate.wait_for_room() is True and _was_cut(fb)
    c, _ = pairs()
    token, why = gate.enter(None, c.fileno())
    assert token is None and "max_connections" in why
    assert gate.wait_for_room() is True  # no place held: returns at once


def test_close_releases_a_waiting_accept_loop(pairs):
    gate = HandshakeGate(1, grace=None)
    a, _ = pairs()
    gate.enter(None, a.fileno())
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(gate.wait_for_room()))
    t.start()
    t.join(0.2)
    assert t.is_alive()  # waiting in the condition, which close() must wake
    gate.close()
    t.join(5)
    assert got == [False]


def test_a_handshake_past_the_grace_is_cut_only_for_a_newcomer(pairs):
    # with the listening socket: the oldest handshake is cut when a connection waits behind it,
    # not merely because it is slow (a slow client nobody waits for keeps its place)
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    clock = Clock()
    gate = HandshakeGate(1, grace=1.0, clock=clock)
    a, fa = pairs()
    gate.enter(None, a.fileno())
    clock.t += 5.0  # far past the grace
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(gate.wait_for_room(lsock)))
    t.start()
    t.join(0.3)
    assert t.is_alive() and _alive(fa) and gate.cut == 0  # nobody waits: no cut
    newcomer = socket.create_connection(lsock.getsockname(), timeout=5)
    try:
        t.join(5)
        assert got == [True] and _was_cut(fa) and gate.cut == 1
    finally:
        newcomer.close()
    # a place given back wakes the poll too
    b, fb = pairs()
    tok, _ = gate.enter(None, b.fileno())
    clock.t += 5.0
    lsock.accept()[0].close()  # the newcomer above, no longer waiting
    got.clear()
    t = threading.Thread(target=lambda: got.append(gate.wait_for_room(lsock)))
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
    t = threading.Thread(target=lambda: got.append(gate.wait_for_room(lsock)))
    t.start()
    t.join(0.3)
    assert t.is_alive()
    gate.close()
    t.join(5)
    assert got == [False]
    lsock.close()


def test_admit_runs_only_for_a_place_not_cut(pairs):
    clock = Clock()
    gate = HandshakeGate(1, grace=1.0, clock=clock)
    (a, _), (b, _) = pairs(), pairs()
    ta, _ = gate.enter(None, a.fileno())
    clock.t += 2.0
    assert gate.wait_for_room() is True  # no lsock: cut a
    tb, _ = gate.enter(None, b.fileno())
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
