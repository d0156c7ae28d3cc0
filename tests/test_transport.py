"""transport.Channel: the serving layer's framing. Same bytes on the wire as
``multiprocessing.connection`` (so CPython's Connection and handshake talk to it), any split
of the byte stream into reads, frames larger than its buffer, pipelined frames, limits, EOF."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from multiprocessing.connection import Connection

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitlearn.serving import transport
from splitlearn.serving.transport import Channel, FrameTooLarge


def _pair(bufsize: int = 1 << 16) -> tuple[Channel, socket.socket]:
    a, b = socket.socketpair()
    return Channel(a.detach(), bufsize=bufsize), b


def _in_thread(fn, *args) -> threading.Thread:
    """Run a writer concurrently, so a stream larger than the socket buffer cannot block the test."""
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def _assert_connection_reads_what_channel_sends(msgs: list[bytes], timed: bool = False) -> None:
    """Send ``msgs`` through a Channel (in a thread; with a deadline if ``timed``) and read them
    with CPython's Connection."""
    a, b = socket.socketpair()
    ch, conn = Channel(a.detach()), Connection(b.detach())

    def write() -> None:
        for m in msgs:
            ch.send_bytes(m, time.monotonic() + 30 if timed else None)

    t = _in_thread(write)
    try:
        assert [conn.recv_bytes() for _ in msgs] == msgs
        t.join(30)
    finally:
        ch.close()
        conn.close()


messages = st.lists(
    st.one_of(st.binary(max_size=64), st.binary(min_size=100, max_size=3000), st.integers(60_000, 200_000).map(os.urandom)),
    min_size=1,
    max_size=8,
)


@settings(max_examples=40, deadline=None)
@given(msgs=messages, bufsize=st.sampled_from([16, 37, 4096, 1 << 16]), chunk=st.integers(1, 9000), timed=st.booleans())
def test_channel_reads_cpython_frames_however_the_stream_is_cut(msgs, bufsize, chunk, timed):
    """Frames written by CPython's Connection framing, delivered in arbitrary pieces (all
    pipelined, so reads see several frames and frames split across reads), come out whole
    and in order; with a deadline (``timed``) as without."""
    ch, peer = _pair(bufsize)
    stream = b"".join(struct.pack("!i", len(m)) + m for m in msgs)

    def write() -> None:
        for i in range(0, len(stream), chunk):
            peer.sendall(stream[i : i + chunk])

    t = _in_thread(write)
    try:
        got = [bytes(ch.recv_buffer(None, time.monotonic() + 30)) if timed else ch.recv_bytes() for _ in msgs]
        assert got == msgs
        t.join(30)
        peer.close()
        with pytest.raises(EOFError):
            ch.recv_bytes()
    finally:
        ch.close()
        peer.close()


@settings(max_examples=25, deadline=None)
@given(msgs=messages, timed=st.booleans())
def test_cpython_connection_reads_channel_frames(msgs, timed):
    _assert_connection_reads_what_channel_sends(msgs, timed)


def test_recv_buffer_is_a_fresh_bytearray_each_time():
    ch, peer = _pair()
    try:
        peer.sendall(struct.pack("!i", 3) + b"abc" + struct.pack("!i", 3) + b"def")
        first = ch.recv_buffer()
        second = ch.recv_buffer()
        assert (type(first), first, second) == (bytearray, bytearray(b"abc"), bytearray(b"def"))
        first[0] = 0x7A  # the caller owns it: the channel's buffer is not aliased
        peer.sendall(struct.pack("!i", 3) + b"ghi")
        assert ch.recv_buffer() == b"ghi" and second == b"def"
    finally:
        ch.close()
        peer.close()


def test_eight_byte_length_form_is_understood():
    """multiprocessing.connection marks a message of 2 GiB or more with -1 and an 8-byte length."""
    ch, peer = _pair(bufsize=16)
    try:
        peer.sendall(struct.pack("!i", -1) + struct.pack("!Q", 5) + b"hello" + struct.pack("!i", 0))
        assert ch.recv_bytes() == b"hello"
        assert ch.recv_bytes() == b""
    finally:
        ch.close()
        peer.close()
    assert transport.frame_header(10) == struct.pack("!i", 10)
    assert transport.frame_header(2**31) == struct.pack("!i", -1) + struct.pack("!Q", 2**31)


@pytest.mark.parametrize("buffered", [False, True])
def test_frame_over_the_limit_raises_before_its_body_is_read(buffered):
    ch, peer = _pair()
    try:
        if buffered:  # a small frame first, in the same read, so the big one comes from the buffer
            peer.sendall(struct.pack("!i", 1) + b"x" + struct.pack("!i", 1000) + b"y" * 1000)
            assert ch.recv_bytes(10) == b"x"
        else:
            peer.sendall(struct.pack("!i", 1000) + b"y" * 1000)
        with pytest.raises(FrameTooLarge, match="1000 bytes exceeds the maximum frame size of 10") as ei:
            ch.recv_bytes(10)
        assert (ei.value.size, ei.value.limit) == (1000, 10)
        assert isinstance(ei.value, OSError)
    finally:
        ch.close()
        peer.close()


def test_negative_length_other_than_the_marker_is_an_error():
    ch, peer = _pair()
    try:
        peer.sendall(struct.pack("!i", -7) + b"junk")
        with pytest.raises(OSError, match="bad message length -7"):
            ch.recv_bytes()
    finally:
        ch.close()
        peer.close()


@pytest.mark.parametrize("cut", [2, 4, 9])
def test_eof_inside_a_frame_is_eoferror(cut):
    ch, peer = _pair(bufsize=16)
    try:
        peer.sendall((struct.pack("!i", 100) + b"z" * 100)[:cut])
        peer.close()
        with pytest.raises(EOFError):
            ch.recv_bytes()
    finally:
        ch.close()


def test_poll_counts_buffered_bytes_and_waits_otherwise():
    ch, peer = _pair()
    try:
        assert ch.poll(0) is False
        peer.sendall(struct.pack("!i", 1) + b"a" + struct.pack("!i", 1) + b"b")
        assert ch.poll(5) is True
        assert ch.recv_bytes() == b"a"
        # "b" is in the channel's buffer, not in the socket: poll must still say so
        assert ch.poll(0) is True
        assert ch.recv_bytes() == b"b"
        assert ch.poll(0.05) is False
    finally:
        ch.close()
        peer.close()


def test_close_and_fileno():
    ch, peer = _pair()
    fd = ch.fileno()
    assert not ch.closed
    ch.close()
    assert ch.closed
    ch.close()  # twice is harmless
    with pytest.raises(OSError, match="closed"):
        ch.fileno()
    with pytest.raises(OSError):
        os.fstat(fd)  # the descriptor is really closed
    peer.close()


@pytest.mark.parametrize("ours_is_server", [True, False])
def test_handshake_between_channel_and_cpython_connection(ours_is_server):
    """Our handshake on a Channel against CPython's own, on a Connection, both ways round."""
    from multiprocessing.connection import answer_challenge, deliver_challenge

    key = os.urandom(32)
    a, b = socket.socketpair()
    ch, conn = Channel(a.detach()), Connection(b.detach())
    errors: list[BaseException] = []

    def theirs() -> None:
        try:
            if ours_is_server:
                answer_challenge(conn, key)
                deliver_challenge(conn, key)
            else:
                deliver_challenge(conn, key)
                answer_challenge(conn, key)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = _in_thread(theirs)
    try:
        (transport.server_handshake if ours_is_server else transport.client_handshake)(ch, key, 10)
        t.join(10)
        assert not errors and not t.is_alive()
        ch.send_bytes(b"after")
        assert conn.recv_bytes() == b"after"
    finally:
        ch.close()
        conn.close()


# --- ipc_transports: which CPU layouts it measures and which figure it quotes ---------------------
def test_ipc_layouts_follow_the_cpus_this_process_may_use(monkeypatch):
    from repro.scenarios import ipc_transports as ipc

    monkeypatch.setattr(ipc.os, "sched_getaffinity", lambda pid: {7, 3, 5})
    assert ipc._layouts() == {"same_cpu": (3, 3), "cross_cpu": (3, 5), "unpinned": (None, None)}
    monkeypatch.setattr(ipc.os, "sched_getaffinity", lambda pid: {4})
    assert ipc._layouts() == {"same_cpu": (4, 4), "unpinned": (None, None)}


def test_ipc_headline_is_the_least_favourable_pinned_layout():
    from repro.scenarios.ipc_transports import headline

    def r(floor: float, mgr: float) -> dict[str, float]:
        return {"unix_connection_over_raw_socketpair": floor, "manager_over_unix_mp_connection": mgr, "manager_over_unix_connection": 99.0}

    per = {"same_cpu": r(1.3, 11.0), "cross_cpu": r(1.1, 6.0), "unpinned": r(0.8, 20.0)}
    assert headline(per) == (1.3, 6.0)  # the unpinned run never sets the figure, in either direction
    assert headline({"same_cpu": r(1.6, 12.0), "unpinned": r(1.0, 5.0)}) == (1.6, 12.0)  # one CPU
    with pytest.raises(ValueError):
        headline({"unpinned": r(1.0, 5.0)})


def test_short_writes_are_completed(monkeypatch):
    """A socket that takes only part of a write (a signal, a send timeout) still gets every byte
    of every frame, header and body, in order."""
    real_write = os.write
    monkeypatch.setattr(transport.os, "writev", lambda fd, bufs: real_write(fd, bytes(bufs[0])[:3]))
    monkeypatch.setattr(transport.os, "write", lambda fd, data: real_write(fd, bytes(data[:1000])))
    _assert_connection_reads_what_channel_sends([os.urandom(200_000), b"small" * 30, b""])


def _fill_socket(sock: socket.socket) -> None:
    """Send until the socket (and its peer's receive buffer) takes no more."""
    chunk = b"x" * 65536
    while True:
        try:
            sock.send(chunk, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return


def test_a_frame_cut_off_mid_way_times_out_at_the_deadline():
    """The timeout covers the whole frame, not only its first byte: a peer that sends part of a
    frame and stops (paused, partitioned) gives FrameTimeout at the deadline, not a read that
    never returns. Nothing at all gives a plain TimeoutError (the connection is still usable)."""
    ch, peer = _pair()
    got: list[BaseException] = []
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as nothing:
            transport.recv_frame(ch, timeout=0.2)
        assert not isinstance(nothing.value, transport.FrameTimeout)
        assert time.monotonic() - t0 >= 0.2
        peer.sendall(struct.pack("!i", 1000) + b"y" * 10)  # a header and 10 of 1000 bytes

        def read() -> None:
            try:
                transport.recv_frame(ch, timeout=0.3)
            except BaseException as exc:  # noqa: BLE001 - examined below
                got.append(exc)

        t = _in_thread(read)
        t.join(10)
        assert not t.is_alive(), "the read outlived its timeout by 10 s"
        assert len(got) == 1 and isinstance(got[0], transport.FrameTimeout), got
    finally:
        peer.close()  # wakes a read that did not time out (EOF)
        ch.close()


@pytest.mark.parametrize("peer_reads", ["nothing_room_for_none", "nothing", "a_trickle"])
def test_a_send_to_a_peer_that_stops_reading_ends_at_its_deadline(peer_reads):
    """A send with a deadline never blocks past it: a peer that reads nothing, or a trickle (under
    SO_SNDTIMEO each byte taken starts the timeout again). Nothing sent: TimeoutError, the
    connection still in step; part sent: FrameTimeout."""
    ch, peer = _pair()
    stop = threading.Event()
    try:
        if peer_reads == "nothing_room_for_none":
            borrowed = socket.socket(fileno=os.dup(ch.fileno()))
            _fill_socket(borrowed)
            borrowed.close()
        elif peer_reads == "a_trickle":

            def trickle() -> None:  # 1 KiB every 20 ms, until the test ends
                with contextlib.suppress(OSError):
                    while not stop.wait(0.02):
                        peer.recv(1024)

            reader = _in_thread(trickle)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as exc:
            ch.send_bytes(b"z" * (64 if peer_reads == "nothing_room_for_none" else 8 << 20), t0 + 0.3)
        took = time.monotonic() - t0
        assert 0.3 <= took < 5, took
        assert isinstance(exc.value, transport.FrameTimeout) == (peer_reads != "nothing_room_for_none")
    finally:
        stop.set()
        if peer_reads == "a_trickle":
            reader.join(5)
        peer.close()
        ch.close()


def held_timer(fired: list):
    """A stand-in for threading.Timer that never fires by itself: its function goes to ``fired``
    for the test to call when it chooses, like a timer thread that lost a race."""

    class HeldTimer:
        def __init__(self, interval, fn):
            fired.append(fn)
            self.daemon = True

        def start(self):
            pass

        def cancel(self):
            pass

    return HeldTimer


def test_deadline_never_fires_after_its_block():
    """threading.Timer.cancel does not stop a timer already firing: a connection that finished its
    handshake in time must not be shut down by it afterwards (nor, once closed, a connection that
    took its descriptor number)."""
    fired = []

    ch, peer = _pair()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(transport.threading, "Timer", held_timer(fired))
            with transport.deadline(ch, 5.0) as state:
                pass
        fired[0]()  # the late fire
        assert not state["expired"]
        peer.sendall(struct.pack("!i", 2) + b"ok")
        assert ch.recv_bytes() == b"ok"  # still open both ways
        ch.send_bytes(b"back")
        assert peer.recv(100) == struct.pack("!i", 4) + b"back"
    finally:
        peer.close()
        ch.close()


@pytest.mark.parametrize("side", ["client", "server"])
def test_a_deadline_that_fires_after_the_last_read_fails_the_handshake(side):
    """The handshake's watchdog fires after the last message of the handshake but before its
    block ends: the socket is shut down under a handshake that went through. Nothing looked at
    the expiry afterwards, so connect() handed back a dead connection. Now it is a HandshakeError."""
    key = b"k" * 16
    a, b = socket.socketpair()
    ours, theirs = Channel(a.detach()), Channel(b.detach())
    fired = []

    last_step = "deliver_challenge" if side == "client" else "answer_challenge"
    real = getattr(transport, last_step)

    def then_fire(conn, authkey):
        real(conn, authkey)
        if conn is ours:
            fired[0]()  # the deadline, at the worst moment

    ours_hs = transport.client_handshake if side == "client" else transport.server_handshake
    theirs_hs = transport.server_handshake if side == "client" else transport.client_handshake
    errors: list = []

    def peer() -> None:
        try:
            theirs_hs(theirs, key, None)  # no deadline (and so no timer) on the peer's side
        except BaseException as exc:  # noqa: BLE001 - examined below
            errors.append(exc)

    t = threading.Thread(target=peer, daemon=True)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(transport.threading, "Timer", held_timer(fired))
            mp.setattr(transport, last_step, then_fire)
            t.start()
            with pytest.raises(transport.HandshakeError, match="did not finish within"):
                ours_hs(ours, key, 5.0)
            t.join(10)
        assert not t.is_alive() and len(fired) == 1
    finally:
        ours.close()
        theirs.close()
