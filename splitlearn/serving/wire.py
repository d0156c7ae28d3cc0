"""The serving wire format: framed messages that carry tensors without pickle.

A frame is one ``transport.Channel.send_bytes`` message (the channel adds its own length
prefix, as ``multiprocessing.connection`` does). Layout, little-endian::

    header   magic "SLW" (3s) | version (B) | type (B) | flags (B) | n_tensors (H)
             | request id (Q) | meta length (I)                         = 20 bytes
    meta     UTF-8 JSON object (model name, session id, error text ...), may be empty
    tensors  n_tensors times:
             dtype code (B) | ndim (B) | reserved (H) | nbytes (Q) | shape (ndim x Q)
             | raw bytes (C order, little-endian)

Decoding checks every field: magic, version, known type and dtype, ndim limit, that the
shape matches the byte count, that nothing is left over, and the frame size limit. Any
violation raises :class:`WireError` (a ``ValueError``); nothing else escapes
:func:`decode` for any input. Encoding raises :class:`WireError` too, and nothing else, for
what the format cannot carry (an unsupported dtype, a sparse or meta tensor, meta that is not
JSON), and :class:`OversizedFrame` for a frame of any type, tensors or not, over the limit.
A tensor whose negation or conjugation is still lazy is sent as its values.

Tensors go in as ``torch.Tensor`` or ``numpy.ndarray`` and come out as torch tensors
(default) or numpy arrays (``as_numpy=True``, for clients that do not import torch).
"""

from __future__ import annotations

import enum
import json
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"SLW"
VERSION = 1
MAX_NDIM = 8
DEFAULT_MAX_FRAME = 64 * 1024 * 1024  # bytes, header included

_HEADER = struct.Struct("<3sBBBHQI")
_TENSOR = struct.Struct("<BBHQ")
HEADER_SIZE = _HEADER.size


class WireError(ValueError):
    """A frame that does not follow the wire format (or exceeds the size limit).

    ``request_id``: the id in the frame's header when :func:`decode` got that far (a reader can
    tell whose answer it could not read), else ``None``."""

    request_id: int | None = None


class OversizedFrame(WireError):
    """A frame larger than the maximum frame size (to encode, or received)."""


class MsgType(enum.IntEnum):
    REQUEST = 1  # inference request: one tensor
    RESPONSE = 2  # answer to a request (same id)
    ERROR = 3  # meta: {"error": code, "message": text}
    STATS = 4  # ask for server statistics
    STATS_REPLY = 5  # meta: statistics
    PING = 6
    PONG = 7
    OPEN_SESSION = 8  # trunk server: meta {"model": name}
    SESSION = 9  # trunk server: meta {"session": id, ...}
    CLOSE_SESSION = 10  # trunk server: meta {"session": id}
    TRUNK = 11  # trunk server: meta {"session"| "model", "step"}, tensors hidden[, mask, pos]
    LIST_MODELS = 12
    MODELS = 13


_MSG_TYPES = {int(m): m for m in MsgType}  # a dict lookup costs less than MsgType(n) per frame

# dtype codes are part of the format: never renumber.
_DTYPES: dict[int, tuple[str, int]] = {
    1: ("float32", 4),
    2: ("float64", 8),
    3: ("float16", 2),
    4: ("bfloat16", 2),
    5: ("int64", 8),
    6: ("int32", 4),
    7: ("int16", 2),
    8: ("int8", 1),
    9: ("uint8", 1),
    10: ("bool", 1),
}
_CODE_BY_NAME = {name: code for code, (name, _) in _DTYPES.items()}


def dtype_names() -> list[str]:
    return [name for name, _ in _DTYPES.values()]


@dataclass
class Frame:
    type: MsgType
    request_id: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: list[Any] = field(default_factory=list)
    flags: int = 0

    @property
    def tensor(self) -> Any:
        if not self.tensors:
            raise WireError(f"{self.type.name} frame carries no tensor")
        return self.tensors[0]


# Encoding and decoding run once per request, between milliseconds of other work: code that
# costs a few microseconds in a loop costs 6-30x that there (caches and predictors gone cold;
# see claim 002-server-overhead). So the per-tensor path makes few calls into torch: names of
# dtypes seen before come from a cache, a CPU tensor is read through one ``numpy()`` view, and
# a received tensor is a numpy view of the frame handed to ``torch.from_numpy``.
_NAME_OF_DTYPE: dict[Any, str] = {}  # torch or numpy dtype object -> wire name, for dtypes seen before


def _dtype_name(obj: Any) -> str:
    dt = getattr(obj, "dtype", None)
    if dt is None:
        raise WireError(f"cannot encode {type(obj).__name__}: not a tensor or array")
    cached = _NAME_OF_DTYPE.get(dt)
    if cached is not None:
        return cached
    name = str(dt)
    if not name.startswith("torch.") and isinstance(getattr(dt, "name", None), str):
        name = dt.name  # numpy: '>f4' -> 'float32'
    if name.startswith("torch."):
        name = name[len("torch.") :]
    if name not in _CODE_BY_NAME:
        raise WireError(f"dtype {name} is not supported on the wire (supported: {', '.join(dtype_names())})")
    _NAME_OF_DTYPE[dt] = name
    return name


def _raw(obj: Any) -> tuple[str, tuple[int, ...], memoryview]:
    """dtype name, shape and a little-endian C-order byte view of a tensor or array."""
    name = _dtype_name(obj)
    shape = tuple(int(s) for s in obj.shape)
    mod = type(obj).__module__
    if mod.startswith("torch"):
        try:
            return name, shape, _torch_bytes(obj, name)
        except Exception as exc:  # noqa: BLE001 - a tensor torch cannot hand over as bytes
            raise WireError(_why_not(obj, exc)) from None
    import numpy as np

    a = np.ascontiguousarray(obj)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big"):
        a = a.astype(a.dtype.newbyteorder("<"))
    return name, shape, memoryview(a.reshape(-1).view(np.uint8)).cast("B")


def _torch_bytes(obj: Any, name: str) -> memoryview:
    """The raw bytes of a dense tensor: detached, on the CPU, C order, with any lazy negation
    (``torch._neg_view``) or conjugation applied. Raises for what has no such bytes (a sparse
    tensor, one on the meta device): checked only then, off the common path."""
    t = obj.detach() if obj.requires_grad else obj
    if not t.is_cpu:
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    if name != "bfloat16":  # numpy has no bfloat16
        try:
            return memoryview(t.numpy()).cast("B")
        except RuntimeError:  # numpy() refuses a tensor whose negation or conjugation is still lazy
            pass
    # bfloat16, or a lazy view: its values made real first (a view of them as bytes would be
    # refused too, or carry the values before the negation)
    t = t.resolve_conj().resolve_neg()
    return memoryview(t.reshape(-1).view(sys.modules["torch"].uint8).numpy()).cast("B")


def _why_not(obj: Any, exc: BaseException) -> str:
    """Why the tensor ``obj`` could not be encoded (``exc``: what torch raised)."""
    layout = str(getattr(obj, "layout", "torch.strided")).replace("torch.", "")
    if layout != "strided":
        return f"cannot encode a {layout} tensor: only dense (strided) tensors go on the wire"
    if getattr(obj, "is_meta", False):
        return "cannot encode a tensor on the meta device: it has no data"
    first = str(exc).split("\n", 1)[0]  # torch may append its C++ stack
    return f"cannot encode {describe(obj)}: {type(exc).__name__}: {first}"


def encode(frame: Frame, *, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """The bytes of ``frame``. :class:`WireError` for what the format cannot carry (a dtype,
    a sparse or meta tensor, meta that is not JSON), :class:`OversizedFrame` for a frame of any
    type larger than ``max_frame``."""
    try:
        meta = json.dumps(frame.meta, separators=(",", ":"), allow_nan=False).encode() if frame.meta else b""
    except (TypeError, ValueError, RecursionError) as exc:  # not JSON, NaN, a cycle
        raise WireError(f"meta cannot be encoded as JSON: {exc}") from None
    if len(frame.tensors) > 0xFFFF:
        raise WireError("too many tensors in one frame")
    parts: list[Any] = [
        _HEADER.pack(MAGIC, VERSION, int(frame.type), frame.flags & 0xFF, len(frame.tensors), frame.request_id & (2**64 - 1), len(meta)),
        meta,
    ]
    total = HEADER_SIZE + len(meta)
    if total > max_frame:
        raise OversizedFrame(f"frame of at least {total} bytes exceeds the maximum frame size of {max_frame} bytes")
    for t in frame.tensors:
        name, shape, raw = _raw(t)
        if len(shape) > MAX_NDIM:
            raise WireError(f"tensor has {len(shape)} dimensions, the wire allows {MAX_NDIM}")
        parts.append(_TENSOR.pack(_CODE_BY_NAME[name], len(shape), 0, raw.nbytes))
        parts.append(struct.pack(f"<{len(shape)}Q", *shape))
        parts.append(raw)
        total += _TENSOR.size + 8 * len(shape) + raw.nbytes
        if total > max_frame:
            raise OversizedFrame(f"frame of at least {total} bytes exceeds the maximum frame size of {max_frame} bytes")
    return b"".join(parts)


_MAX_DIM = 2**63
_NP_DTYPES: dict[int, Any] = {}  # wire code -> little-endian numpy dtype, filled on first use


def _decode_tensor(buf: bytearray, offset: int, code: int, shape: tuple[int, ...], nbytes: int, as_numpy: bool) -> Any:
    name, size = _DTYPES[code]
    if name != "bfloat16":
        import numpy as np

        dt = _NP_DTYPES.get(code)
        if dt is None:
            dt = _NP_DTYPES[code] = np.dtype(name).newbyteorder("<")
        a = np.frombuffer(buf, dtype=dt, count=nbytes // size, offset=offset).reshape(shape)
        if as_numpy:
            return a
        import torch

        return torch.from_numpy(a)  # shares the frame's (writable) buffer, as frombuffer did
    if as_numpy:
        raise WireError("bfloat16 tensors cannot be decoded as numpy arrays")
    import torch

    if nbytes == 0:
        return torch.empty(shape, dtype=torch.bfloat16)
    return torch.frombuffer(buf, dtype=torch.bfloat16, count=nbytes // size, offset=offset).reshape(shape)


def decode(data: bytes | bytearray | memoryview, *, as_numpy: bool = False, max_frame: int = DEFAULT_MAX_FRAME) -> Frame:
    """Parse one frame. Raises :class:`WireError` on anything malformed."""
    n = len(data)
    if n > max_frame:
        raise OversizedFrame(f"frame of {n} bytes exceeds the maximum frame size of {max_frame} bytes")
    if n < HEADER_SIZE:
        raise WireError(f"frame of {n} bytes is shorter than the {HEADER_SIZE}-byte header")
    buf = data if isinstance(data, bytearray) else bytearray(data)
    magic, version, mtype, flags, ntensors, rid, meta_len = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        if bytes(buf[:11]) == b"#CHALLENGE#":
            raise WireError("peer sent an authentication challenge: it requires an authkey")
        raise WireError(f"bad magic {bytes(magic)!r} (not a splitlearn frame)")
    if version != VERSION:
        raise WireError(f"unsupported wire version {version} (this side speaks {VERSION})")
    msg_type = _MSG_TYPES.get(mtype)
    if msg_type is None:
        raise WireError(f"unknown message type {mtype}")
    try:
        meta, tensors = _decode_body(buf, n, ntensors, meta_len, as_numpy)
    except WireError as exc:
        exc.request_id = rid  # the header was read: whose frame it was is known
        raise
    return Frame(type=msg_type, request_id=rid, meta=meta, tensors=tensors, flags=flags)


def _decode_body(buf: bytearray, n: int, ntensors: int, meta_len: int, as_numpy: bool) -> tuple[dict[str, Any], list[Any]]:
    off = HEADER_SIZE
    if off + meta_len > n:
        raise WireError(f"meta length {meta_len} runs past the end of a {n}-byte frame")
    meta: dict[str, Any] = {}
    if meta_len:
        try:
            meta = json.loads(bytes(buf[off : off + meta_len]).decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError, an int past the digit limit
            raise WireError(f"meta is not valid UTF-8 JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise WireError(f"meta must be a JSON object, got {type(meta).__name__}")
    off += meta_len
    tensors = []
    for i in range(ntensors):
        if off + _TENSOR.size > n:
            raise WireError(f"tensor {i} header runs past the end of the frame")
        code, ndim, _reserved, nbytes = _TENSOR.unpack_from(buf, off)
        off += _TENSOR.size
        if code not in _DTYPES:
            raise WireError(f"tensor {i}: unknown dtype code {code}")
        if ndim > MAX_NDIM:
            raise WireError(f"tensor {i}: {ndim} dimensions, the wire allows {MAX_NDIM}")
        if off + 8 * ndim > n:
            raise WireError(f"tensor {i} shape runs past the end of the frame")
        shape = struct.unpack_from(f"<{ndim}Q", buf, off)
        off += 8 * ndim
        count = 1
        for s in shape:
            count *= s
        if count == 0 and ndim and max(shape) >= _MAX_DIM:  # an empty tensor; torch and numpy take signed 64-bit sizes
            raise WireError(f"tensor {i}: shape {list(shape)} has a dimension of 2**63 or more")
        if count * _DTYPES[code][1] != nbytes:
            raise WireError(f"tensor {i}: shape {list(shape)} of {_DTYPES[code][0]} needs {count * _DTYPES[code][1]} bytes, header says {nbytes}")
        if off + nbytes > n:
            raise WireError(f"tensor {i}: {nbytes} bytes run past the end of the frame")
        try:
            tensors.append(_decode_tensor(buf, off, code, shape, nbytes, as_numpy))
        except WireError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever numpy or torch refuse (an empty tensor of shape [2**62, 4, 0]...)
            first = str(exc).split("\n", 1)[0]  # torch appends its C++ stack
            raise WireError(f"tensor {i}: shape {list(shape)} cannot be built: {type(exc).__name__}: {first}") from None
        off += nbytes
    if off != n:
        raise WireError(f"{n - off} trailing bytes after the last tensor")
    return meta, tensors


MAX_ERROR_MESSAGE = 2000  # characters of an error frame's message
MAX_ECHO = 200  # characters of a peer's string quoted in an error message


def clip(value: Any, limit: int = MAX_ECHO) -> str:
    """``repr(value)``, cut to ``limit`` characters: for quoting what a peer sent (a model name,
    a session id) in an error message without echoing megabytes back."""
    r = repr(value)
    if len(r) <= limit:
        return r
    tail = f"... ({len(r)} characters)"
    return r[: max(0, limit - len(tail))] + tail


def error_frame(request_id: int, code: str, message: str) -> Frame:
    """An ERROR frame; a message longer than ``MAX_ERROR_MESSAGE`` characters is cut there."""
    code, message = str(code)[:100], str(message)
    if len(message) > MAX_ERROR_MESSAGE:
        message = f"{message[: MAX_ERROR_MESSAGE - 40]}... (cut from {len(message)} characters)"
    return Frame(MsgType.ERROR, request_id, {"error": code, "message": message})


def describe(t: Any) -> str:
    """'float32[2, 16]' for a tensor or array."""
    try:
        return f"{_dtype_name(t)}{list(int(s) for s in t.shape)}"
    except WireError:
        return f"{getattr(t, 'dtype', '?')}{list(getattr(t, 'shape', []))}"
