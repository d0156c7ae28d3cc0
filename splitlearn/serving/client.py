"""InferenceClient: one authenticated connection to an :class:`InferenceServer` (a Unix socket
path) or, as :class:`~splitlearn.serving.split_client.TrunkClient`, to a trunk server (host, port).

Every call has a timeout, which covers the whole call: sending the request and receiving all
of the answer. Timeouts are seconds, finite and > 0 (a call's own may be 0: no wait for the
answer); infinity and NaN are refused with ValueError, by the constructor or before the call
sends anything. A broken connection, a dead server or an error frame raises at once
(:class:`ServerUnavailable`, :class:`ServerError`), a slow one raises ``TimeoutError``; a call
cut off in the middle of a frame (a server paused half-way through an answer, or one that stopped
taking a large request) leaves the connection out of step, and later calls on it raise
``ServerUnavailable``. Answers are matched by request id: an answer that arrives after its
caller gave up is dropped, never handed to the next call. :meth:`close` from another thread
ends a call waiting on the connection. Works without torch (``as_numpy=True``).

An answer that arrives whole but cannot be decoded (a bfloat16 tensor for an ``as_numpy``
client, a malformed frame) raises :class:`~splitlearn.serving.wire.WireError` from its call and
leaves the connection usable (an earlier call's late answer of that kind is dropped); only an
answer over ``max_frame``, whose body is never read, leaves the stream out of step and the
connection unusable.

How a call waits for its answer (``wait``):

* ``"block"`` (the default): in ``poll(2)`` until the answer arrives. Costs no CPU, but the
  answer has to wake the caller: on the 2-vCPU VMs measured here that wake-up is a good part
  of the server's overhead for one client (``serving_batching``).
* ``"hybrid"``: sleep for ``hybrid_sleep`` (default 0.9) of the median of the recent answer
  times, or until the earliest tenth of them if that comes first, less the timer's lateness
  (nine in ten of the recent sleeps overshot by less; at most half the sleep); then poll the
  socket without sleeping until the answer is there, up to twice that median, then block as
  above. The wake-up then happens before the answer instead of after it. This is the hybrid
  polling of Linux's block layer (blk-mq, 2016), which sleeps for half the mean completion
  time: with a microsecond sleep (``select``; ``poll(2)`` counts whole milliseconds) that
  corrects for its own lateness, 0.9 measured the same latency for a fifth of the CPU (2026-12-01, side by side
  with the millisecond sleep at 0.5, 2.5 ms calls: 0.30-0.32 ms of client CPU per call against
  1.43-1.56 ms). The price is the CPU of the spinning part of each wait (``serving_batching``
  records it), so use it where the caller has a core of its own, not with more spinning
  clients than cores. Until a few answers have been timed it blocks. An answer that comes
  while the caller sleeps wakes it as a blocking wait would. ``wait_counts`` says how each
  hybrid wait ended (no history yet, answer already there, answered while asleep, while
  polling, or the polling gave up and it blocked).
"""

from __future__ import annotations

import collections
import itertools
import select
import threading
import time
from typing import Any

from splitlearn.serving import transport, wire
from splitlearn.serving.transport import ServerError, ServerUnavailable

WAIT_MODES = ("block", "hybrid")
_HISTORY = 32  # answer times the hybrid wait takes its median from
_MIN_HISTORY = 3  # answers timed before the hybrid wait starts spinning


class InferenceClient:
    def __init__(
        self,
        address: str | tuple[str, int],
        *,
        authkey: bytes | None,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        max_frame: int = wire.DEFAULT_MAX_FRAME,
        as_numpy: bool = False,
        wait: str = "block",
        hybrid_sleep: float = 0.9,
    ) -> None:
        if wait not in WAIT_MODES:
            raise ValueError(f"wait must be one of {', '.join(WAIT_MODES)}, got {wait!r}")
        if not 0.0 <= hybrid_sleep < 1.0:
            raise ValueError(f"hybrid_sleep is the share of the expected answer time spent asleep: 0 <= it < 1, got {hybrid_sleep}")
        self.wait = wait  # checked (and may be changed) per call
        self.hybrid_sleep = float(hybrid_sleep)
        # inference answer times (send to answer, seconds) and how hybrid waits ended
        self._answer_times: collections.deque[float] = collections.deque(maxlen=_HISTORY)
        self._oversleeps: collections.deque[float] = collections.deque(maxlen=_HISTORY)  # timer lateness, s
        self.wait_counts = {"no_history": 0, "answered_at_once": 0, "answered_while_asleep": 0, "answered_while_spinning": 0, "spin_gave_up": 0}
        self.address = address
        # finite seconds > 0: inf and NaN are refused (transport.check_timeout)
        self.timeout = transport.check_timeout("timeout", timeout)
        connect_timeout = transport.check_timeout("connect_timeout", connect_timeout)
        self.max_frame = max_frame
        self.as_numpy = as_numpy
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()  # one close() at a time
        self._conn = transport.connect(address, authkey=authkey, timeout=connect_timeout)
        self._broken: str | None = None

    def _hybrid_wait(self, t_sent: float, t_end: float) -> None:
        """Sleep, then spin, until the socket is readable, ``t_end``, or the spin's bound
        (the caller's blocking read takes over from there)."""
        times = sorted(self._answer_times)
        if len(times) < _MIN_HISTORY:
            self.wait_counts["no_history"] += 1
            return
        expected = times[len(times) // 2]
        conn = self._conn
        if conn.poll(0.0):  # already there (buffered, or it came back that fast)
            self.wait_counts["answered_at_once"] += 1
            return
        fd = conn.fileno()
        p = select.poll()
        p.register(fd, select.POLLIN)
        # wake before all but the earliest answers (1 in 10 came sooner), however late the timer
        # usually is (9 sleeps in 10 overshot by less)
        early = times[len(times) // 10]
        planned = min(self.hybrid_sleep * expected, early)
        lates = sorted(self._oversleeps)
        # at most half the sleep: the lateness is learnt from sleeps only, so a burst of late
        # timers (a busy machine) that cancelled every sleep would never be unlearnt, and every
        # wait would spin from the start (seen once: 2.1 ms of CPU per 2.1 ms call)
        late = min(lates[9 * len(lates) // 10], 0.5 * planned) if lates else 0.0
        wake = min(t_sent + planned - late, t_end)
        sleep = wake - time.monotonic()
        if sleep > 0:
            try:  # select() sleeps to the microsecond and returns early when the answer comes
                answered = bool(select.select([fd], [], [], sleep)[0])
            except ValueError:  # a descriptor past FD_SETSIZE: poll(2), whole milliseconds, rounded down
                answered = bool(p.poll(int(1e3 * sleep)))
            if answered:
                self.wait_counts["answered_while_asleep"] += 1
                return
            self._oversleeps.append(max(0.0, time.monotonic() - wake))
        spin_until = min(t_sent + 2 * expected, t_end)
        while not p.poll(0):
            if time.monotonic() >= spin_until:
                self.wait_counts["spin_gave_up"] += 1
                return
        self.wait_counts["answered_while_spinning"] += 1

    def _call(self, frame: wire.Frame, timeout: float | None, *, timed: bool = False) -> wire.Frame:
        timeout = self.timeout if timeout is None else transport.check_timeout("timeout", timeout, zero_ok=True)
        if self.wait not in WAIT_MODES:
            raise ValueError(f"wait must be one of {', '.join(WAIT_MODES)}, got {self.wait!r}")
        # calls take turns on the connection: the wait for this one's turn counts in its timeout
        t_start = time.monotonic()
        if not self._lock.acquire(timeout=timeout):
            raise TimeoutError(f"no turn on the connection within {timeout:.3g}s: another call on this client held it throughout")
        try:
            if self._broken:
                raise ServerUnavailable(f"connection unusable: {self._broken}")
            frame.request_id = next(self._ids)
            data = wire.encode(frame, max_frame=self.max_frame)  # a WireError here leaves the connection intact
            t_sent = time.monotonic()
            t_end = t_start + timeout
            try:
                try:
                    self._conn.send_bytes(data, deadline=t_end)
                except transport.FrameTimeout:
                    raise
                except TimeoutError:  # not a byte sent: the connection is still in step
                    raise TimeoutError(
                        f"request {frame.request_id} not sent within {timeout:.3g}s: the server is not reading"
                    ) from None
                except (OSError, EOFError) as exc:
                    raise ServerUnavailable(f"send failed: {type(exc).__name__}: {exc}") from None
                if timed and self.wait == "hybrid":
                    try:
                        self._hybrid_wait(t_sent, t_end)
                    except OSError as exc:
                        raise ServerUnavailable(f"receive failed: {type(exc).__name__}: {exc}") from None
                while True:
                    left = t_end - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"no answer to request {frame.request_id} within {timeout:.3g}s")
                    try:
                        reply = transport.recv_frame(self._conn, timeout=left, max_frame=self.max_frame, as_numpy=self.as_numpy)
                    except transport.UnreadFrame:
                        raise
                    except wire.WireError as exc:  # read whole, so the stream is in step
                        if exc.request_id not in (None, 0, frame.request_id):
                            continue  # an earlier call's late answer, and unreadable: dropped as below
                        raise
                    if reply.request_id == frame.request_id:
                        break
                    if reply.type == wire.MsgType.ERROR and reply.request_id == 0:
                        break  # connection-level error (bad frame, too large): ours
                    # an answer to an earlier call that timed out: drop it
                if timed and reply.type == wire.MsgType.RESPONSE:
                    self._answer_times.append(time.monotonic() - t_sent)
            except ServerUnavailable as exc:
                self._broken = str(exc)
                raise ServerUnavailable(f"server at {self.address} went away: {exc}") from None
            except transport.FrameTimeout as exc:  # cut off mid-frame: the stream is out of step
                self._broken = f"timed out in the middle of a frame ({exc})"
                raise TimeoutError(f"request {frame.request_id}: {exc}; the connection is no longer usable") from None
            except transport.UnreadFrame as exc:  # its body was not read: the stream is out of step
                self._broken = str(exc)
                raise
        finally:
            self._lock.release()
        if reply.type == wire.MsgType.ERROR:
            raise ServerError(str(reply.meta.get("error", "error")), str(reply.meta.get("message", "")))
        return reply

    def infer(self, x: Any, timeout: float | None = None) -> Any:
        """Run the model on ``x`` (leading batch dimension). One tensor out, or a tuple."""
        reply = self._call(wire.Frame(wire.MsgType.REQUEST, tensors=[x]), timeout, timed=True)
        return reply.tensors[0] if len(reply.tensors) == 1 else tuple(reply.tensors)

    def stats(self, timeout: float | None = None) -> dict[str, Any]:
        return self._call(wire.Frame(wire.MsgType.STATS), timeout).meta

    def ping(self, timeout: float | None = None) -> float:
        t0 = time.perf_counter()
        self._call(wire.Frame(wire.MsgType.PING), timeout)
        return time.perf_counter() - t0

    def send_raw(self, data: bytes) -> None:
        """Send arbitrary bytes as one message (for fault tests)."""
        self._conn.send_bytes(data)

    def recv_frame(self, timeout: float | None = None) -> wire.Frame:
        return transport.recv_frame(self._conn, timeout=self.timeout if timeout is None else timeout, max_frame=self.max_frame)

    def close(self) -> None:
        """Close the connection; a call waiting on it in another thread ends at once with
        ``ServerUnavailable`` (it is woken first: closing alone would leave it waiting, and its
        descriptor number free for another connection to take)."""
        # one at a time: a second close() that read the descriptor number while the first closed
        # it would shut that number down afterwards, when it may be another connection's
        with self._close_lock:
            conn = self._conn
            try:
                transport.shutdown_fd(conn.fileno())
            except OSError:  # closed already
                return
            with self._lock:
                conn.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
