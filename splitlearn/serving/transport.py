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

Only ``send_bytes``/``recv_bytes`` are used on these connections, never ``send``/``recv``
(which unpickle).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
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


def _shutdown_fd(fd: int) -> None:
    """Shut a socket down by descriptor: any thread blocked reading it wakes with EOF."""
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.close()


@contextlib.contextmanager
def deadline(conn: Connection, seconds: float | None) -> Iterator[dict[str, bool]]:
    """Bound every blocking read/write on ``conn`` inside the block: at the deadline the socket
    is shut down (the blocked call then fails) and ``state['expired']`` is set."""
    state = {"expired": False}
    if seconds is None:
        yield state
        return

    def fire() -> None:
        state["expired"] = True
        _shutdown_fd(conn.fileno())

    timer = threading.Timer(max(0.0, seconds), fire)
    timer.daemon = True
    timer.start()
    try:
        yield state
    finally:
        timer.cancel()


def _handshake(conn: Connection, authkey: bytes | None, timeout: float | None, server: bool) -> None:
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
    except TimeoutError:
        hint = "" if server else " (the server may have no authkey: a listener without one never sends a challenge)"
        raise HandshakeError(f"authentication with the {who} did not finish within {timeout:.3g}s{hint}") from None


def server_handshake(conn: Connection, authkey: bytes | None, timeout: float | None) -> None:
    _handshake(conn, authkey, timeout, server=True)


def client_handshake(conn: Connection, authkey: bytes | None, timeout: float | None) -> None:
    _handshake(conn, authkey, timeout, server=False)


def private_socket_path(prefix: str = "splitlearn-") -> tuple[str, str]:
    """A fresh private directory (mode 0700) and a Unix socket path inside it."""
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o700)
    return d, os.path.join(d, "server.sock")


def listen_unix(path: str, backlog: int = 128) -> socket.socket:
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


def set_send_timeout(sock_or_fd: Any, seconds: float) -> None:
    """SO_SNDTIMEO: a write to a peer that stopped reading fails instead of blocking forever."""
    import struct as _struct

    fd = sock_or_fd if isinstance(sock_or_fd, int) else sock_or_fd.fileno()
    s = socket.socket(fileno=os.dup(fd))
    try:
        sec = int(seconds)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _struct.pack("ll", sec, int((seconds - sec) * 1e6)))
    finally:
        s.close()


def wrap(sock: socket.socket) -> Connection:
    """A ``Connection`` that owns the socket's descriptor."""
    sock.setblocking(True)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Connection(sock.detach())


def connect(address: str | tuple[str, int], *, authkey: bytes | None, timeout: float | None = 10.0) -> Connection:
    """Connect to a Unix socket path or a (host, port), then authenticate, all within ``timeout``."""
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


def _readable(conn: Connection, timeout: float) -> bool:
    """``conn.poll(timeout)`` in one system call: data, EOF or an error waits on the descriptor
    (``Connection.poll`` builds and tears down a selector for every call, which costs more than
    the round trip it guards once the code has gone cold between requests)."""
    p = select.poll()
    p.register(conn.fileno(), select.POLLIN)
    return bool(p.poll(min(max(0.0, timeout) * 1e3, 2**31 - 1)))  # poll(2) takes an int of milliseconds


def send_frame(conn: Connection, frame: wire.Frame, *, max_frame: int = wire.DEFAULT_MAX_FRAME) -> None:
    data = wire.encode(frame, max_frame=max_frame)
    try:
        conn.send_bytes(data)
    except (OSError, EOFError) as exc:
        raise ServerUnavailable(f"send failed: {type(exc).__name__}: {exc}") from None


def recv_frame(
    conn: Connection, *, timeout: float | None, max_frame: int = wire.DEFAULT_MAX_FRAME, as_numpy: bool = False
) -> wire.Frame:
    """The next frame; ``TimeoutError`` when none starts within ``timeout``; ``ServerUnavailable``
    on EOF; ``WireError`` when it is malformed or larger than ``max_frame`` (the connection is
    then out of step and must be closed)."""
    try:
        ready = timeout is None or _readable(conn, timeout)
    except (EOFError, OSError) as exc:
        raise ServerUnavailable(f"receive failed: {type(exc).__name__}: {exc}") from None
    if not ready:
        raise TimeoutError(f"no answer within {timeout:.3g}s")
    try:
        data = conn.recv_bytes(max_frame)
    except EOFError:
        raise ServerUnavailable("connection closed by peer") from None
    except OSError as exc:
        if "bad message length" in str(exc):
            raise wire.WireError(f"incoming frame exceeds the maximum frame size of {max_frame} bytes") from None
        raise ServerUnavailable(f"receive failed: {type(exc).__name__}: {exc}") from None
    return wire.decode(data, as_numpy=as_numpy, max_frame=max_frame)
