"""InferenceServer: one model in its own process, many clients over a Unix socket, dynamic
batching.

The seed-002 fix done for real:

* the server process is started with **spawn** (``start_method="fork"`` exists only so the
  hazard can be reproduced); it imports the model class from an import string
  ``"module:Class"``, builds it from JSON kwargs and loads its weights from a
  **safetensors** file, so nothing is pickled between parent and server beyond the spawn
  bootstrap;
* the parent waits for a **ready** message with a start timeout; a child that dies or
  hangs while starting gives a clear :class:`ServerStartError` (and is killed and reaped);
* clients connect to a Unix socket in a private 0700 directory, authenticate with an
  authkey (HMAC challenge both ways, under a deadline), and exchange :mod:`wire` frames;
* requests are **batched dynamically**: the batch loop takes the first waiting request,
  then keeps collecting until it holds ``max_batch_size`` requests, or one request from
  every connected client, or ``max_wait_ms`` has passed since the first one arrived. A lone
  client therefore never waits, and N busy clients are served in batches of N;
* each answer goes back to the connection that asked, under the request's id;
* a bad request (wrong dtype or shape, malformed or oversized frame) gets an error frame on
  its own connection; the server keeps serving everyone else. So does an answer that cannot be
  sent: ``bad_output`` for a model output the wire cannot carry (not a tensor, sparse, on the
  meta device, or without the batch's rows when several requests share a forward),
  ``response_too_large`` past ``max_frame``. A batch whose model call fails (``model_error``,
  ``bad_output``) goes again one request at a time, so only the requests that fail alone get
  the error, not the others batched with them (stat ``batch_retries``);
* every request is counted once in the stats: ``requests == responses + errors +
  undeliverable`` (error answers to anything else count in ``frame_errors``);
* answers never block the batch loop: what a client's socket does not take at once waits in
  that connection's outbox, drained by a writer thread of its own; a client that stops
  reading is dropped once ``max_outbox`` bytes wait for it, or when it takes longer than
  ``send_timeout`` over one answer (or over the rest of a request it started to send);
* at most ``max_connections`` connections (open or authenticating) at once, of them at most
  ``max_handshakes`` authenticating (a :class:`HandshakeGate`). When the open connections
  alone fill the cap, one more is closed at accept, before it costs a thread. When
  connections still authenticating hold the places, new ones wait in the listen backlog, and
  the oldest handshake that has run ``handshake_grace`` seconds is cut for a newcomer: silent
  peers hold places for the grace, not the whole handshake timeout, and never the places of
  clients already in. A TCP peer that is not on loopback may hold at most
  ``max_handshakes_per_peer`` places (beyond, its oldest past the grace is cut, or else the
  new one refused), so one remote host cannot take them all;
* the server exits when asked (:meth:`stop`), and on its own when the parent goes away (EOF
  on the control pipe), so no server outlives its owner; in that case it also removes the
  owner's private directory (socket, weights file), which no one else would. It also stops
  when its listening socket itself becomes unusable (``accept`` fails with EBADF, ENOTSOCK or
  EINVAL outside a stop): a server that can never accept again exits, for its owner to see and
  restart, rather than look alive; other accept errors (EMFILE...) lose one connection only;
* a socket path longer than a Unix address holds (107 bytes; a deep ``TMPDIR``) is a clear
  ``ValueError`` from :meth:`start`, before any process is started.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import json
import math
import multiprocessing as mp
import os
import queue
import select
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from splitlearn.serving import transport, wire
from splitlearn.serving.transport import ServingError

# accept() errors that say the listening socket itself is gone, not one connection
_LISTENER_GONE = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EINVAL, errno.EOPNOTSUPP})


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool((mapped or ip).is_loopback)


@dataclass
class _Pending:
    t0: float
    peer: str | None
    fd: int


class HandshakeGate:
    """Places for connections that are still authenticating.

    At most ``total`` at once, and never more than ``room()`` (the server passes the places
    its connection cap leaves: ``max_connections`` less the connections already in).
    :meth:`wait_for_room` (the accept loop, before ``accept``) returns when a place is free.
    While none is, new connections wait in the kernel's listen backlog, where they cost the
    server nothing; once the oldest handshake has run ``grace`` seconds *and* a new connection
    is waiting, the newcomer is accepted and :meth:`enter` cuts that handshake (its socket is
    shut down, so its blocked read fails at once) to give the newcomer its place. A slow
    handshake nobody waits behind is left to its timeout. ``grace=None`` never cuts.

    :meth:`enter` takes a place for an accepted connection, under its peer: ``None`` for a
    Unix socket, the host for TCP. A TCP peer not on loopback holds at most ``per_peer``
    places: one more cuts that peer's oldest handshake if it is past the grace (and nobody
    else's), and is refused otherwise. Loopback peers all share one address, so for them the
    total is the only limit.
    (OpenSSH bounds unauthenticated connections the same two ways, ``MaxStartups`` and
    ``PerSourceMaxStartups``; it drops new ones at random where this cuts old ones.)

    :meth:`leave` gives the place back and tells whether the handshake was cut meanwhile; its
    ``admit`` callback registers a connection that got in, atomically with giving the place
    back, so the connection cap never counts it twice or not at all. The gate shuts a
    descriptor down only while its connection holds a place, and the handshake thread closes
    it only after :meth:`leave`, so a cut never reaches a reused descriptor.
    """

    def __init__(
        self,
        total: int,
        per_peer: int | None = None,
        grace: float | None = 1.0,
        *,
        room: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.validate(total, per_peer, grace)
        self.total, self.per_peer, self.grace = int(total), per_peer, grace
        self.room = room
        self.clock = clock
        self.cond = threading.Condition(threading.Lock())
        self.pending: dict[int, _Pending] = {}
        self.next_token = 0
        self.cut = 0  # handshakes cut so far
        self.closed = False
        # wakes wait_for_room out of its poll of the listening socket (a place came free, close)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._polling = False
        self._finalizer = weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)

    @staticmethod
    def validate(total: int, per_peer: int | None, grace: float | None) -> None:
        """ValueError unless the settings make a gate (checked without building one)."""
        if total < 1:
            raise ValueError("max_handshakes must be >= 1")
        if per_peer is not None and per_peer < 1:
            raise ValueError("max_handshakes_per_peer must be >= 1 (or None)")
        if grace is not None and not 0 <= grace < math.inf:  # NaN fails too
            raise ValueError(f"handshake_grace must be finite and >= 0 (or None), got {grace!r}")

    def _places(self) -> int:  # under self.cond
        return self.total if self.room is None else min(self.total, self.room())

    def _cut(self, token: int) -> None:  # under self.cond
        p = self.pending.pop(token)
        self.cut += 1
        transport.shutdown_fd(p.fd)

    def _oldest(self, peer: Any = ...) -> tuple[int, float] | None:  # under self.cond
        best = None
        for tok, p in self.pending.items():
            if peer is not ... and p.peer != peer:
                continue
            if best is None or p.t0 < best[1]:
                best = (tok, p.t0)
        return best

    def _wake(self) -> None:  # under self.cond
        self.cond.notify_all()
        if self._polling:
            try:
                os.write(self._wake_w, b"x")
            except (BlockingIOError, OSError):
                pass  # a byte is there already

    def wait_for_room(self, lsock: socket.socket | None = None) -> bool:
        """Block until a place is free, or until every place is taken, the oldest handshake
        has run past the grace and a new connection waits on ``lsock`` (with no ``lsock``, one
        is taken to be waiting): then :meth:`enter` may cut a handshake for it (or refuse it,
        see there). ``False`` once the gate is closed. Returns at once when no handshake holds
        a place: the connections already in fill the cap, there is nothing to cut, and
        :meth:`enter` refuses the next one. Any other event on ``lsock`` (an error, a closed
        descriptor) also returns, so that ``accept`` meets it."""
        poller = None
        with self.cond:
            while not self.closed:
                oldest = self._oldest()
                if oldest is None or len(self.pending) < self._places():
                    return True
                if self.grace is None:
                    self.cond.wait()
                    continue
                age = self.clock() - oldest[1]
                if age < self.grace:
                    self.cond.wait(self.grace - age)
                    continue
                if lsock is None:
                    return True
                if poller is None:
                    lfd = lsock.fileno()  # kept: a closed socket's fileno() is -1
                    poller = select.poll()
                    poller.register(lfd, select.POLLIN)
                    poller.register(self._wake_r, select.POLLIN)
                # past the grace: a handshake is cut for a newcomer, not before one comes
                self._polling = True
                self.cond.release()
                try:
                    events = poller.poll()
                except OSError:  # EINTR is retried by Python; anything else: let accept see it
                    events = [(lfd, select.POLLERR)]
                finally:
                    self.cond.acquire()
                    self._polling = False
                try:
                    while os.read(self._wake_r, 64):
                        pass
                except (BlockingIOError, OSError):
                    pass
                mine = [ev for fd, ev in events if fd == lfd]
                if mine and not self.closed and any(ev & ~select.POLLIN for ev in mine):
                    return True  # POLLNVAL, POLLERR...: for accept to meet
                if mine and not self.closed:
                    # a newcomer; the loop checks again that a place or a cut is still there
                    # (a handshake let in meanwhile may have left the gate full of young ones)
                    oldest = self._oldest()
                    if oldest is None or len(self.pending) < self._places() or self.clock() - oldest[1] >= self.grace:
                        return True
            return False

    def enter(self, peer: str | None, fd: int, wait: bool = False) -> tuple[int | None, str]:
        """Take a place for an accepted connection: ``(token, "")``, or ``(None, why)`` to
        refuse it. Where the place must come from a handshake past the grace, that one is cut:
        the peer's own oldest when the peer is at its limit (then nobody else's), else the
        oldest of all. A peer at its limit whose handshakes are all younger than the grace is
        refused, and so is any connection when the connections already in fill the cap. When
        every place is held by a handshake younger than the grace (one was let in between
        :meth:`wait_for_room` and ``accept``, and the cap took its place), ``wait=True`` (the
        accept loop) waits for a place or the grace; ``wait=False`` refuses."""
        with self.cond:
            if peer is not None and self.per_peer is not None and not _is_loopback(peer):
                mine = self._oldest(peer)
                if mine is not None and sum(1 for p in self.pending.values() if p.peer == peer) >= self.per_peer:
                    if self.grace is None or self.clock() - mine[1] < self.grace:
                        return None, f"{peer} already has {self.per_peer} connections authenticating (max_handshakes_per_peer)"
                    self._cut(mine[0])
            while len(self.pending) >= self._places():
                oldest = self._oldest()
                if oldest is None:
                    return None, "no place left: the connections already in fill max_connections"
                age = self.clock() - oldest[1]
                if self.grace is not None and age >= self.grace:
                    self._cut(oldest[0])
                    continue
                if not wait or self.closed:
                    return None, "no place left: every place to authenticate is held by a handshake younger than handshake_grace"
                self.cond.wait(None if self.grace is None else self.grace - age)
            self.next_token += 1
            self.pending[self.next_token] = _Pending(self.clock(), peer, fd)
            return self.next_token, ""

    def leave(self, token: int, admit: Callable[[], None] | None = None) -> bool:
        """Give the place back; ``True`` if the handshake had been cut. ``admit`` (the
        connection got in) runs under the gate's lock, only if it was not cut."""
        with self.cond:
            cut = self.pending.pop(token, None) is None
            if not cut and admit is not None:
                admit()
            self._wake()
            return cut

    def notify(self) -> None:
        """Something :meth:`room` counts has changed (a connection closed)."""
        with self.cond:
            self._wake()

    def waiting(self) -> int:
        with self.cond:
            return len(self.pending)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self._wake()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class ServerStartError(ServingError):
    """The server process died, failed, or did not report ready in time while starting."""


def import_string(obj: Any) -> str:
    """'module:Qualname' for a class or function (must be importable by that name)."""
    if isinstance(obj, str):
        if ":" not in obj:
            raise ValueError(f"import string {obj!r} must look like 'package.module:Name'")
        return obj
    name = f"{obj.__module__}:{obj.__qualname__}"
    if obj.__module__ == "__main__" or "<locals>" in obj.__qualname__:
        raise ValueError(f"{name} cannot be imported by a spawned server: define it in an importable module")
    return name


def resolve(spec: str) -> Any:
    import importlib

    module, _, qual = spec.partition(":")
    obj = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def build_model(spec: str, kwargs: Mapping[str, Any] | None, weights: str | None, device: str = "cpu") -> Any:
    """Import ``spec``, call it with ``kwargs``, load ``weights`` (safetensors), move to device, eval."""
    import torch

    model = resolve(spec)(**dict(kwargs or {}))
    if weights:
        from safetensors.torch import load_file

        state = load_file(weights, device="cpu")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights {weights} do not fit {spec}: missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
    model = model.to(torch.device(device))
    model.eval()
    return model


def save_state_dict(state_dict: Mapping[str, Any], path: str) -> str:
    """Write a state dict as safetensors (tied tensors are stored once each, as copies)."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    out = {}
    for k, v in state_dict.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()  # safetensors refuses shared storage
        seen.add(ptr)
        out[k] = t
    save_file(out, path)
    return path


# ----------------------------------------------------------------------------------------------
# parent side


def _remove_private_dir(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # never in a forked child that inherited the finalizer
        shutil.rmtree(path, ignore_errors=True)


class ManagedServer:
    """Parent side of a server process: private directory, start (spawn by default) with a
    ready message and a start timeout, stop, kill, restart. Subclasses give ``kind`` and
    ``_config()``; the child runs :func:`server_main`.

    Timeouts are seconds, finite and > 0 (``handshake_timeout``, ``send_timeout``,
    ``start_timeout``); ``handshake_grace`` may be 0. ``None`` means no limit where it is allowed
    (``start_timeout``, ``handshake_grace``); infinity and NaN are refused with ValueError when
    the server is built, as are the same in ``max_wait_ms`` of :class:`InferenceServer` (which
    may be 0)."""

    kind = ""

    def __init__(
        self,
        *,
        start_method: str = "spawn",
        start_timeout: float | None = 120.0,
        authkey: bytes | None = None,
        max_frame: int = wire.DEFAULT_MAX_FRAME,
        handshake_timeout: float = 10.0,
        send_timeout: float = 10.0,
        max_connections: int = 256,
        max_handshakes: int | None = None,
        max_handshakes_per_peer: int | None = 8,
        handshake_grace: float | None = 1.0,
        max_outbox: int | None = None,
        num_threads: int | None = None,
    ) -> None:
        self.start_method = start_method
        # timeouts are finite seconds > 0 (inf and NaN refused: see transport.check_timeout);
        # start_timeout and handshake_grace may be None, for no limit
        self.start_timeout = transport.check_timeout("start_timeout", start_timeout, none_ok=True)
        self.authkey = authkey if authkey is not None else os.urandom(32)
        if not isinstance(self.authkey, bytes) or not self.authkey:
            raise ValueError("authkey must be non-empty bytes")
        self.max_frame = int(max_frame)
        self.handshake_timeout = transport.check_timeout("handshake_timeout", handshake_timeout)
        self.send_timeout = transport.check_timeout("send_timeout", send_timeout)
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.max_connections = int(max_connections)
        # at most 64 authenticating at once by default, never more than max_connections
        self.max_handshakes = min(int(max_handshakes), self.max_connections) if max_handshakes is not None else min(64, self.max_connections)
        self.max_handshakes_per_peer = None if max_handshakes_per_peer is None else int(max_handshakes_per_peer)
        self.handshake_grace = transport.check_timeout("handshake_grace", handshake_grace, none_ok=True, zero_ok=True)
        HandshakeGate.validate(self.max_handshakes, self.max_handshakes_per_peer, self.handshake_grace)
        self.max_outbox = int(max_outbox) if max_outbox is not None else self.max_frame
        self.num_threads = num_threads
        self._dir: str | None = None
        self._dir_finalizer: weakref.finalize | None = None
        self.address: Any = None
        self._proc: Any = None
        self._ctl: Connection | None = None
        self.info: dict[str, Any] = {}
        self.final_stats: dict[str, Any] | None = None
        self.last_exitcode: int | None = None  # of the last server process, once reaped

    def _config(self) -> dict[str, Any]:
        return {
            "authkey": self.authkey.hex(),
            "max_frame": self.max_frame,
            "handshake_timeout": self.handshake_timeout,
            "send_timeout": self.send_timeout,
            "max_connections": self.max_connections,
            "max_handshakes": self.max_handshakes,
            "max_handshakes_per_peer": self.max_handshakes_per_peer,
            "handshake_grace": self.handshake_grace,
            "max_outbox": self.max_outbox,
            "num_threads": self.num_threads,
            # the owner's private directory: a server whose owner died removes it on its way out
            "private_dir": self._dir,
        }

    def _own_dir(self, path: str) -> None:
        """Take ``path`` as this server's private directory: removed by :meth:`close`, or,
        without ``close()``, when this object is collected or the interpreter exits."""
        self._dir = path
        self._dir_finalizer = weakref.finalize(self, _remove_private_dir, path, os.getpid())

    def _prepare(self) -> None:
        """Before each start, in the parent (create files the child needs)."""
        if self._dir is None:
            self._own_dir(tempfile.mkdtemp(prefix=f"splitlearn-{self.kind}-"))
            os.chmod(self._dir, 0o700)

    def _on_ready(self, msg: dict[str, Any]) -> None:
        pass

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Any:
        """Start the server process; return its address once it reported ready."""
        if self.alive:
            raise RuntimeError("server already running")
        self._prepare()
        ctx = mp.get_context(self.start_method)
        parent_end, child_end = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=server_main, args=(self.kind, json.dumps(self._config()), child_end), name=f"{type(self).__name__}", daemon=True)
        t0 = time.monotonic()
        proc.start()
        child_end.close()
        self._proc, self._ctl = proc, parent_end
        try:
            msg = self._wait_ready(t0)
        except BaseException:
            self._kill()
            raise
        self.info = msg
        self.info["start_seconds"] = round(time.monotonic() - t0, 4)
        self._on_ready(msg)
        return self.address

    def _wait_ready(self, t0: float) -> dict[str, Any]:
        assert self._ctl is not None and self._proc is not None
        while True:
            left = None if self.start_timeout is None else self.start_timeout - (time.monotonic() - t0)
            if left is not None and left <= 0:
                raise ServerStartError(
                    f"{type(self).__name__} (pid {self._proc.pid}, {self.start_method}) not ready within {self.start_timeout}s; killed. "
                    "A child forked after the parent used torch's thread pool hangs in its first parallel op: use spawn."
                )
            ready = wait([self._ctl, self._proc.sentinel], left)
            if self._ctl in ready:
                try:
                    msg = json.loads(self._ctl.recv_bytes(1 << 20))
                except EOFError:
                    msg = None
                if msg is None:
                    self._proc.join(5)
                    raise ServerStartError(f"{type(self).__name__} (pid {self._proc.pid}) exited while starting, exit code {self._proc.exitcode}")
                if "error" in msg:
                    raise ServerStartError(f"{type(self).__name__} failed to start: {msg['error']}\n{msg.get('traceback', '')}")
                return msg
            if self._proc.sentinel in ready:
                self._proc.join(5)
                raise ServerStartError(f"{type(self).__name__} (pid {self._proc.pid}) died while starting, exit code {self._proc.exitcode}")

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """Ask the server to finish, wait up to ``timeout``, then terminate/kill. Idempotent."""
        proc, ctl = self._proc, self._ctl
        if proc is None:
            return self.final_stats
        try:
            if proc.is_alive() and ctl is not None:
                try:
                    ctl.send_bytes(b'{"cmd":"stop"}')
                    if ctl.poll(timeout):
                        msg = json.loads(ctl.recv_bytes(1 << 20))
                        self.final_stats = msg.get("stats")
                except (OSError, EOFError, ValueError):
                    pass
            proc.join(timeout)
        finally:
            self._kill()
        return self.final_stats

    def _kill(self) -> None:
        proc, ctl = self._proc, self._ctl
        if proc is not None:
            if proc.is_alive():
                proc.terminate()
                proc.join(3)
            if proc.is_alive():
                proc.kill()
                proc.join(3)
            self.last_exitcode = proc.exitcode
            try:
                proc.close()
            except ValueError:
                pass
        if ctl is not None:
            ctl.close()
        self._proc = self._ctl = None

    def restart(self) -> Any:
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its private directory."""
        self.stop()
        if self._dir_finalizer is not None:
            self._dir_finalizer()  # removes the directory, once
            self._dir_finalizer = None
        self._dir = None

    def __enter__(self):
        if not self.alive:
            try:
                self.start()
            except BaseException:
                self.close()  # __exit__ will not run: leave nothing behind
                raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # last resort: never leave a server behind
        try:
            if self._proc is not None:
                self._kill()
        except Exception:
            pass


class InferenceServer(ManagedServer):
    """One model, dynamic batching, Unix socket. ``start()`` returns the socket path."""

    kind = "inference"

    def __init__(
        self,
        model: Any,
        model_kwargs: Mapping[str, Any] | None = None,
        *,
        weights: str | os.PathLike | None = None,
        state_dict: Mapping[str, Any] | None = None,
        device: str = "cpu",
        max_batch_size: int = 8,
        max_wait_ms: float = 5.0,
        input_shape: tuple[int, ...] | None = None,
        input_dtype: str | None = None,
        warmup: bool = True,
        max_pending: int = 64,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.max_pending = int(max_pending)
        if weights is not None and state_dict is not None:
            raise ValueError("give weights (a safetensors file) or state_dict, not both")
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.model = import_string(model)
        self.model_kwargs = dict(model_kwargs or {})
        json.dumps(self.model_kwargs)  # must be JSON: it is the only way kwargs travel
        self._state_dict = state_dict
        self.weights = os.fspath(weights) if weights is not None else None
        self.device = device
        self.max_batch_size = int(max_batch_size)
        self.max_wait_ms = transport.check_timeout("max_wait_ms", max_wait_ms, zero_ok=True)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.input_dtype = input_dtype
        self.warmup = warmup

    def _prepare(self) -> None:
        if self._dir is None:
            # a path too long for a socket fails here, not as a start error from the child
            d, self.address = transport.private_socket_path(prefix=f"splitlearn-{self.kind}-")
            self._own_dir(d)
        if self._state_dict is not None and self.weights is None:
            self.weights = save_state_dict(self._state_dict, os.path.join(self._dir, "weights.safetensors"))
            self._state_dict = None

    def _config(self) -> dict[str, Any]:
        cfg = super()._config()
        cfg.update(
            model=self.model,
            model_kwargs=self.model_kwargs,
            weights=self.weights,
            device=self.device,
            max_batch_size=self.max_batch_size,
            max_wait_ms=self.max_wait_ms,
            input_shape=list(self.input_shape) if self.input_shape is not None else None,
            input_dtype=self.input_dtype,
            address=self.address,
            warmup=self.warmup,
            max_pending=self.max_pending,
        )
        return cfg

    def client(self, **kw: Any):
        from splitlearn.serving.client import InferenceClient

        if self.address is None:
            raise RuntimeError("server not started")
        kw.setdefault("max_frame", self.max_frame)
        return InferenceClient(self.address, authkey=self.authkey, **kw)

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        with self.client(timeout=timeout) as c:
            return c.stats()


# ----------------------------------------------------------------------------------------------
# server process


@dataclass
class _Conn:
    conn: transport.Channel
    cid: int
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    alive: bool = True
    pending: int = 0  # requests queued or in a batch (inference server)
    sock: socket.socket | None = None  # the connection's descriptor, borrowed, for non-blocking sends
    outbox: collections.deque = field(default_factory=collections.deque)  # answers its reader has not taken yet
    outbox_bytes: int = 0
    writer: threading.Thread | None = None  # drains the outbox while it is not empty


@dataclass
class _Req:
    client: _Conn
    rid: int
    x: Any
    t_in: float


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.responses = 0
        self.errors = 0  # error answers to requests: requests == responses + errors + undeliverable
        self.frame_errors = 0  # error answers to anything else (a bad frame, a refused session...)
        self.batches = 0
        self.batched_requests = 0
        self.batched_samples = 0
        self.max_batch = 0
        self.queue_wait_total = 0.0
        self.queue_wait_max = 0.0
        self.forward_total = 0.0  # per batch: the model and the answers (batch_ms)
        self.model_total = 0.0  # per batch: the model call alone (cat, forward, split)
        self.connections_total = 0
        self.auth_failures = 0
        self.bad_frames = 0
        self.undeliverable = 0
        self.batch_retries = 0  # batches that failed and went again one request at a time
        self.slow_clients_dropped = 0
        self.connections_refused = 0
        self.accept_errors = 0
        self.hist: dict[int, int] = {}

    def snapshot(self, open_conns: int, queued: int, gate: HandshakeGate | None = None) -> dict[str, Any]:
        cut, pending = (gate.cut, gate.waiting()) if gate is not None else (0, 0)
        with self.lock:
            b = max(self.batches, 1)
            return {
                "requests": self.requests,
                "responses": self.responses,
                "errors": self.errors,
                "frame_errors": self.frame_errors,
                "batches": self.batches,
                "batched_requests": self.batched_requests,
                "mean_batch": self.batched_requests / b if self.batches else 0.0,
                "mean_batch_samples": self.batched_samples / b if self.batches else 0.0,
                "max_batch": self.max_batch,
                "batch_hist": {str(k): v for k, v in sorted(self.hist.items())},
                "queue_wait_ms_mean": 1e3 * self.queue_wait_total / max(self.batched_requests, 1),
                "queue_wait_ms_max": 1e3 * self.queue_wait_max,
                "forward_ms_mean": 1e3 * self.forward_total / b if self.batches else 0.0,
                "model_ms_mean": 1e3 * self.model_total / b if self.batches else 0.0,
                "connections_open": open_conns,
                "connections_total": self.connections_total,
                "auth_failures": self.auth_failures,
                "bad_frames": self.bad_frames,
                "undeliverable": self.undeliverable,
                "batch_retries": self.batch_retries,
                "slow_clients_dropped": self.slow_clients_dropped,
                "connections_refused": self.connections_refused,
                "handshakes_cut": cut,
                "handshakes_pending": pending,
                "accept_errors": self.accept_errors,
                "queued": queued,
                "pid": os.getpid(),
            }


class ConnServer:
    """Child side shared by the servers: accept, authenticate each connection in its own
    thread under a deadline, read frames, answer errors to the offending connection only,
    stop on request or when the parent goes away. Subclasses implement :meth:`on_frame`,
    :meth:`load`, :meth:`listen`, :meth:`main_loop` and :meth:`ready_info`."""

    name = "server"
    request_types: frozenset[wire.MsgType] = frozenset()  # the frames the ``requests`` stat counts

    def __init__(self, cfg: dict[str, Any], ctl: Connection) -> None:
        self.cfg = cfg
        self.ctl = ctl
        self.authkey = bytes.fromhex(cfg["authkey"])
        self.max_frame = int(cfg["max_frame"])
        self.stats = _Stats()
        self.conns: dict[int, _Conn] = {}
        self.conns_lock = threading.Lock()
        self.stopping = threading.Event()
        self.owner_gone = False  # the control pipe hit EOF: the owning process is gone
        self.next_cid = 0
        self.max_connections = int(cfg.get("max_connections") or 256)
        # connections authenticating: the gate's places, within what max_connections leaves
        self.gate = HandshakeGate(
            int(cfg.get("max_handshakes") or min(64, self.max_connections)),
            cfg.get("max_handshakes_per_peer"),
            cfg.get("handshake_grace"),
            room=lambda: self.max_connections - self.open_conns(),
        )
        self.said_cut = False
        self.said_lost = False
        self.max_outbox = int(cfg.get("max_outbox") or self.max_frame)
        self.lsock: socket.socket | None = None

    # -- hooks ---------------------------------------------------------------------------------
    def load(self) -> None:
        import torch

        if self.cfg.get("num_threads"):
            torch.set_num_threads(int(self.cfg["num_threads"]))
        self.torch = torch

    def listen(self) -> None:
        raise NotImplementedError

    def ready_info(self) -> dict[str, Any]:
        torch = self.torch
        return {
            "ready": True,
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
            "cuda_initialized": bool(torch.cuda.is_initialized()),
        }

    def on_frame(self, c: _Conn, f: wire.Frame) -> None:
        self.reply_error(c, f.request_id, "bad_type", f"{f.type.name} is not a request this server takes", request=False)

    def on_disconnect(self, c: _Conn) -> None:
        pass

    def main_loop(self) -> None:
        self.stopping.wait()

    def snapshot(self) -> dict[str, Any]:
        return self.stats.snapshot(self.open_conns(), 0, self.gate)

    # -- connections ---------------------------------------------------------------------------
    def accept_loop(self) -> None:
        assert self.lsock is not None
        last_error = None
        while not self.stopping.is_set():
            # a place to authenticate in first: while every place is taken, new connections wait
            # in the listen backlog (the oldest handshake past the grace is cut to make room)
            if not self.gate.wait_for_room(self.lsock):
                break
            try:
                s, addr = self.lsock.accept()
            except OSError as exc:
                if self.stopping.is_set():
                    break  # begin_stop closed the listening socket
                with self.stats.lock:
                    self.stats.accept_errors += 1
                if exc.errno in _LISTENER_GONE:
                    # the listening socket itself is unusable (closed under us, no longer
                    # listening): no retry can clear that, and a server that never accepts again
                    # must not look alive. Stop, so that the owner sees it exit and restarts it.
                    print(f"[{self.name}] listening socket unusable ({exc}); stopping", file=sys.stderr, flush=True)
                    self.begin_stop()
                    break
                # EMFILE, ENFILE, ENOBUFS, ECONNABORTED...: this connection is lost, the server is
                # not. Said once per kind of error; a short pause, since an accept that failed for
                # want of descriptors fails again at once while the connection waits in the backlog
                if exc.errno != last_error:
                    last_error = exc.errno
                    print(f"[{self.name}] accept failed ({exc}); still listening", file=sys.stderr, flush=True)
                self.stopping.wait(0.05)
                continue
            peer = addr[0] if isinstance(addr, tuple) else None
            token, why = self.gate.enter(peer, s.fileno(), wait=True)
            if token is None:
                # refused before it costs a thread: the client's handshake fails at once
                self._refuse(s, why)
                continue
            try:
                threading.Thread(target=self.handle, args=(s, token), daemon=True, name="conn").start()
            except RuntimeError as exc:  # no thread to be had: refuse this one, give its place back
                self.gate.leave(token)
                self._refuse(s, str(exc))

    def _refuse(self, s: socket.socket, why: str) -> None:
        with self.stats.lock:
            self.stats.connections_refused += 1
        print(f"[{self.name}] refused a connection: {why}", file=sys.stderr, flush=True)
        s.close()

    def handle(self, s: socket.socket, token: int) -> None:
        conn: transport.Channel | None = None
        c: _Conn | None = None
        cut = False
        failure: BaseException | None = None
        t0 = time.monotonic()
        try:
            conn = transport.wrap(s)  # the same descriptor the gate knows (wrap detaches it)
        except OSError as exc:  # the peer went away before a byte was read (setsockopt failed)
            self.gate.leave(token)  # the place goes back before the descriptor is closed
            s.close()
            with self.stats.lock:  # counted with the accepts that failed; said once
                self.stats.accept_errors += 1
                said, self.said_lost = self.said_lost, True
            if not said:
                print(f"[{self.name}] lost a connection before its handshake: {exc}", file=sys.stderr, flush=True)
            return
        try:
            try:
                transport.server_handshake(conn, self.authkey, self.cfg["handshake_timeout"])
            except Exception as exc:  # noqa: BLE001 - sorted below, once the place is given back
                failure = exc
            if failure is None:
                c = _Conn(conn, 0, sock=socket.socket(fileno=conn.fileno()))

                def admit() -> None:  # under the gate's lock: in as the place goes back
                    with self.conns_lock:
                        self.next_cid += 1
                        c.cid = self.next_cid
                        self.conns[c.cid] = c

                cut = self.gate.leave(token, admit=admit)
            else:
                cut = self.gate.leave(token)
        except BaseException:
            # the place goes back before the descriptor is closed: the gate shuts down only
            # descriptors of connections that hold a place
            self.gate.leave(token)
            if c is not None and c.sock is not None:
                c.sock.detach()
            if conn is not None:
                conn.close()
            else:
                s.close()
            raise
        if cut or failure is not None:
            assert conn is not None
            if c is not None and c.sock is not None:
                c.sock.detach()  # cut just as its handshake finished: never served
            conn.close()
            if cut:
                if not self.said_cut:  # said once; the stats count them
                    self.said_cut = True
                    print(
                        f"[{self.name}] cut a connection still authenticating after {time.monotonic() - t0:.2f}s: "
                        "every place to authenticate was taken and another connection waited "
                        "(max_handshakes, max_connections; handshake_grace)",
                        file=sys.stderr,
                        flush=True,
                    )
            elif isinstance(failure, transport.HandshakeError):
                with self.stats.lock:
                    self.stats.auth_failures += 1
                print(f"[{self.name}] rejected a connection: {failure}", file=sys.stderr, flush=True)
            else:
                raise failure  # type: ignore[misc]
            return
        assert c is not None and conn is not None
        with self.stats.lock:
            self.stats.connections_total += 1
        try:
            self.serve_conn(c)
        finally:
            c.alive = False
            with self.conns_lock:
                self.conns.pop(c.cid, None)
            self.gate.notify()  # a place under max_connections may have come free
            try:
                self.on_disconnect(c)
            finally:
                writer = c.writer
                if writer is not None and writer is not threading.current_thread():
                    # its descriptor must not be closed (and reused by a new connection) while
                    # the writer may still write to it: wake it (EPIPE) and wait for it
                    if not conn.closed:
                        transport.shutdown_fd(conn.fileno())
                    writer.join(self.cfg["send_timeout"] + 5)
                with c.send_lock:  # no send uses the descriptor past this point
                    if c.sock is not None:
                        c.sock.detach()  # borrowed: the Channel owns and closes the descriptor
                        c.sock = None
                    try:
                        conn.close()
                    except OSError:
                        pass

    def encode_answer(self, frame: wire.Frame) -> tuple[bytes | None, str | None]:
        """The bytes of ``frame``, and ``None``; or, when it cannot be encoded, the bytes of an
        error answer under its request id, and that error's code: ``response_too_large`` (over
        ``max_frame``), ``bad_output`` (what the wire cannot carry: not a tensor, a dtype, a
        sparse or meta tensor), ``internal_error`` (anything else). Never raises; the bytes are
        ``None`` only when not even the error answer fits in ``max_frame``."""
        try:
            return wire.encode(frame, max_frame=self.max_frame), None
        except wire.OversizedFrame as exc:
            code, message = "response_too_large", str(exc)
        except wire.WireError as exc:
            code, message = "bad_output", f"the answer cannot be sent: {exc}"
        except Exception as exc:  # noqa: BLE001 - one answer must not end the thread that sends it
            code, message = "internal_error", f"encoding the answer failed: {type(exc).__name__}: {exc}"
        try:
            return wire.encode(wire.error_frame(frame.request_id, code, message), max_frame=self.max_frame), code
        except wire.WireError:
            return None, code

    def send(self, c: _Conn, frame: wire.Frame) -> bool:
        """Send a frame to ``c`` without ever blocking the caller (the batch loop serves every
        client; one that stops reading must not stall it). What the socket does not take at
        once waits in the connection's outbox, drained by a writer thread of its own under
        ``send_timeout``; a client whose outbox would pass ``max_outbox`` bytes is dropped.
        A frame that cannot be encoded goes as an error answer instead (see
        :meth:`encode_answer`). True when the frame (or that error) was sent or queued. Never
        raises."""
        return self._send_encoded(c, self.encode_answer(frame)[0])

    def answer(self, c: _Conn, frame: wire.Frame) -> bool:
        """:meth:`send` the answer to a request, and count how it ended: ``responses`` (sent or
        queued), ``errors`` (it could not be encoded: the caller got an error answer instead) or
        ``undeliverable`` (the connection is gone)."""
        data, failed = self.encode_answer(frame)
        # counted before it goes: a caller that has its answer and asks for the stats sees it
        with self.stats.lock:
            if failed is not None:
                self.stats.errors += 1
            else:
                self.stats.responses += 1
        ok = self._send_encoded(c, data)
        if not ok and failed is None:
            with self.stats.lock:
                self.stats.responses -= 1
                self.stats.undeliverable += 1
        return ok and failed is None

    def _send_encoded(self, c: _Conn, data: bytes | None) -> bool:
        if not c.alive:
            return False
        if data is None:  # not even an error answer fits in max_frame: the caller cannot be told
            with c.send_lock:  # the reader closes the descriptor under this lock: never shut a reused one
                self._lost(c)
            return False
        msg = transport.frame_header(len(data)) + data  # the Channel framing, in one buffer
        with c.send_lock:
            if not c.alive or c.sock is None:
                return False
            rest: Any = msg
            if c.writer is None:  # nothing queued before it: try now, without blocking
                try:
                    sent = c.sock.send(msg, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    self._lost(c)
                    return False
                if sent == len(msg):
                    return True
                rest = memoryview(msg)[sent:]
            if c.outbox_bytes + len(rest) > self.max_outbox:
                with self.stats.lock:
                    self.stats.slow_clients_dropped += 1
                print(
                    f"[{self.name}] dropped connection {c.cid}: it stopped reading, {c.outbox_bytes} bytes of answers waiting",
                    file=sys.stderr,
                    flush=True,
                )
                self._lost(c)
                return False
            c.outbox.append(rest)
            c.outbox_bytes += len(rest)
            if c.writer is None:
                writer = threading.Thread(target=self._drain, args=(c,), daemon=True, name=f"writer-{c.cid}")
                try:
                    writer.start()
                except RuntimeError as exc:  # no thread to be had: this client's answers cannot go
                    c.outbox.clear()
                    c.outbox_bytes = 0
                    print(f"[{self.name}] dropped connection {c.cid}: no writer thread for its answers ({exc})", file=sys.stderr, flush=True)
                    self._lost(c)
                    return False
                c.writer = writer
        return True

    def _drain(self, c: _Conn) -> None:
        """Writer thread of a connection whose reader fell behind: send its outbox in order,
        each answer within ``send_timeout`` (a client too slow to take one in that time is
        dropped); exit when the outbox is empty."""
        while True:
            with c.send_lock:
                if not c.outbox or not c.alive or c.sock is None:
                    c.writer = None
                    c.outbox.clear()
                    c.outbox_bytes = 0
                    return
                buf = c.outbox.popleft()
                c.outbox_bytes -= len(buf)
                sock = c.sock
            try:
                transport.send_until(sock, [buf], time.monotonic() + self.cfg["send_timeout"])
            except OSError:  # TimeoutError included
                with c.send_lock:
                    self._lost(c)

    def _lost(self, c: _Conn) -> None:
        """Mark ``c`` dead and wake its reader (with EOF), which then drops it. Call it holding
        ``c.send_lock``: the reader closes the descriptor under that lock, and a descriptor
        closed meanwhile may already number another client's connection."""
        c.alive = False
        if not c.conn.closed:
            transport.shutdown_fd(c.conn.fileno())

    def reply_error(self, c: _Conn, rid: int, code: str, message: str, *, request: bool = True) -> None:
        """Send an error answer; counted in ``errors`` when it answers a request (one the
        ``requests`` count has), else in ``frame_errors``."""
        with self.stats.lock:
            if request:
                self.stats.errors += 1
            else:
                self.stats.frame_errors += 1
        self.send(c, wire.error_frame(rid, code, message))

    def serve_conn(self, c: _Conn) -> None:
        while not self.stopping.is_set():
            try:
                # idle for as long as it likes between requests, but not half-way through one
                data = c.conn.recv_buffer(self.max_frame, rest_within=self.cfg["send_timeout"])
            except EOFError:
                return
            except transport.FrameTimeout:
                with self.stats.lock:
                    self.stats.slow_clients_dropped += 1
                print(f"[{self.name}] dropped connection {c.cid}: a request stopped half-way", file=sys.stderr, flush=True)
                self.reply_error(c, 0, "frame_timeout", f"a request took more than {self.cfg['send_timeout']:g}s to arrive; closing", request=False)
                return
            except transport.FrameTooLarge as exc:
                with self.stats.lock:
                    self.stats.bad_frames += 1
                self.reply_error(c, 0, "frame_too_large", f"{exc}; closing", request=False)
                return
            except OSError:
                return
            try:
                f = wire.decode(data, max_frame=self.max_frame)
            except wire.WireError as exc:
                with self.stats.lock:
                    self.stats.bad_frames += 1
                self.reply_error(c, 0, "bad_frame", str(exc), request=False)
                continue
            if f.type == wire.MsgType.STATS:
                self.send(c, wire.Frame(wire.MsgType.STATS_REPLY, f.request_id, self.snapshot()))
            elif f.type == wire.MsgType.PING:
                self.send(c, wire.Frame(wire.MsgType.PONG, f.request_id))
            else:
                try:
                    self.on_frame(c, f)
                except Exception as exc:  # noqa: BLE001 - one bad request must not end the connection
                    self.reply_error(c, f.request_id, "internal_error", f"{type(exc).__name__}: {exc}", request=f.type in self.request_types)

    def open_conns(self) -> int:
        with self.conns_lock:
            return len(self.conns)

    # -- control ---------------------------------------------------------------------------------
    def control_loop(self) -> None:
        try:
            while True:
                msg = json.loads(self.ctl.recv_bytes(1 << 16))
                if msg.get("cmd") == "stop":
                    break
        except (EOFError, OSError, ValueError):
            self.owner_gone = True  # parent gone: stop too, and clean up after it
        self.begin_stop()

    def begin_stop(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.gate.close()
        if self.lsock is not None:
            try:
                self.lsock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.lsock.close()

    def close_all(self) -> None:
        with self.conns_lock:
            conns = list(self.conns.values())
        for c in conns:
            with c.send_lock:  # as every _lost: the reader closes the descriptor under this lock
                try:
                    self._lost(c)
                except OSError:  # its reader closed it meanwhile
                    c.alive = False


class _InferenceWorker(ConnServer):
    name = "InferenceServer"
    request_types = frozenset({wire.MsgType.REQUEST})

    def __init__(self, cfg: dict[str, Any], ctl: Connection) -> None:
        super().__init__(cfg, ctl)
        self.max_batch = int(cfg["max_batch_size"])
        self.max_wait = float(cfg["max_wait_ms"]) / 1e3
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.in_batch = False
        self.max_pending = int(cfg.get("max_pending", 64))
        # set (under queue_lock) once the batch loop has drained the queue for the last time
        self.queue_lock = threading.Lock()
        self.queue_closed = False

    # -- setup -------------------------------------------------------------------------------
    def load(self) -> None:
        super().load()
        torch = self.torch
        self.device = torch.device(self.cfg["device"])
        self.model = build_model(self.cfg["model"], self.cfg["model_kwargs"], self.cfg["weights"], self.cfg["device"])
        shape = self.cfg.get("input_shape")
        if shape is None and hasattr(self.model, "input_shape"):
            shape = list(self.model.input_shape)
        self.input_shape = tuple(shape) if shape is not None else None
        dt = self.cfg.get("input_dtype") or (str(getattr(self.model, "input_dtype", "")).replace("torch.", "") or None)
        self.input_dtype = dt
        tdt = getattr(torch, dt, None) if dt else None
        self._input_tdtype = tdt if isinstance(tdt, torch.dtype) else None  # a fast identity check per request
        if self.cfg.get("warmup") and self.input_shape is not None:
            # a full batch: the shapes real traffic will run (and the first parallel region)
            x = torch.zeros((self.max_batch, *self.input_shape), dtype=getattr(torch, dt or "float32"), device=self.device)
            with torch.inference_mode():
                self.model(x)

    def listen(self) -> None:
        path = self.cfg["address"]
        if os.path.exists(path):
            os.unlink(path)
        self.lsock = transport.listen_unix(path)

    def ready_info(self) -> dict[str, Any]:
        info = super().ready_info()
        info.update(
            address=self.cfg["address"],
            device=str(self.device),
            input_shape=list(self.input_shape) if self.input_shape is not None else None,
            input_dtype=self.input_dtype,
        )
        return info

    def on_frame(self, c: _Conn, f: wire.Frame) -> None:
        if f.type != wire.MsgType.REQUEST:
            return super().on_frame(c, f)
        with self.stats.lock:
            self.stats.requests += 1
        if len(f.tensors) != 1:
            return self.reply_error(c, f.request_id, "bad_input", f"a request carries one tensor, got {len(f.tensors)}")
        x = f.tensors[0]
        if self.input_dtype and x.dtype is not self._input_tdtype:
            dt = str(x.dtype).replace("torch.", "")
            if dt != self.input_dtype:
                return self.reply_error(c, f.request_id, "bad_input", f"dtype {dt}, the model takes {self.input_dtype}")
        shape = x.shape
        if len(shape) < 1 or shape[0] < 1:
            return self.reply_error(c, f.request_id, "bad_input", f"shape {list(shape)}: need a leading batch dimension >= 1")
        if self.input_shape is not None and shape[1:] != self.input_shape:
            return self.reply_error(
                c, f.request_id, "bad_input", f"shape {list(x.shape)}, the model takes [batch, {', '.join(map(str, self.input_shape))}]"
            )
        if self.stopping.is_set():
            return self.reply_error(c, f.request_id, "shutting_down", "server is shutting down")
        with self.stats.lock:
            if c.pending >= self.max_pending:
                full = True
            else:
                full = False
                c.pending += 1
        if full:
            return self.reply_error(c, f.request_id, "too_many_pending", f"at most {self.max_pending} requests in flight per connection")
        r = _Req(c, f.request_id, x, time.monotonic())
        with self.queue_lock:
            # the stop may have come since the check above: once the batch loop has drained the
            # queue for the last time, a request put there would never be answered
            closed = self.queue_closed
            if not closed:
                self.queue.put(r)
        if closed:
            self._done(r)
            self.reply_error(c, f.request_id, "shutting_down", "server is shutting down")

    def snapshot(self) -> dict[str, Any]:
        s = self.stats.snapshot(self.open_conns(), self.queue.qsize(), self.gate)
        s.update(max_batch_size=self.max_batch, max_wait_ms=self.max_wait * 1e3, in_batch=self.in_batch)
        return s

    def begin_stop(self) -> None:
        super().begin_stop()
        self.queue.put(None)

    def main_loop(self) -> None:
        self.batch_loop()

    def _done(self, r: _Req) -> None:
        with self.stats.lock:
            r.client.pending -= 1

    def _bad_output(self, outs: list[Any], x: Any, n_requests: int) -> str | None:
        """Why the model's outputs for the batch ``x`` cannot be answered, or None: each must be
        a tensor and, to be split among several requests, have the batch's rows (one request's
        answer is sent as the model returned it)."""
        torch = self.torch
        for o in outs:
            if not isinstance(o, torch.Tensor):
                return f"the model returned {type(o).__name__}, not a tensor (nor a tuple or list of tensors)"
            if n_requests > 1 and (o.dim() < 1 or o.shape[0] != x.shape[0]):
                return (
                    f"the model's output {wire.describe(o)} has no leading batch dimension of {int(x.shape[0])} "
                    f"(its input's): it cannot be split among the {n_requests} requests batched together"
                )
        return None

    # -- batching --------------------------------------------------------------------------------
    def collect(self) -> list[_Req] | None:
        first = self.queue.get()
        if first is None:
            return None
        batch = [first]
        until = first.t_in + self.max_wait
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                item = self.queue.get()  # this thread is the only consumer: it is there
            else:
                # nothing waiting: wait only while some connected client has no request in
                # this batch yet (one client never waits), and never past max_wait
                if len(batch) >= self.open_conns():
                    break
                left = until - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = self.queue.get(timeout=left)
                except queue.Empty:
                    break
            if item is None:
                self.queue.put(None)  # keep the stop marker for the loop
                break
            batch.append(item)
        return batch

    def _forward(self, reqs: list[_Req]) -> tuple[list | None, str | None, str]:
        """One model call on ``reqs`` stacked along the batch dimension: (each output split
        per request, None, "") or (None, what went wrong, its error code)."""
        torch = self.torch
        try:
            x = reqs[0].x if len(reqs) == 1 else torch.cat([r.x for r in reqs])
            with torch.inference_mode():
                y = self.model(x.to(self.device, non_blocking=False))
            outs = list(y) if isinstance(y, (tuple, list)) else [y]
            bad = self._bad_output(outs, x, len(reqs))
            if bad is not None:
                return None, bad, "bad_output"
            if len(reqs) == 1:
                return [[o] for o in outs], None, ""
            return [o.split([int(r.x.shape[0]) for r in reqs]) for o in outs], None, ""
        except Exception as exc:  # noqa: BLE001 - report to the callers, keep serving
            return None, f"{type(exc).__name__}: {exc}", "model_error"

    def batch_loop(self) -> None:
        while True:
            batch = self.collect()
            if batch is None:
                break
            alive = [r for r in batch if r.client.alive]
            if len(alive) < len(batch):  # their clients went away while they waited
                for r in batch:
                    if not r.client.alive:
                        self._done(r)
                with self.stats.lock:
                    self.stats.undeliverable += len(batch) - len(alive)
                batch = alive
            if not batch:
                continue
            self.in_batch = True
            t0 = time.monotonic()
            if len(batch) == 1:
                groups = [batch]
            else:
                by_kind: dict[tuple, list[_Req]] = {}
                for r in batch:
                    by_kind.setdefault((r.x.dtype, tuple(r.x.shape[1:])), []).append(r)
                groups = list(by_kind.values())
            model_s = 0.0
            pending = list(groups)
            while pending:
                reqs = pending.pop(0)
                tm = time.monotonic()
                parts, bad, code = self._forward(reqs)
                model_s += time.monotonic() - tm
                if bad is not None and len(reqs) > 1:
                    # one request can fail a batch (a token id the embedding lacks): the others
                    # must not get its error, so each goes again alone and only the failing
                    # ones are answered with it
                    with self.stats.lock:
                        self.stats.batch_retries += 1
                    pending[:0] = [[r] for r in reqs]
                    continue
                if bad is not None:
                    for r in reqs:
                        self._done(r)
                        self.reply_error(r.client, r.rid, code, bad)
                    continue
                for i, r in enumerate(reqs):
                    self._done(r)  # before its answer goes: the caller may send the next one at once
                    try:
                        # an answer that cannot be encoded goes as an error answer to its caller
                        self.answer(r.client, wire.Frame(wire.MsgType.RESPONSE, r.rid, tensors=[p[i] for p in parts]))
                    except Exception as exc:  # noqa: BLE001 - the batch loop serves everyone: it must outlive one answer
                        traceback.print_exc(file=sys.stderr)
                        self.reply_error(r.client, r.rid, "internal_error", f"{type(exc).__name__}: {exc}")
            t1 = time.monotonic()
            with self.stats.lock:
                st = self.stats
                st.batches += 1
                st.batched_requests += len(batch)
                st.batched_samples += sum(int(r.x.shape[0]) for r in batch)
                st.max_batch = max(st.max_batch, len(batch))
                st.hist[len(batch)] = st.hist.get(len(batch), 0) + 1
                st.forward_total += t1 - t0
                st.model_total += model_s
                for r in batch:
                    w = t0 - r.t_in
                    st.queue_wait_total += w
                    st.queue_wait_max = max(st.queue_wait_max, w)
            self.in_batch = False
        # drain: whoever still waits gets an answer (and nothing is queued after this)
        with self.queue_lock:
            self.queue_closed = True
        while True:
            try:
                r = self.queue.get_nowait()
            except queue.Empty:
                break
            if r is not None:
                self._done(r)
                self.reply_error(r.client, r.rid, "shutting_down", "server is shutting down")


def server_main(kind: str, config_json: str, ctl: Connection) -> None:
    """Entry point of a server process (spawned, or forked for the hazard scenarios)."""
    cfg = json.loads(config_json)
    if kind == "inference":
        cls: type[ConnServer] = _InferenceWorker
    elif kind == "trunk":
        from splitlearn.serving.trunk_server import TrunkWorker as cls  # type: ignore[no-redef]
    else:
        raise ValueError(f"unknown server kind {kind!r}")
    srv = cls(cfg, ctl)
    try:
        srv.load()
        srv.listen()
        info = srv.ready_info()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        traceback.print_exc(file=sys.stderr)
        try:
            ctl.send_bytes(json.dumps({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}).encode())
        finally:
            ctl.close()
        sys.exit(1)
    ctl.send_bytes(json.dumps(info).encode())
    threading.Thread(target=srv.accept_loop, daemon=True, name="accept").start()
    threading.Thread(target=srv.control_loop, daemon=True, name="control").start()
    srv.main_loop()
    srv.close_all()
    try:
        ctl.send_bytes(json.dumps({"stopped": True, "stats": srv.snapshot()}).encode())
    except (OSError, EOFError):
        pass
    if isinstance(cfg.get("address"), str):
        try:
            os.unlink(cfg["address"])
        except OSError:
            pass
    if srv.owner_gone and cfg.get("private_dir"):
        # the owner died without close(): nobody else will remove its directory (the socket,
        # the weights file it wrote for us)
        shutil.rmtree(cfg["private_dir"], ignore_errors=True)
