"""Sockets under the serving layer: listen, connect, authenticate, and move frames, all with
deadlines.

Authentication is the HMAC challenge/response of ``multiprocessing.connection`` (both
directions, as ``Listener``/``Client`` do), but run by us on an already accepted socket and
under a deadline:

* ``Listener(authkey=...).accept()`` runs the handshake inside ``accept``, so one client that
  connects and says nothing stalls every later client; we accept raw sockets and
  authenticate in the connection's own thread.
* ``Client(authkey=...)`` against a listener without an authkey waits forever for a
  challenge that never comes (CPython issue 123736); our handshake is bounded: a watchdog
  shuts the socket down at the deadline, which turns the blocked read into an error.

The connections are :class:`Channel` objects: the framing of ``multiprocessing.connection``
(a 4-byte big-endian length, then the bytes; ``-1`` and an 8-byte length for messages of
2 GiB or more), so CPython's ``Connection`` and its handshake talk to them unchanged, but read
in one system call per frame in the common case. ``Connection.recv_bytes`` reads the length
and the body separately; on the VMs measured here that second read costs more than the rest
of the framing (see ``ipc_transports``). There is no ``send``/``recv`` that pickles.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing import AuthenticationError
from multiprocessing.connection import answer_challenge, deliver_challenge
from typing import Any

from splitlearn.serving import wire


class ServingError(RuntimeError):
    """Base of the serving errors a caller sees."""


class ServerError(ServingError):
    """The server answered with an error frame."""

    def __init__(self, code: str, message: str):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


class ServerUnavailable(ServingError, ConnectionError):
    """The connection broke (server gone, killed, or it closed us)."""


class HandshakeError(ServingError, AuthenticationError):
    """Authentication failed or did not finish within its deadline."""


class UnreadFrame(wire.OversizedFrame):
    """An incoming frame larger than the receiver takes, whose body was therefore not read: the
    stream is out of step and the connection must be closed. (Any other :class:`wire.WireError`
    from :func:`recv_frame` comes from a frame read whole: the stream is still in step.)"""


class FrameTimeout(TimeoutError):
    """The deadline passed in the middle of a frame (part of it sent, or received): the stream
    is out of step and the connection must be closed. A plain ``TimeoutError`` from a send or
    receive with a deadline means no byte of the frame moved: the connection is still usable."""


_MAX_POLL_MS = 2**31 - 1


def _ms(seconds: float) -> int:
    """poll(2)'s timeout for ``seconds`` (> 0): whole milliseconds, rounded up, so that a poll
    that finds nothing has reached the deadline; at most poll's limit (about 24 days: a longer
    wait, an infinite one included, polls again)."""
    ms = seconds * 1e3
    return math.ceil(ms) if ms < _MAX_POLL_MS else _MAX_POLL_MS


def check_timeout(name: str, value: Any, *, none_ok: bool = False, zero_ok: bool = False) -> float | None:
    """``value`` as a float of seconds, or a ValueError that names ``name``. Timeouts are finite
    and positive (``zero_ok``: or 0); infinity and NaN are refused: every wait here turns its
    timeout into a deadline, and neither makes one. ``none_ok``: ``None`` is the way to say
    "no limit" (and is returned as is)."""
    if value is None and none_ok:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        hint = " (None for no limit)" if none_ok else ""
        raise ValueError(f"{name} must be finite and {bound}{hint}, got {value!r}")
    return v


def send_until(sock: socket.socket, parts: list[Any], deadline: float) -> None:
    """Send every buffer of ``parts``, in order, by the monotonic ``deadline``: non-blocking
    sends, and poll(2) for room between them, so that a peer that stops reading (or reads a byte
    at a time) cannot hold the sender past it, as a blocking send under SO_SNDTIMEO would (its
    timeout starts again with every byte the peer takes). ``TimeoutError`` when nothing was
    sent, :class:`FrameTimeout` when part was. ``parts``: bytes, or byte-format memoryviews."""
    sent_any = False
    if len(parts) == 1:  # the common case, kept short: one send that the socket takes whole
        try:
            n = sock.send(parts[0], socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            n = 0
        if n == len(parts[0]):
            return
        sent_any = n > 0
        parts = [memoryview(parts[0]).cast("B")[n:]]
    views = [memoryview(b).cast("B") for b in parts if len(b)]
    poller = None
    while views:
        try:
            n = sock.send(views[0], socket.MSG_DONTWAIT) if len(views) == 1 else sock.sendmsg(views, (), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            n = 0
        if n:
            sent_any = True
            while n and n >= len(views[0]):
                n -= len(views.pop(0))
            if n:
                views[0] = views[0][n:]
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            if sent_any:
                raise FrameTimeout("the peer stopped taking a frame before the deadline; part of it was sent")
            raise TimeoutError("the peer took no byte before the deadline")
        if poller is None:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLOUT)
        poller.poll(_ms(left))


_LEN = struct.Struct("!i")
_LEN64 = struct.Struct("!Q")
_SMALL = 1 << 16  # a frame up to this size is sent as one write of header + body


class FrameTooLarge(OSError):
    """An incoming frame announced more bytes than the receiver takes; the stream is then out
    of step (its body was not read) and the connection must be closed."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"incoming frame of {size} bytes exceeds the maximum frame size of {limit} bytes")
        self.size = size
        self.limit = limit


def frame_header(n: int) -> bytes:
    """The length prefix of an ``n``-byte message, as ``multiprocessing.connection`` writes it."""
    return _LEN.pack(n) if n <= 0x7FFFFFFF else _LEN.pack(-1) + _LEN64.pack(n)


def _write_rest(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def _write_all(fd: int, head: bytes, body: Any) -> None:
    """Write ``head`` then ``body`` (a large frame) with one ``writev`` where the socket takes it all."""
    sent = os.writev(fd, [head, body])
    if sent < len(head):
        _write_rest(fd, memoryview(head)[sent:])
        sent = len(head)
    _write_rest(fd, memoryview(body)[sent - len(head) :])


class Channel:
    """A framed, bidirectional byte stream over one socket descriptor (which it owns).

    ``send_bytes``/``recv_bytes``/``poll``/``fileno``/``close`` as on ``Connection``, with the
    same bytes on the wire. Reads go through a buffer: one ``readv`` fetches what the socket
    holds (up to ``bufsize``), which for a frame that fits is the whole frame, header and body;
    bytes of a following frame stay buffered for the next call. Not thread-safe: one reader
    and one writer at a time (the serving code holds a lock per side)."""

    __slots__ = ("_fd", "_sock", "_buf", "_view", "_start", "_end", "__weakref__")

    def __init__(self, fd: int, *, bufsize: int = 1 << 16):
        if fd < 0:
            raise ValueError("invalid file descriptor")
        self._fd: int | None = fd
        self._sock: socket.socket | None = None  # the descriptor, borrowed, for sends with a deadline
        self._buf = bytearray(max(bufsize, 16))
        self._view = memoryview(self._buf)
        self._start = self._end = 0  # buffered, unread bytes: _buf[_start:_end]

    # -- descriptor ------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._fd is None

    def fileno(self) -> int:
        if self._fd is None:
            raise OSError("handle is closed")
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if self._sock is not None:
            self._sock.detach()  # borrowed: the descriptor is ours to close
            self._sock = None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_sock", None) is not None:
            self._sock.detach()
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- sending ---------------------------------------------------------------------------
    def send_bytes(self, buf: Any, deadline: float | None = None) -> None:
        """Send one message. With a ``deadline`` (``time.monotonic()`` seconds) it never blocks
        past it (see :func:`send_until`); without one it blocks until the socket took it all."""
        fd = self._fd
        if fd is None:
            raise OSError("handle is closed")
        if type(buf) is not bytes:
            buf = memoryview(buf).cast("B")
        n = len(buf)
        if deadline is not None:
            if self._sock is None:
                self._sock = socket.socket(fileno=fd)
            send_until(self._sock, [_LEN.pack(n) + buf] if n <= _SMALL else [frame_header(n), buf], deadline)
            return
        if n <= _SMALL:  # the common case, kept short: one write of header + body
            data = _LEN.pack(n) + buf
            sent = os.write(fd, data)
            if sent != len(data):
                _write_rest(fd, memoryview(data)[sent:])
            return
        _write_all(fd, frame_header(n), buf)

    # -- receiving -------------------------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> bool:
        """Whether a frame's bytes (or EOF) can be read without waiting, waiting up to
        ``timeout`` seconds: buffered bytes count; otherwise one poll(2)."""
        if self._start != self._end:
            return True
        p = select.poll()
        p.register(self.fileno(), select.POLLIN)
        return bool(p.poll(_ms(timeout) if timeout > 0 else 0))

    def recv_buffer(
        self, maxlength: int | None = None, deadline: float | None = None, *, rest_within: float | None = None
    ) -> bytearray:
        """The next message as a fresh ``bytearray``. ``EOFError`` at end of stream (also in
        the middle of a frame), :class:`FrameTooLarge` past ``maxlength``. With a ``deadline``
        (``time.monotonic()`` seconds) no read waits past it: ``TimeoutError`` when no byte of
        the message came, :class:`FrameTimeout` when part of it did. ``rest_within`` (seconds),
        without a deadline: wait for the message as long as it takes, but once part of it is
        read the rest must come within that time (:class:`FrameTimeout`); no extra system call
        when it comes whole."""
        if self._start == self._end:
            # nothing buffered: one read, which usually is exactly one whole frame
            fd = self._fd
            if fd is None:
                raise OSError("handle is closed")
            if deadline is not None:
                self._wait(deadline, started=False)
            got = os.readv(fd, [self._view])
            if got >= 4:
                n = _LEN.unpack_from(self._buf)[0]
                if n + 4 == got and (maxlength is None or n <= maxlength):
                    return self._buf[4:got]
            elif not got:
                raise EOFError
            self._start, self._end = 0, got
        if deadline is None and rest_within is not None:
            deadline = time.monotonic() + rest_within
        return self._recv_buffered(maxlength, deadline)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        return bytes(self.recv_buffer(maxlength))

    def _wait(self, deadline: float, *, started: bool = True) -> None:
        """Until the socket is readable, or the deadline: then ``TimeoutError`` (FrameTimeout
        once a frame has ``started``)."""
        left = deadline - time.monotonic()
        p = select.poll()
        p.register(self.fileno(), select.POLLIN)
        if p.poll(_ms(left) if left > 0 else 0):  # past it: still take what is already there
            return
        if started:
            raise FrameTimeout("the deadline passed in the middle of a frame: the connection is out of step")
        raise TimeoutError("no message within the deadline")

    def _fill(self, need: int, deadline: float | None) -> None:
        """Read until at least ``need`` bytes are buffered (``need`` <= the buffer's size)."""
        while self._end - self._start < need:
            if self._start and len(self._buf) - self._start < need:
                k = self._end - self._start
                self._buf[:k] = self._buf[self._start : self._end]
                self._start, self._end = 0, k
            if deadline is not None:
                self._wait(deadline)
            got = os.readv(self.fileno(), [self._view[self._end :]])
            if not got:
                raise EOFError
            self._end += got

    def _recv_buffered(self, maxlength: int | None, deadline: float | None) -> bytearray:
        self._fill(4, deadline)
        s = self._start
        n = _LEN.unpack_from(self._buf, s)[0]
        head = 4
        if n == -1:
            self._fill(12, deadline)
            s = self._start
            n = _LEN64.unpack_from(self._buf, s + 4)[0]
            head = 12
        elif n < 0:
            raise OSError(f"bad message length {n}: the stream is out of step")
        if maxlength is not None and n > maxlength:
            raise FrameTooLarge(n, maxlength)
        have = self._end - s - head
        if have >= n:
            out = self._buf[s + head : s + head + n]
            self._start = s + head + n
            if self._start == self._end:
                self._start = self._end = 0
            return out
        # a frame longer than what is buffered: the rest is read straight into it
        out = bytearray(n)
        out[:have] = self._view[s + head : self._end]
        self._start = self._end = 0
        view = memoryview(out)
        while have < n:
            if deadline is not None:
                self._wait(deadline)
            got = os.readv(self.fileno(), [view[have:]])
            if not got:
                raise EOFError
            have += got
        return out


def shutdown_fd(fd: int) -> None:
    """Shut a socket down by descriptor: any thread blocked reading it wakes with EOF. Borrows
    the descriptor (no dup, which would fail just when descriptors run out)."""
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.detach()


@contextlib.contextmanager
def deadline(conn: Any, seconds: float | None) -> Iterator[dict[str, bool]]:
    """Bound every blocking read/write on ``conn`` inside the block: at the deadline the socket
    is shut down (the blocked call then fails) and ``state['expired']`` is set."""
    state = {"expired": False}
    if seconds is None:
        yield state
        return

    lock = threading.Lock()
    done = False

    def fire() -> None:
        # under the lock, and never once the block has ended: Timer.cancel does not stop a fire
        # already running, whose shutdown would then hit a connection that finished in time, or
        # one that took its descriptor number after it was closed
        with lock:
            if done:
                return
            state["expired"] = True
            shutdown_fd(conn.fileno())

    timer = threading.Timer(max(0.0, seconds), fire)
    timer.daemon = True
    timer.start()
    try:
        yield state
    finally:
        with lock:
            done = True
        timer.cancel()


def _handshake(conn: Any, authkey: bytes | None, timeout: float | None, server: bool) -> None:
    if authkey is None:
        return
    if not isinstance(authkey, bytes):
        raise TypeError("authkey must be bytes")
    who = "client" if server else "server"
    try:
        with deadline(conn, timeout) as st:
            try:
                if server:
                    deliver_challenge(conn, authkey)
                    answer_challenge(conn, authkey)
                else:
                    answer_challenge(conn, authkey)
                    deliver_challenge(conn, authkey)
            except AuthenticationError as exc:
                if st["expired"]:
                    raise TimeoutError() from exc
                raise HandshakeError(f"authentication with the {who} failed: {exc} (wrong authkey?)") from None
            except AssertionError as exc:  # 3.10/3.11 answer_challenge asserts on a non-challenge
                raise HandshakeError(
                    f"the {who} did not start the authentication handshake (it has no authkey, or is not a splitlearn peer): {exc}"
                ) from None
            except (EOFError, OSError) as exc:
                if st["expired"]:
                    raise TimeoutError() from exc
                # a wrong key is reported by the peer (#FAILURE#, above); a bare close is the peer going away
                err = ServerUnavailable if not server else HandshakeError
                raise err(f"the {who} closed the connection during authentication ({type(exc).__name__}: {exc})") from None
        if st["expired"]:
            # the deadline fired after the last read but before the block ended: the handshake
            # went through, and the socket was shut down under it. The connection is dead.
            raise TimeoutError()
    except TimeoutError:
        hint = "" if server else " (the server may have no authkey: a listener without one never sends a challenge)"
        raise HandshakeError(f"authentication with the {who} did not finish within {timeout:.3g}s{hint}") from None


def server_handshake(conn: Any, authkey: bytes | None, timeout: float | None) -> None:
    _handshake(conn, authkey, timeout, server=True)


def client_handshake(conn: Any, authkey: bytes | None, timeout: float | None) -> None:
    _handshake(conn, authkey, timeout, server=False)


# sun_path holds 108 bytes on Linux, the last one the terminating NUL
UNIX_PATH_MAX = 107


def check_unix_path(path: str) -> str:
    """``path`` if it fits in a Unix socket address, else a ValueError that says what to do."""
    n = len(os.fsencode(path))
    if n > UNIX_PATH_MAX:
        raise ValueError(
            f"Unix socket path {path!r} is {n} bytes; the limit is {UNIX_PATH_MAX}: "
            "point TMPDIR (or the server's directory) at a shorter path"
        )
    return path


def private_socket_path(prefix: str = "splitlearn-") -> tuple[str, str]:
    """A fresh private directory (mode 0700) and a Unix socket path inside it; a ValueError
    (and no directory) when the temp dir is too deep for a socket address."""
    d = tempfile.mkdtemp(prefix=prefix)
    path = os.path.join(d, "server.sock")
    try:
        check_unix_path(path)
    except ValueError:
        os.rmdir(d)
        raise
    os.chmod(d, 0o700)
    return d, path


def listen_unix(path: str, backlog: int = 128) -> socket.socket:
    check_unix_path(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        os.chmod(path, 0o600)
        s.listen(backlog)
    except BaseException:
        s.close()
        raise
    return s


def listen_tcp(host: str = "127.0.0.1", port: int = 0, backlog: int = 128) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(backlog)
    except BaseException:
        s.close()
        raise
    return s


def wrap(sock: socket.socket) -> Channel:
    """A :class:`Channel` that owns the socket's descriptor."""
    sock.setblocking(True)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Channel(sock.detach())


def connect(address: str | tuple[str, int], *, authkey: bytes | None, timeout: float | None = 10.0) -> Channel:
    """Connect to a Unix socket path or a (host, port), then authenticate, all within ``timeout``
    (finite seconds > 0, or None for no limit)."""
    timeout = check_timeout("timeout", timeout, none_ok=True)
    t0 = time.monotonic()
    if isinstance(address, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        s = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(address)
    except TimeoutError:
        s.close()
        raise ServerUnavailable(f"connecting to {address!r} timed out after {timeout}s") from None
    except OSError as exc:
        s.close()
        raise ServerUnavailable(f"cannot connect to {address!r}: {exc}") from None
    conn = wrap(s)
    try:
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - t0))
        client_handshake(conn, authkey, left)
    except BaseException:
        conn.close()
        raise
    return conn


def send_frame(conn: Channel, frame: wire.Frame, *, max_frame: int = wire.DEFAULT_MAX_FRAME) -> None:
    data = wire.encode(frame, max_frame=max_frame)
    try:
        conn.send_bytes(data)
    except (OSError, EOFError) as exc:
        raise ServerUnavailable(f"send failed: {type(exc).__name__}: {exc}") from None


def recv_frame(
    conn: Channel, *, timeout: float | None, max_frame: int = wire.DEFAULT_MAX_FRAME, as_numpy: bool = False
) -> wire.Frame:
    """The next frame, whole, within ``timeout``: ``TimeoutError`` when none started,
    :class:`FrameTimeout` when one started and did not finish (the connection is then out of
    step and must be closed); ``ServerUnavailable`` on EOF; :class:`UnreadFrame` (a ``WireError``)
    when it is larger than ``max_frame`` (close the connection then too); another ``WireError``
    when it was read whole but is malformed or cannot be decoded (``as_numpy`` and bfloat16, say):
    the connection is still in step."""
    deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
    try:
        data = conn.recv_buffer(max_frame, deadline)
    except FrameTimeout as exc:
        raise FrameTimeout(f"an answer started and did not finish within {timeout:.3g}s: {exc}") from None
    except TimeoutError:
        raise TimeoutError(f"no answer within {timeout:.3g}s") from None
    except EOFError:
        raise ServerUnavailable("connection closed by peer") from None
    except FrameTooLarge as exc:
        raise UnreadFrame(str(exc)) from None
    except OSError as exc:
        raise ServerUnavailable(f"receive failed: {type(exc).__name__}: {exc}") from None
    return wire.decode(data, as_numpy=as_numpy, max_frame=max_frame)
