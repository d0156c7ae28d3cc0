"""TrunkServer: hosts the trunk of one or more split models over TCP (seed 000's server side).

A client holds bottom and top (:class:`splitlearn.serving.split_client.SplitClient`) and sends
the bottom's hidden states; the server runs its trunk and sends the trunk's hidden states back.

* bound to loopback (``127.0.0.1``) unless told otherwise; every connection authenticates
  (HMAC challenge both ways, under a deadline); connections still authenticating hold places
  of a :class:`~splitlearn.serving.server.HandshakeGate`, at most ``max_handshakes_per_peer``
  of them per remote host, and a silent one loses its place after ``handshake_grace`` once
  they are all taken;
* several models, by name; each is loaded in the server process from safetensors only: either a
  checkpoint directory split by :class:`splitlearn.ModelFactory` (only the trunk's tensors are
  read) or an import string + JSON kwargs + a safetensors weights file;
* per-session KV cache for incremental decoding: ``OPEN_SESSION`` (model) gives a session id;
  ``TRUNK`` frames with ``step`` 0 (the prompt) start the session's cache and steps 1, 2, ...
  extend it; sessions belong to their connection and are freed when it closes. A cache is
  bounded: a step that would take a sequence past the model's positions
  (``max_position_embeddings`` / ``n_positions`` of its config, or ``max_positions`` in an
  import spec), or a session's cache past ``max_cache_tokens`` (batch x cached positions), gets
  a ``bad_input`` error and leaves the cache as it was; so does a stateless forward longer
  than the model's positions. All sessions' caches together are bounded by
  ``max_cache_bytes`` (by default a quarter of the serving device's memory): a step that would
  take them past it gets ``cache_full`` and leaves its cache as it was (close sessions, or try
  again when others have closed). A step is checked before it runs from the model's KV bytes
  per token, measured at load with a one-token forward, and counted after it from the cache
  it left;
* tensors travel in :mod:`splitlearn.serving.wire` frames (dtype + shape header, raw bytes, a
  maximum frame size): no pickle anywhere;
* a bad frame, wrong dtype or shape, unknown model or session gets an error frame on its own
  connection; the server keeps serving the others.

Frames (request -> answer)::

    LIST_MODELS                                   -> MODELS {"models": {name: info}}
    OPEN_SESSION {"model"}                        -> SESSION {"session"}
    TRUNK {"session", "step"} [hidden, mask, pos] -> RESPONSE {"cache_len"} [hidden]
    TRUNK {"model"} [hidden, mask?, pos?]         -> RESPONSE [hidden]        (no cache)
    CLOSE_SESSION {"session"}                     -> SESSION {"closed": true}
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from splitlearn.serving import wire
from splitlearn.serving.server import ConnServer, ManagedServer, _Conn, build_model


def _validate_spec(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    spec = dict(spec)
    if "model_type" in spec:
        missing = [k for k in ("path", "split_points") if k not in spec]
        if missing:
            raise ValueError(f"model {name!r}: a split spec needs {missing}")
        spec["path"] = str(spec["path"])
        spec["split_points"] = [int(x) for x in spec["split_points"]]
    elif "import" in spec:
        if ":" not in spec["import"]:
            raise ValueError(f"model {name!r}: import must look like 'package.module:Name'")
    else:
        raise ValueError(f"model {name!r}: give model_type+path+split_points, or import(+kwargs, weights)")
    return spec


class TrunkServer(ManagedServer):
    """``TrunkServer({"gpt2": {"model_type": "gpt2", "path": dir, "split_points": [2, 4]}}).start()``
    returns ``(host, port)``."""

    kind = "trunk"

    def __init__(
        self,
        models: Mapping[str, Mapping[str, Any]],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        device: str = "cpu",
        max_sessions: int = 64,
        max_cache_tokens: int | None = None,
        max_cache_bytes: int | str | None = "auto",
        **kw: Any,
    ) -> None:
        """``max_cache_tokens``: the most tokens (batch x positions) one session's KV cache may
        hold; ``None``: no bound but the model's positions. ``max_cache_bytes``: the most bytes
        the KV caches of every session of every connection may hold together; ``"auto"`` (the
        default): a quarter of the serving device's memory (its RAM for ``cpu``), worked out in
        the server process and reported as ``max_cache_bytes`` in ``stats()``; ``None``: no
        bound."""
        super().__init__(**kw)
        if max_cache_tokens is not None and int(max_cache_tokens) < 1:
            raise ValueError("max_cache_tokens must be >= 1 (or None)")
        self.max_cache_tokens = None if max_cache_tokens is None else int(max_cache_tokens)
        if max_cache_bytes is not None and max_cache_bytes != "auto":
            try:  # inf and NaN are no number of bytes either (int() raises for them)
                ok = not isinstance(max_cache_bytes, (bool, str)) and int(max_cache_bytes) >= 1
            except (TypeError, ValueError, OverflowError):
                ok = False
            if not ok:
                raise ValueError(f"max_cache_bytes must be a number of bytes >= 1, 'auto' or None, not {max_cache_bytes!r}")
            max_cache_bytes = int(max_cache_bytes)
        self.max_cache_bytes = max_cache_bytes
        if not models:
            raise ValueError("a trunk server needs at least one model")
        self.models = {str(n): _validate_spec(str(n), s) for n, s in models.items()}
        self.host, self.port = host, int(port)
        self.device = device
        self.max_sessions = int(max_sessions)

    def _config(self) -> dict[str, Any]:
        cfg = super()._config()
        cfg.update(
            models=self.models,
            host=self.host,
            port=self.port,
            device=self.device,
            max_sessions=self.max_sessions,
            max_cache_tokens=self.max_cache_tokens,
            max_cache_bytes=self.max_cache_bytes,
        )
        return cfg

    def _on_ready(self, msg: dict[str, Any]) -> None:
        self.address = (msg["address"][0], int(msg["address"][1]))
        self.port = self.address[1]  # a restart binds the same port

    def client(self, **kw: Any):
        from splitlearn.serving.split_client import TrunkClient

        if self.address is None:
            raise RuntimeError("server not started")
        kw.setdefault("max_frame", self.max_frame)
        return TrunkClient(self.address, authkey=self.authkey, **kw)

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        with self.client(timeout=timeout) as c:
            return c.stats()


@dataclass
class _Session:
    model: str
    cache: Any = None
    cache_len: int = 0
    step: int = -1
    batch: int = 0
    cache_bytes: int = 0  # counted in the server's cache_bytes


def cache_nbytes(cache: Any) -> int | None:
    """Bytes of the tensors of a KV cache: a transformers ``Cache`` (its ``layers``' keys and
    values, or the older ``key_cache``/``value_cache`` lists) or nested tuples of tensors.
    ``None`` when no tensor is found in it."""
    import torch

    seen: set[int] = set()
    found = [0, False]

    def walk(x: Any, depth: int) -> None:
        if depth > 6 or x is None:
            return
        if isinstance(x, torch.Tensor):
            found[1] = True
            if id(x) not in seen:
                seen.add(id(x))
                found[0] += x.numel() * x.element_size()
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y, depth + 1)
        elif isinstance(getattr(x, "layers", None), (list, tuple)):
            walk(x.layers, depth + 1)
        elif isinstance(getattr(x, "key_cache", None), list):
            walk([x.key_cache, getattr(x, "value_cache", None)], depth + 1)
        elif isinstance(getattr(x, "keys", None), torch.Tensor) or isinstance(getattr(x, "values", None), torch.Tensor):
            walk([x.keys, x.values], depth + 1)

    walk(cache, 0)
    return found[0] if found[1] else None


def device_memory_bytes(torch: Any, device: Any) -> int | None:
    """Total memory of ``device``: the GPU's for ``cuda``, else this machine's RAM."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None


class TrunkWorker(ConnServer):
    name = "TrunkServer"
    request_types = frozenset({wire.MsgType.TRUNK})

    def __init__(self, cfg: dict[str, Any], ctl: Any) -> None:
        super().__init__(cfg, ctl)
        self.models: dict[str, Any] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.sessions: dict[int, dict[str, _Session]] = {}  # connection id -> sessions
        self.sessions_lock = threading.Lock()
        self.max_sessions = int(cfg["max_sessions"])
        self.max_cache_tokens = cfg.get("max_cache_tokens")
        self.max_cache_bytes = cfg.get("max_cache_bytes")  # "auto" until load() works it out
        self.cache_bytes = 0  # every session's cache, counted under sessions_lock
        self.cache_full = 0  # steps refused for max_cache_bytes
        self.forwards = 0

    def load(self) -> None:
        super().load()
        torch = self.torch
        for name, spec in self.cfg["models"].items():
            if "model_type" in spec:
                from splitlearn.factory import ModelFactory

                dtype = getattr(torch, spec["dtype"]) if spec.get("dtype") else None
                _, trunk, _ = ModelFactory.create_split_models(
                    spec["model_type"], spec["path"], *spec["split_points"], device=self.cfg["device"], parts=("trunk",), dtype=dtype
                )
            else:
                trunk = build_model(spec["import"], spec.get("kwargs"), spec.get("weights"), self.cfg["device"])
            config = getattr(trunk, "config", None)
            hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or spec.get("hidden_size")
            positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or spec.get("max_positions")
            p = next(iter(trunk.parameters()), None)
            self.models[name] = trunk
            self.locks[name] = threading.Lock()
            self.info[name] = {
                "hidden_size": int(hidden) if hidden else None,
                "max_positions": int(positions) if positions else None,
                "dtype": str(p.dtype).replace("torch.", "") if p is not None else None,
                "layers": [getattr(trunk, "start_layer", None), getattr(trunk, "end_layer", None)],
                "family": getattr(trunk, "family", None) or spec.get("model_type"),
            }
            self.info[name]["kv_bytes_per_token"] = self._kv_bytes_per_token(name, trunk, p)
        self.device = torch.device(self.cfg["device"])
        if self.max_cache_bytes == "auto":
            total = device_memory_bytes(torch, self.device)
            self.max_cache_bytes = total // 4 if total else None

    def _kv_bytes_per_token(self, name: str, trunk: Any, p: Any) -> int | None:
        """The bytes one token adds to a session's cache of this model: the cache a one-token
        forward leaves. ``None`` when the model cannot say (no hidden size, no cache, the
        forward fails): its steps are then counted after they run, from the cache they left."""
        torch = self.torch
        hidden = self.info[name]["hidden_size"]
        if not hidden or p is None:
            return None
        try:
            with torch.inference_mode():
                out = trunk(torch.zeros(1, 1, hidden, dtype=p.dtype, device=p.device), use_cache=True)
            n = cache_nbytes(getattr(out, "past_key_values", None))
        except Exception as exc:  # noqa: BLE001 - an import-spec model may take no cache: counted after each step
            print(f"[{self.name}] model {name!r}: no KV bytes per token from a one-token forward ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
            return None
        return n or None

    def listen(self) -> None:
        from splitlearn.serving import transport

        self.lsock = transport.listen_tcp(self.cfg["host"], self.cfg["port"])

    def ready_info(self) -> dict[str, Any]:
        info = super().ready_info()
        host, port = self.lsock.getsockname()[:2]
        info.update(address=[host, port], models=self.info, device=str(self.device))
        return info

    def snapshot(self) -> dict[str, Any]:
        s = self.stats.snapshot(self.open_conns(), 0, self.gate)
        with self.sessions_lock:
            s["sessions_open"] = sum(len(v) for v in self.sessions.values())
            s["cache_bytes"] = self.cache_bytes
            s["cache_full"] = self.cache_full
        s["max_cache_bytes"] = self.max_cache_bytes
        with self.stats.lock:
            s["forwards"] = self.forwards
        s["models"] = sorted(self.models)
        return s

    def on_disconnect(self, c: _Conn) -> None:
        with self.sessions_lock:
            gone = self.sessions.pop(c.cid, None)  # frees the caches
            if gone:
                self.cache_bytes -= sum(s.cache_bytes for s in gone.values())

    # -- requests ---------------------------------------------------------------------------------
    def on_frame(self, c: _Conn, f: wire.Frame) -> None:
        T = wire.MsgType
        rid = f.request_id
        if f.type == T.LIST_MODELS:
            self.send(c, wire.Frame(T.MODELS, rid, {"models": self.info}))
        elif f.type == T.OPEN_SESSION:
            name = f.meta.get("model")
            if not isinstance(name, str) or name not in self.models:  # a list or dict is no name (and unhashable)
                return self.reply_error(c, rid, "unknown_model", f"no model {wire.clip(name)} here (models: {', '.join(sorted(self.models))})", request=False)
            with self.sessions_lock:
                mine = self.sessions.setdefault(c.cid, {})
                if len(mine) >= self.max_sessions:
                    return self.reply_error(c, rid, "too_many_sessions", f"at most {self.max_sessions} open sessions per connection", request=False)
                sid = secrets.token_hex(8)
                mine[sid] = _Session(name)
            self.send(c, wire.Frame(T.SESSION, rid, {"session": sid, "model": name}))
        elif f.type == T.CLOSE_SESSION:
            with self.sessions_lock:
                gone = self.sessions.get(c.cid, {}).pop(str(f.meta.get("session")), None)
                if gone is not None:
                    self.cache_bytes -= gone.cache_bytes
            if gone is None:
                return self.reply_error(c, rid, "unknown_session", f"no open session {wire.clip(f.meta.get('session'))} on this connection", request=False)
            self.send(c, wire.Frame(T.SESSION, rid, {"session": f.meta.get("session"), "closed": True}))
        elif f.type == T.TRUNK:
            self.on_trunk(c, f)
        else:
            super().on_frame(c, f)

    def on_trunk(self, c: _Conn, f: wire.Frame) -> None:
        torch = self.torch
        rid = f.request_id
        with self.stats.lock:
            self.stats.requests += 1
        session = None
        if "session" in f.meta:
            with self.sessions_lock:
                session = self.sessions.get(c.cid, {}).get(str(f.meta["session"]))
            if session is None:
                return self.reply_error(c, rid, "unknown_session", f"no open session {wire.clip(f.meta['session'])} on this connection")
            name = session.model
        else:
            name = f.meta.get("model")
            if not isinstance(name, str) or name not in self.models:  # a list or dict is no name (and unhashable)
                return self.reply_error(c, rid, "unknown_model", f"no model {wire.clip(name)} here (models: {', '.join(sorted(self.models))})")
        info = self.info[name]
        if not 1 <= len(f.tensors) <= 3:
            return self.reply_error(c, rid, "bad_input", f"TRUNK carries hidden_states[, attention_mask[, position_ids]], got {len(f.tensors)} tensors")
        hidden = f.tensors[0]
        mask = f.tensors[1] if len(f.tensors) > 1 else None
        pos = f.tensors[2] if len(f.tensors) > 2 else None
        want = info["dtype"]
        got = str(hidden.dtype).replace("torch.", "")
        if want and got != want:
            return self.reply_error(c, rid, "bad_input", f"hidden_states dtype {got}, model {name!r} takes {want}")
        if hidden.dim() != 3 or hidden.shape[0] < 1 or hidden.shape[1] < 1 or (info["hidden_size"] and hidden.shape[2] != info["hidden_size"]):
            return self.reply_error(c, rid, "bad_input", f"hidden_states shape {list(hidden.shape)}, model {name!r} takes [batch, seq, {info['hidden_size']}]")
        b, q = int(hidden.shape[0]), int(hidden.shape[1])
        step = 0
        if session is not None:
            try:
                step = int(f.meta.get("step", 0))
            except (TypeError, ValueError, OverflowError):  # null, a list, "one", Infinity, NaN
                return self.reply_error(c, rid, "bad_input", f"step {wire.clip(f.meta.get('step'))}: need an integer")
        past = 0
        if session is not None and step > 0:
            if session.cache is None or step != session.step + 1 or b != session.batch:
                return self.reply_error(
                    c, rid, "bad_step", f"step {step} (batch {b}) does not follow step {session.step} (batch {session.batch}) of this session"
                )
            past = session.cache_len
        # the cache grows with every step: bounded by the model's positions and max_cache_tokens
        positions = info.get("max_positions")
        if positions and past + q > positions:
            return self.reply_error(
                c, rid, "bad_input", f"{past + q} positions ({past} cached + {q} new) exceed the {positions} of model {name!r}"
            )
        if session is not None and self.max_cache_tokens is not None and b * (past + q) > self.max_cache_tokens:
            return self.reply_error(
                c,
                rid,
                "bad_input",
                f"the session's cache would hold {b} x {past + q} = {b * (past + q)} tokens, more than max_cache_tokens={self.max_cache_tokens}",
            )
        if mask is not None:
            if mask.dtype.is_floating_point or mask.dim() != 2 or mask.shape[0] != b or mask.shape[1] != past + q:
                return self.reply_error(c, rid, "bad_input", f"attention_mask {wire.describe(mask)}: need an integer [batch={b}, {past + q}] mask")
        if pos is not None:
            if pos.dtype != torch.int64 or tuple(pos.shape) != (b, q):
                return self.reply_error(c, rid, "bad_input", f"position_ids {wire.describe(pos)}: need int64[{b}, {q}]")
        if session is not None and not self._reserve(session, b * (past + q), name):
            return self.reply_error(
                c,
                rid,
                "cache_full",
                f"the sessions' KV caches would pass max_cache_bytes={self.max_cache_bytes} "
                f"({self.cache_bytes} bytes held); close sessions, or try again when others have",
            )
        model = self.models[name]
        dev = self.device
        try:
            with self.locks[name], torch.inference_mode():
                out = model(
                    hidden.to(dev),
                    attention_mask=mask.to(dev) if mask is not None else None,
                    position_ids=pos.to(dev) if pos is not None else None,
                    past_key_values=(session.cache if session is not None and step > 0 else None),
                    use_cache=session is not None,
                )
        except Exception as exc:  # noqa: BLE001 - to the caller; the server keeps serving
            reset = ""
            if session is not None:
                # the cache grows in place, layer by layer: after a failure part of it holds this
                # step and part does not. Dropped, so that the next step is refused (bad_step)
                # instead of run on it: the generation starts again at step 0
                session.cache, session.cache_len, session.step = None, 0, -1
                self._account(session, 0)
                reset = "; the session's cache was dropped: start again at step 0"
            return self.reply_error(c, rid, "model_error", f"{type(exc).__name__}: {exc}{reset}")
        meta: dict[str, Any] = {}
        if session is not None:
            session.cache = out.past_key_values
            session.cache_len = past + q
            session.step = step
            session.batch = b
            held = cache_nbytes(session.cache)
            if held is not None:  # what the cache holds now, in place of what was reserved
                self._account(session, held)
            meta["cache_len"] = session.cache_len
        with self.stats.lock:  # connections run in threads of their own
            self.forwards += 1
        hs = out.hidden_states if hasattr(out, "hidden_states") else out
        self.answer(c, wire.Frame(wire.MsgType.RESPONSE, rid, meta, [hs]))  # counts how it ended

    def _account(self, session: _Session, nbytes: int) -> None:
        """Count ``nbytes`` for ``session``'s cache in place of what it had."""
        with self.sessions_lock:
            self.cache_bytes += nbytes - session.cache_bytes
            session.cache_bytes = nbytes

    def _reserve(self, session: _Session, tokens: int, name: str) -> bool:
        """Count, before a step runs, the cache it will leave ``session`` (``tokens`` = batch x
        positions, at the model's KV bytes per token, or at what this session's cache has held
        per token so far when the model could not say); False, counting nothing, when that
        would take every session's caches past ``max_cache_bytes``."""
        per_token = self.info[name].get("kv_bytes_per_token")
        if not per_token and session.cache_len and session.batch:
            per_token = session.cache_bytes / (session.batch * session.cache_len)
        need = int(tokens * (per_token or 0))
        with self.sessions_lock:
            grow = need - session.cache_bytes
            if self.max_cache_bytes is not None and grow > 0 and self.cache_bytes + grow > self.max_cache_bytes:
                self.cache_full += 1
                return False
            self.cache_bytes += grow
            session.cache_bytes = need
        return True
