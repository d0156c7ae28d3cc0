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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64], ids=str)
def test_a_lazy_negation_is_sent_as_its_values(dtype):
    """A tensor whose negation is still lazy (the negative bit: torch._neg_view, what some ops
    return) is refused by numpy() and by a byte view: it used to raise RuntimeError out of encode,
    which in the server ended the batch loop. Its values go on the wire."""
    t = torch._neg_view(torch.ones(2, 3, dtype=dtype))
    assert t.is_neg()
    out = wire.decode(wire.encode(Frame(MsgType.RESPONSE, 1, tensors=[t]))).tensor
    assert out.dtype == dtype and torch.equal(out, -torch.ones(2, 3, dtype=dtype))
    strided = torch._neg_view(torch.arange(6, dtype=torch.float32).reshape(2, 3).t())
    assert torch.equal(wire.decode(wire.encode(Frame(MsgType.RESPONSE, 1, tensors=[strided]))).tensor, -torch.arange(6.0).reshape(2, 3).t())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: torch.eye(3).to_sparse(), "sparse_coo"),
        (lambda: torch.eye(3).to_sparse_csr(), "sparse_csr"),
        (lambda: torch.empty(2, 3, device="meta"), "meta device"),
    ],
    ids=["sparse_coo", "sparse_csr", "meta"],
)
def test_tensors_without_dense_bytes_are_wire_errors(make, match):
    """A sparse tensor, or one on the meta device, made encode raise RuntimeError or
    NotImplementedError (the server's batch loop then died): now a WireError that says why."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that sparse CSR is in beta
        t = make()
    with pytest.raises(WireError, match=match):
        wire.encode(Frame(MsgType.RESPONSE, 1, tensors=[t]))


def test_a_tensor_torch_cannot_read_is_a_wire_error(monkeypatch):
    """Whatever torch raises while handing over a tensor's bytes comes out of encode as a
    WireError (the server turns that into an error answer to that request)."""
    t = torch.ones(2, 3)
    monkeypatch.setattr(torch.Tensor, "numpy", lambda self: (_ for _ in ()).throw(NotImplementedError("no data")))
    with pytest.raises(WireError, match="NotImplementedError: no data"):
        wire.encode(Frame(MsgType.RESPONSE, 1, tensors=[t]))


@pytest.mark.parametrize("code", [1, 4], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_an_empty_tensor_with_a_dimension_past_int64_is_a_wire_error(code, as_numpy):
    """A dimension of 2**63 or more, and a 0 beside it: the byte count (0) matches, and torch.empty
    then raised TypeError (it takes signed 64-bit sizes), which escaped decode."""
    data = wire._HEADER.pack(wire.MAGIC, wire.VERSION, int(MsgType.REQUEST), 0, 1, 1, 0) + wire._TENSOR.pack(code, 2, 0, 0) + struct.pack("<2Q", 2**63, 0)
    with pytest.raises(WireError, match="2\\*\\*63") as e:
        wire.decode(data, as_numpy=as_numpy)
    assert e.value.request_id == 1


def test_a_wire_error_after_the_header_carries_the_request_id():
    data = bytearray(_good())
    data[27] = 77  # unknown dtype code
    with pytest.raises(WireError) as e:
        wire.decode(bytes(data))
    assert e.value.request_id == 5
    with pytest.raises(WireError) as e:
        wire.decode(b"XYZ" + bytes(data[3:]))
    assert e.value.request_id is None  # the header itself is bad: whose it is is unknown


def test_size_limit_applies_to_frames_without_tensors():
    """An error, stats or model-list frame (meta only) was never checked against max_frame."""
    big = wire.error_frame(1, "bad_input", "x" * 10_000)
    assert len(big.meta["message"]) <= wire.MAX_ERROR_MESSAGE  # cut to a sane length
    assert len(wire.encode(big)) < 2 * wire.MAX_ERROR_MESSAGE
    stats = Frame(MsgType.STATS_REPLY, 1, {"k": "v" * 5000})
    with pytest.raises(wire.OversizedFrame, match="maximum frame size of 1000"):
        wire.encode(stats, max_frame=1000)
    assert wire.decode(wire.encode(stats, max_frame=6000)).meta == stats.meta


def test_clip_quotes_a_peers_string_at_a_sane_length():
    assert wire.clip("gpt2") == "'gpt2'"
    long = wire.clip("a" * 100_000)
    assert len(long) <= wire.MAX_ECHO and long.endswith("(100002 characters)")


_DIMS = st.sampled_from([0, 1, 2, 3, 2**31, 2**62, 2**63 - 1, 2**63, 2**64 - 1])


@st.composite
def _tensor_records(draw):
    # bfloat16 (4) is built by torch, every other dtype by numpy: drawn as often as all of those
    code = draw(st.sampled_from([*sorted(wire._DTYPES), *[4] * 8, 0, 255]))
    # any rank; or an empty tensor whose other dimensions run to the top of int64 and past it
    shape = draw(st.one_of(st.lists(_DIMS, max_size=wire.MAX_NDIM + 1), st.lists(st.sampled_from([0, 2**63 - 1, 2**63, 2**64 - 1]), min_size=2, max_size=3)))
    size = wire._DTYPES.get(code, ("", 1))[1]
    count = 1
    for s in shape:
        count *= s
    exact = count * size
    # mostly the byte count the shape needs: only those frames get as far as building the tensor
    nbytes = draw(st.sampled_from([exact, exact, exact, 1, 2**64 - 1]) if exact < 2**64 else st.sampled_from([0, 8, 2**64 - 1]))
    body = draw(st.binary(max_size=64)) if draw(st.booleans()) else b"\x00" * min(nbytes, 64)
    return wire._TENSOR.pack(code, len(shape) % 256, 0, nbytes) + struct.pack(f"<{len(shape)}Q", *shape) + body


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(sorted(int(m) for m in MsgType)),
    st.one_of(st.just(b""), st.just(b'{"m":1}'), st.binary(max_size=16)),
    st.lists(_tensor_records(), max_size=3),
    st.integers(0, 3),
    st.booleans(),
)
def test_fuzz_structured_frames_only_wire_error(mtype, meta, records, claimed_extra, as_numpy):
    """Frames that get past the header (valid magic, version and type) with tensor records of any
    dtype code, rank and shape (dimensions of 0 beside ones past 2**63 included) and byte counts
    that match or not: decode returns a frame or raises WireError, nothing else."""
    n = max(0, len(records) + claimed_extra - 1)
    data = wire._HEADER.pack(wire.MAGIC, wire.VERSION, mtype, 0, n, 3, len(meta)) + meta + b"".join(records)
    try:
        f = wire.decode(data, as_numpy=as_numpy)
    except WireError:
        return
    for t in f.tensors:  # what parsed describes no more bytes than the frame has
        assert (t.nbytes if as_numpy else t.numel() * t.element_size()) <= len(data)
