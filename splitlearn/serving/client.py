"""InferenceClient: one authenticated Unix-socket connection to an :class:`InferenceServer`.

Every call has a timeout; a broken connection, a dead server or an error frame raises at
once (:class:`ServerUnavailable`, :class:`ServerError`), a slow one raises ``TimeoutError``.
Answers are matched by request id: an answer that arrives after its caller gave up is
dropped, never handed to the next call. Works without torch (``as_numpy=True``).
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from splitlearn.serving import transport, wire
from splitlearn.serving.transport import ServerError, ServerUnavailable


class InferenceClient:
    def __init__(
        self,
        address: str,
        *,
        authkey: bytes | None,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        max_frame: int = wire.DEFAULT_MAX_FRAME,
        as_numpy: bool = False,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.max_frame = max_frame
        self.as_numpy = as_numpy
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._conn = transport.connect(address, authkey=authkey, timeout=connect_timeout)
        self._broken: str | None = None

    def _call(self, frame: wire.Frame, timeout: float | None) -> wire.Frame:
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            if self._broken:
                raise ServerUnavailable(f"connection unusable: {self._broken}")
            frame.request_id = next(self._ids)
            data = wire.encode(frame, max_frame=self.max_frame)  # a WireError here leaves the connection intact
            t_end = time.monotonic() + timeout
            try:
                try:
                    self._conn.send_bytes(data)
                except (OSError, EOFError) as exc:
                    raise ServerUnavailable(f"send failed: {type(exc).__name__}: {exc}") from None
                while True:
                    left = t_end - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"no answer to request {frame.request_id} within {timeout:.3g}s")
                    reply = transport.recv_frame(self._conn, timeout=left, max_frame=self.max_frame, as_numpy=self.as_numpy)
                    if reply.request_id == frame.request_id:
                        break
                    if reply.type == wire.MsgType.ERROR and reply.request_id == 0:
                        break  # connection-level error (bad frame, too large): ours
                    # an answer to an earlier call that timed out: drop it
            except ServerUnavailable as exc:
                self._broken = str(exc)
                raise ServerUnavailable(f"server at {self.address} went away: {exc}") from None
            except wire.WireError as exc:
                self._broken = str(exc)
                raise
        if reply.type == wire.MsgType.ERROR:
            raise ServerError(str(reply.meta.get("error", "error")), str(reply.meta.get("message", "")))
        return reply

    def infer(self, x: Any, timeout: float | None = None) -> Any:
        """Run the model on ``x`` (leading batch dimension). One tensor out, or a tuple."""
        reply = self._call(wire.Frame(wire.MsgType.REQUEST, tensors=[x]), timeout)
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
        self._conn.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
