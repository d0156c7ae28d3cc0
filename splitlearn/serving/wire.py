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
:func:`decode` for any input.

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
    """A frame that does not follow the wire format (or exceeds the size limit)."""


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
        t = obj.detach() if obj.requires_grad else obj
        if not t.is_cpu:
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        if t.numel() == 0:
            return name, shape, memoryview(b"")
        if name != "bfloat16":  # numpy has no bfloat16
            try:
                return name, shape, memoryview(t.numpy()).cast("B")
            except RuntimeError:  # a view numpy() refuses (a lazy negation, say): the long way
                pass
        data = t.reshape(-1).view(__import__("torch").uint8).numpy()
        return name, shape, memoryview(data).cast("B")
    import numpy as np

    a = np.ascontiguousarray(obj)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big"):
        a = a.astype(a.dtype.newbyteorder("<"))
    return name, shape, memoryview(a.reshape(-1).view(np.uint8)).cast("B")


def encode(frame: Frame, *, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    meta = json.dumps(frame.meta, separators=(",", ":"), allow_nan=False).encode() if frame.meta else b""
    if len(frame.tensors) > 0xFFFF:
        raise WireError("too many tensors in one frame")
    parts: list[Any] = [
        _HEADER.pack(MAGIC, VERSION, int(frame.type), frame.flags & 0xFF, len(frame.tensors), frame.request_id & (2**64 - 1), len(meta)),
        meta,
    ]
    total = HEADER_SIZE + len(meta)
    for t in frame.tensors:
        name, shape, raw = _raw(t)
        if len(shape) > MAX_NDIM:
            raise WireError(f"tensor has {len(shape)} dimensions, the wire allows {MAX_NDIM}")
        parts.append(_TENSOR.pack(_CODE_BY_NAME[name], len(shape), 0, raw.nbytes))
        parts.append(struct.pack(f"<{len(shape)}Q", *shape))
        parts.append(raw)
        total += _TENSOR.size + 8 * len(shape) + raw.nbytes
        if total > max_frame:
            raise WireError(f"frame of at least {total} bytes exceeds the maximum frame size of {max_frame} bytes")
    return b"".join(parts)


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
        raise WireError(f"frame of {n} bytes exceeds the maximum frame size of {max_frame} bytes")
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
        if count * _DTYPES[code][1] != nbytes:
            raise WireError(f"tensor {i}: shape {list(shape)} of {_DTYPES[code][0]} needs {count * _DTYPES[code][1]} bytes, header says {nbytes}")
        if off + nbytes > n:
            raise WireError(f"tensor {i}: {nbytes} bytes run past the end of the frame")
        try:
            tensors.append(_decode_tensor(buf, off, code, shape, nbytes, as_numpy))
        except (ValueError, OverflowError, RuntimeError) as exc:  # e.g. an empty tensor of shape [2**62, 4, 0]
            raise WireError(f"tensor {i}: shape {list(shape)} cannot be built: {exc}") from None
        off += nbytes
    if off != n:
        raise WireError(f"{n - off} trailing bytes after the last tensor")
    return Frame(type=msg_type, request_id=rid, meta=meta, tensors=tensors, flags=flags)


def error_frame(request_id: int, code: str, message: str) -> Frame:
    return Frame(MsgType.ERROR, request_id, {"error": code, "message": message})


def describe(t: Any) -> str:
    """'float32[2, 16]' for a tensor or array."""
    try:
        return f"{_dtype_name(t)}{list(int(s) for s in t.shape)}"
    except WireError:
        return f"{getattr(t, 'dtype', '?')}{list(getattr(t, 'shape', []))}"
