"""Client side of the trunk server: :class:`TrunkClient` (the frames) and :class:`SplitClient`
(bottom and top local, trunk remote; greedy generation through
:func:`splitlearn.generate.greedy_generate` with the remote trunk as ``trunk_fn``)."""

from __future__ import annotations

from typing import Any

from splitlearn.serving import wire
from splitlearn.serving.client import InferenceClient


class TrunkClient(InferenceClient):
    """One authenticated TCP connection to a :class:`TrunkServer`."""

    def list_models(self, timeout: float | None = None) -> dict[str, Any]:
        return self._call(wire.Frame(wire.MsgType.LIST_MODELS), timeout).meta["models"]

    def open_session(self, model: str, timeout: float | None = None) -> str:
        return str(self._call(wire.Frame(wire.MsgType.OPEN_SESSION, meta={"model": model}), timeout).meta["session"])

    def close_session(self, session: str, timeout: float | None = None) -> None:
        self._call(wire.Frame(wire.MsgType.CLOSE_SESSION, meta={"session": session}), timeout)

    def forward(
        self,
        hidden_states: Any,
        attention_mask: Any = None,
        position_ids: Any = None,
        *,
        session: str | None = None,
        model: str | None = None,
        step: int = 0,
        timeout: float | None = None,
    ) -> Any:
        """The trunk's hidden states for ``hidden_states``. With ``session``, ``step`` 0 starts the
        session's KV cache and later steps extend it; with ``model`` only, no cache is kept."""
        if (session is None) == (model is None):
            raise ValueError("give session or model (exactly one)")
        meta: dict[str, Any] = {"session": session, "step": int(step)} if session is not None else {"model": model}
        tensors = [hidden_states]
        if attention_mask is not None or position_ids is not None:
            if attention_mask is None:
                raise ValueError("position_ids need an attention_mask")
            tensors.append(attention_mask)
            if position_ids is not None:
                tensors.append(position_ids)
        # timed: a generation's steps take about the same time, so the hybrid wait can use them
        return self._call(wire.Frame(wire.MsgType.TRUNK, meta=meta, tensors=tensors), timeout, timed=True).tensors[0]


class SplitClient:
    """Bottom and top here, trunk on a server. ``generate`` equals the full model's greedy
    ``generate``; one server session per generation, closed when it ends."""

    def __init__(self, trunk: TrunkClient, model: str, bottom: Any, top: Any, *, timeout: float | None = None) -> None:
        self.trunk = trunk
        self.model = model
        self.bottom = bottom
        self.top = top
        self.timeout = timeout
        self.session: str | None = None
        self.calls = 0

    @classmethod
    def connect(
        cls,
        address: tuple[str, int],
        authkey: bytes,
        model: str,
        *,
        model_type: str,
        path: Any,
        split_points: tuple[int, int],
        device: str = "cpu",
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        wait: str = "block",
        **load_kw: Any,
    ) -> SplitClient:
        """Load bottom and top from a local checkpoint (only their tensors) and connect.
        ``wait`` is how the trunk client waits for the trunk's answers (see
        :mod:`splitlearn.serving.client`: ``"block"`` or ``"hybrid"``)."""
        from splitlearn.factory import ModelFactory

        bottom, _, top = ModelFactory.create_split_models(model_type, path, *split_points, device=device, parts=("bottom", "top"), **load_kw)
        client = TrunkClient(address, authkey=authkey, timeout=timeout, connect_timeout=connect_timeout, wait=wait)
        return cls(client, model, bottom, top)

    def trunk_fn(self, hidden_states: Any, attention_mask: Any, position_ids: Any, step: int) -> Any:
        if step == 0:
            self._close_session()
            self.session = self.trunk.open_session(self.model, timeout=self.timeout)
        self.calls += 1
        out = self.trunk.forward(hidden_states, attention_mask, position_ids, session=self.session, step=step, timeout=self.timeout)
        return out.to(hidden_states.device) if hasattr(out, "to") else out

    def generate(self, input_ids: Any, max_new_tokens: int, attention_mask: Any = None, **kw: Any) -> Any:
        from splitlearn.generate import greedy_generate

        try:
            return greedy_generate(self.bottom, None, self.top, input_ids, max_new_tokens, attention_mask, trunk_fn=self.trunk_fn, **kw)
        finally:
            self._close_session()

    def _close_session(self) -> None:
        if self.session is not None:
            sid, self.session = self.session, None
            try:
                self.trunk.close_session(sid, timeout=self.timeout)
            except (OSError, RuntimeError, TimeoutError, wire.WireError):
                pass  # the server is gone or the connection broke: nothing left to free

    def close(self) -> None:
        self._close_session()
        self.trunk.close()

    def __enter__(self) -> SplitClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
