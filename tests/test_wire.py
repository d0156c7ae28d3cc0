"""The serving wire format: round trips for every dtype, strict rejection of anything
malformed, and a fuzz check that decode raises nothing but WireError."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitlearn.serving import wire
from splitlearn.serving.wire import Frame, MsgType, WireError

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 5), (1, 2, 3, 4)])
def test_round_trip_every_dtype(dtype, shape):
    t = (torch.randn(shape) * 50).to(dtype)
    f = wire.decode(wire.encode(Frame(MsgType.REQUEST, 7, {"k": "v"}, [t])))
    assert f.type == MsgType.REQUEST and f.request_id == 7 and f.meta == {"k": "v"}
    out = f.tensor
    assert out.dtype == dtype and tuple(out.shape) == tuple(shape)
    assert torch.equal(out, t)


def test_non_contiguous_and_several_tensors():
    a = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()  # non-contiguous
    b = torch.tensor([[1, 2, 3]], dtype=torch.int64)
    f = wire.decode(wire.encode(Frame(MsgType.TRUNK, 2**64 - 1, {}, [a, b])))
    assert f.request_id == 2**64 - 1
    assert torch.equal(f.tensors[0], a) and torch.equal(f.tensors[1], b)


def test_numpy_in_and_out():
    a = np.arange(12, dtype=">f4").reshape(3, 4)  # big-endian input is converted
    f = wire.decode(wire.encode(Frame(MsgType.RESPONSE, 1, tensors=[a])), as_numpy=True)
    assert isinstance(f.tensor, np.ndarray) and f.tensor.dtype == np.float32
    np.testing.assert_array_equal(f.tensor, a.astype("<f4"))
    with pytest.raises(WireError, match="bfloat16"):
        wire.decode(wire.encode(Frame(MsgType.RESPONSE, 1, tensors=[torch.zeros(2, dtype=torch.bfloat16)])), as_numpy=True)


def test_unsupported_dtype_and_non_tensor_rejected():
    with pytest.raises(WireError, match="complex64"):
        wire.encode(Frame(MsgType.REQUEST, 1, tensors=[torch.zeros(2, dtype=torch.complex64)]))
    with pytest.raises(WireError, match="not a tensor"):
        wire.encode(Frame(MsgType.REQUEST, 1, tensors=[[1, 2]]))


def test_size_limit_both_ways():
    t = torch.zeros(1000, dtype=torch.float32)
    with pytest.raises(WireError, match="exceeds the maximum frame size"):
        wire.encode(Frame(MsgType.REQUEST, 1, tensors=[t]), max_frame=2000)
    data = wire.encode(Frame(MsgType.REQUEST, 1, tensors=[t]))
    with pytest.raises(WireError, match="exceeds the maximum frame size"):
        wire.decode(data, max_frame=len(data) - 1)


def _good() -> bytes:
    return wire.encode(Frame(MsgType.REQUEST, 5, {"m": 1}, [torch.ones(2, 3)]))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b"XYZ" + b[3:], "bad magic"),
        (lambda b: b[:3] + bytes([99]) + b[4:], "unsupported wire version"),
        (lambda b: b[:4] + bytes([200]) + b[5:], "unknown message type"),
        (lambda b: b[:10], "shorter than"),
        (lambda b: b + b"\x00", "trailing bytes"),
        (lambda b: b[:-1], "past the end"),
        (lambda b: b[:16] + struct.pack("<I", 10_000) + b[20:], "meta length"),
        (lambda b: b[:20] + b"[1,2,3]" + b[27:], "JSON object"),
        (lambda b: b[:20] + b"\xff" * 7 + b[27:], "not valid UTF-8 JSON"),
        (lambda b: b[:27] + bytes([77]) + b[28:], "unknown dtype code"),
        (lambda b: b[:28] + bytes([9]) + b[29:], "dimensions"),
        (lambda b: b[:31] + struct.pack("<Q", 20) + b[39:], "needs 24 bytes"),
        (lambda b: b"#CHALLENGE#" + b"\x00" * 20, "requires an authkey"),
    ],
)
def test_malformed_frames_rejected(mutate, match):
    data = _good()
    assert wire.decode(data).meta == {"m": 1}
    with pytest.raises(WireError, match=match):
        wire.decode(mutate(data))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_only_wire_error(data):
    try:
        wire.decode(data)
    except WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=60), st.integers(min_value=0, max_value=255))
def test_fuzz_byte_flips_only_wire_error(pos, value):
    data = bytearray(_good())
    data[pos % len(data)] = value
    try:
        f = wire.decode(bytes(data))
    except WireError:
        return
    # a flip that still parses must still describe a consistent frame
    for t in f.tensors:
        assert t.numel() * t.element_size() <= len(data)


@pytest.mark.parametrize("as_numpy", [False, True])
def test_what_numpy_and_json_refuse_is_a_wire_error(as_numpy):
    """Frames that pass every size check and still cannot be built: an empty tensor whose shape's
    product overflows before it reaches the 0, meta with an integer past Python's digit limit.
    The server answers a WireError on that connection; anything else ended its thread."""
    empty = bytearray(wire.encode(Frame(MsgType.REQUEST, 1, {}, [np.zeros((2, 4, 0), dtype=np.float32)])))
    at = empty.find(struct.pack("<3Q", 2, 4, 0))
    empty[at : at + 8] = struct.pack("<Q", 2**62)
    with pytest.raises(WireError, match="cannot be built"):
        wire.decode(empty, as_numpy=as_numpy)
    meta = b'{"a":' + b"1" * 5000 + b"}"
    digits = wire._HEADER.pack(wire.MAGIC, wire.VERSION, int(MsgType.REQUEST), 0, 0, 1, len(meta)) + meta
    with pytest.raises(WireError, match="not valid UTF-8 JSON"):
        wire.decode(digits, as_numpy=as_numpy)
