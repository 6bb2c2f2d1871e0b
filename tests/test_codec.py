"""The tensor codec: exact round trips, bounded int8 error, and every kind of bad input refused."""

from __future__ import annotations

import struct

import msgpack
import pytest
import torch
import zstandard

from splitft.shared.errors import ConfigError, WireError
from splitft.shared.wire.codec import (
    FLOAT_WIRE_DTYPES,
    Limits,
    decode_state,
    decode_tensor,
    encode_state,
    encode_tensor,
    pack,
    unpack,
)

ODD_SHAPES = [(), (1,), (0,), (3, 0, 5), (7,), (2, 3, 5), (1, 1, 1, 1, 9), (4, 13, 33)]


def roundtrip(t: torch.Tensor, wire: str, **kwargs: object) -> torch.Tensor:
    return decode_tensor(unpack(pack(encode_tensor(t, wire))), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("wire", ["fp32", "fp16", "bf16"])
def test_plain_float_roundtrip_equals_cast(shape: tuple[int, ...], wire: str) -> None:
    t = torch.randn(shape) * 3
    cast = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[wire]
    out = roundtrip(t, wire, expect_shape=list(shape), out_dtype=None)
    assert out.dtype == cast and out.shape == t.shape
    assert torch.equal(out, t.to(cast))  # bit-exact: the wire loses only what the cast loses


@pytest.mark.parametrize("shape", [s for s in ODD_SHAPES if s], ids=str)
def test_int8_error_is_bounded_per_token(shape: tuple[int, ...]) -> None:
    t = torch.randn(shape) * torch.logspace(-3, 3, shape[-1] or 1)[: shape[-1]]
    out = roundtrip(t, "int8", expect_shape=list(shape))
    assert out.shape == t.shape and out.dtype == torch.float32
    if t.numel():
        absmax = t.abs().amax(dim=-1, keepdim=True)
        # Symmetric rounding: each element is within half a quantisation step of the truth.
        assert bool(((out - t).abs() <= absmax / 254 * (1 + 1e-5) + 1e-12).all())


def test_int8_relative_error_on_activation_like_data() -> None:
    t = torch.randn(8, 64, 128)
    out = roundtrip(t, "int8")
    assert (out - t).norm() / t.norm() < 0.01


def test_int8_zero_rows_and_bytes() -> None:
    t = torch.zeros(3, 16)
    assert torch.equal(roundtrip(t, "int8"), t)
    fp32 = len(pack(encode_tensor(torch.randn(64, 128), "fp32"), level=1))
    int8 = len(pack(encode_tensor(torch.randn(64, 128), "int8"), level=1))
    assert fp32 / int8 > 3.5


@pytest.mark.parametrize("wire", ["int32", "int64"])
def test_integer_roundtrip_exact(wire: str) -> None:
    t = torch.randint(-1000, 50000, (5, 7))
    assert torch.equal(roundtrip(t, wire, out_dtype=None), t)


def test_encode_refuses_wrong_kinds() -> None:
    with pytest.raises(ConfigError):
        encode_tensor(torch.randn(3), "int32")
    with pytest.raises(ConfigError):
        encode_tensor(torch.arange(3), "fp16")
    with pytest.raises(ConfigError):
        encode_tensor(torch.tensor([2**40]), "int32")
    with pytest.raises(ConfigError):
        encode_tensor(torch.randn(3), "fp8")


def test_state_roundtrip_and_expected_names() -> None:
    state = {"a.lora_A.weight": torch.randn(4, 10), "a.lora_B.weight": torch.randn(10, 4)}
    shapes = {n: list(t.shape) for n, t in state.items()}
    out = decode_state(unpack(pack(encode_state(state))), expect=shapes)
    assert all(torch.equal(out[n], state[n]) for n in state)
    with pytest.raises(WireError, match="names differ"):
        decode_state(unpack(pack(encode_state(state))), expect={"a.lora_A.weight": [4, 10]})
    with pytest.raises(WireError, match=r"a.lora_B.weight.*does not match"):
        decode_state(unpack(pack(encode_state(state))), expect={**shapes, "a.lora_B.weight": [10, 8]})


# --------------------------------------------------------------------------- hostile input


def good() -> dict:
    return encode_tensor(torch.randn(2, 3, 4), "fp16")


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m: {**m, "dtype": "float64"}, "bad_dtype"),
        (lambda m: {**m, "dtype": 3}, "bad_dtype"),
        (lambda m: {**m, "shape": [2, 3, 5]}, "bad_shape"),  # declared shape does not match the bytes
        (lambda m: {**m, "shape": [2, -3, -4]}, "bad_shape"),
        (lambda m: {**m, "shape": "2,3,4"}, "bad_shape"),
        (lambda m: {**m, "shape": [1] * 9 + [24]}, "bad_shape"),
        (lambda m: {**m, "shape": [2, 3, 4.0]}, "bad_shape"),
        (lambda m: {**m, "data": m["data"][:-2]}, "bad_shape"),  # truncated tensor data
        (lambda m: {**m, "data": "text"}, "bad_schema"),
        (lambda m: {**m, "extra": 1}, "bad_schema"),
        (lambda m: {k: v for k, v in m.items() if k != "data"}, "bad_schema"),
        (lambda m: [m], "bad_schema"),
        (lambda m: {**m, "dtype": "int8"}, "bad_schema"),  # int8 without its scale
    ],
)
def test_malformed_tensor_maps(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WireError) as info:
        decode_tensor(unpack(pack(mutate(good()))))
    assert info.value.reason == reason


def test_expected_shape_and_dtype_are_enforced() -> None:
    msg = unpack(pack(good()))
    with pytest.raises(WireError, match="does not match the expected"):
        decode_tensor(msg, expect_shape=[2, 3, 5])
    with pytest.raises(WireError, match="does not match the expected"):
        decode_tensor(msg, expect_shape=[2, 12])
    assert decode_tensor(msg, expect_shape=[None, 3, 4]).shape == (2, 3, 4)
    with pytest.raises(WireError) as info:
        decode_tensor(msg, expect_dtypes=["fp32"])
    assert info.value.reason == "bad_dtype"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("wire", FLOAT_WIRE_DTYPES)
def test_nonfinite_values_refused(wire: str, bad: float) -> None:
    t = torch.randn(3, 4)
    t[1, 2] = bad
    if wire == "int8":  # NaN/Inf can only reach an int8 tensor through its scale
        m = encode_tensor(torch.randn(3, 4), "int8")
        m["scale"] = torch.tensor([1.0, bad, 1.0]).numpy().tobytes()
    else:
        m = encode_tensor(t, wire)
    with pytest.raises(WireError) as info:
        decode_tensor(unpack(pack(m)))
    assert info.value.reason == "nonfinite"
    if wire != "int8":
        assert torch.isnan(decode_tensor(m, allow_nonfinite=True)).any() == (bad != bad)


def test_truncated_and_corrupt_payloads() -> None:
    payload = pack({"t": encode_tensor(torch.randn(64, 64), "fp32")})
    for cut in (0, 1, 5, len(payload) // 2, len(payload) - 1):
        with pytest.raises(WireError) as info:
            unpack(payload[:cut])
        assert info.value.reason == "bad_compression"
    with pytest.raises(WireError):
        unpack(b"not zstd at all")
    # A valid zstd frame holding invalid msgpack.
    with pytest.raises(WireError) as info:
        unpack(zstandard.ZstdCompressor().compress(b"\xc1\xc1\xc1"))
    assert info.value.reason == "bad_msgpack"
    # Valid msgpack followed by trailing bytes.
    with pytest.raises(WireError) as info:
        unpack(zstandard.ZstdCompressor().compress(msgpack.packb(1) + b"\x01"))
    assert info.value.reason == "bad_msgpack"
    with pytest.raises(WireError) as info:
        unpack("a string")  # type: ignore[arg-type]
    assert info.value.reason == "bad_schema"


def test_zstd_bomb_is_refused_without_allocating() -> None:
    """A 1 GiB frame of zeros compresses to ~32 KB; its declared size must be refused up front."""
    import tracemalloc

    size = 1 << 30
    cctx = zstandard.ZstdCompressor(level=1)
    chunk = bytes(16 << 20)
    sink = _Sink()
    with cctx.stream_writer(sink, size=size) as writer:  # declares the content size, like a bomb would
        for _ in range(size // len(chunk)):
            writer.write(chunk)
    bomb = b"".join(sink.parts)
    assert len(bomb) < 64 << 10 and zstandard.frame_content_size(bomb) == size

    tracemalloc.start()
    with pytest.raises(WireError) as info:
        unpack(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert info.value.reason == "too_large"
    assert peak < 8 << 20  # nothing near the declared 1 GiB was allocated

    # A frame that hides its size is streamed, one step at a time, and refused at the cap.
    sink = _Sink()
    with cctx.stream_writer(sink) as writer:  # no size given: none declared
        for _ in range(size // len(chunk)):
            writer.write(chunk)
    hidden = b"".join(sink.parts)
    assert zstandard.frame_content_size(hidden) == -1
    tracemalloc.start()
    with pytest.raises(WireError) as info:
        unpack(hidden, cap=4 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert info.value.reason == "too_large" and "without a declared size" in info.value.detail
    assert peak < 8 << 20


def test_size_limits() -> None:
    limits = Limits(max_compressed_bytes=1000, max_decoded_bytes=10_000, max_items=10, max_str_len=8)
    with pytest.raises(WireError, match="compressed bytes"):
        unpack(pack(torch.randn(1000).numpy().tobytes()), limits)
    with pytest.raises(WireError, match="declares"):
        unpack(pack(bytes(20_000)), limits)
    with pytest.raises(WireError) as info:
        unpack(pack(list(range(11))), limits)
    assert info.value.reason == "bad_msgpack"
    with pytest.raises(WireError):
        unpack(pack("x" * 9), limits)
    assert unpack(pack(list(range(10))), limits) == list(range(10))
    with pytest.raises(ConfigError, match="max_items"):
        Limits(max_items=0)


class _Sink:
    """A write target that keeps the compressed bytes (the stream writer closes it at the end)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- regressions found by tests/test_fuzz.py


def test_bytes_after_the_frame_are_refused() -> None:
    """A frame followed by anything (garbage, another frame, a skippable frame) was decoded as if alone;
    so was a frame whose checksum flag a flipped bit had cleared (its checksum then trailed the frame)."""
    frame = pack({"x": list(range(100))})
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"skip"
    cleared = bytearray(frame)
    cleared[4] ^= 0x04  # the frame header's Content_Checksum_flag
    for payload in (frame + b"\x00", frame + frame, frame + skippable, skippable + frame, bytes(cleared)):
        with pytest.raises(WireError) as info:
            unpack(payload)
        assert info.value.reason == "bad_compression"


@pytest.mark.parametrize("ext", [b"\xc7\x00\x05", b"\xc8\x00\x00\x05", b"\xd4\x01\x00", b"\xd6\xff\x00\x00\x00\x01"])
def test_ext_types_are_refused_even_empty(ext: bytes) -> None:
    """``max_ext_len=0`` let an ext of length 0 through as an ``ExtType`` object."""
    raw = msgpack.packb({"a": b"PLACEHOLDER"}).replace(msgpack.packb(b"PLACEHOLDER"), ext)
    with pytest.raises(WireError) as info:
        unpack(zstandard.ZstdCompressor().compress(raw))
    assert info.value.reason == "bad_msgpack"


@pytest.mark.parametrize("shape", [[0, 2**64 - 1], [0, 2**63], [2**31, 0], [0, 2**40, 128]], ids=str)
def test_empty_tensors_with_huge_dims_are_refused(shape: list[int]) -> None:
    """No data length can check the dims of an empty tensor: ``[0, 2**64 - 1]`` raised TypeError in torch."""
    with pytest.raises(WireError) as info:
        decode_tensor(unpack(pack({"dtype": "fp32", "shape": shape, "data": b""})))
    assert info.value.reason == "bad_shape"


def test_error_messages_of_hostile_values_stay_small() -> None:
    """The repr of a deep value raised RecursionError; that of megabytes of bytes was four times their size."""
    deep: object = 0
    for _ in range(1010):
        deep = [deep]
    for field, value in [("dtype", deep), ("shape", deep), ("dtype", bytes(8 << 20)), ("shape", bytes(8 << 20))]:
        tensor = {**good(), field: value}
        with pytest.raises(WireError) as info:
            decode_tensor(unpack(pack(tensor)))
        assert len(str(info.value)) < 300


def test_states_hold_floating_tensors_only() -> None:
    """An adapter state of int32 tensors (the same byte length as fp32) decoded, as int64 weights."""
    state = {"a.lora_A.weight": torch.arange(40).reshape(4, 10)}
    encoded = unpack(pack({n: encode_tensor(t, "int32") for n, t in state.items()}))
    with pytest.raises(WireError) as info:
        decode_state(encoded, expect={"a.lora_A.weight": [4, 10]})
    assert info.value.reason == "bad_dtype"
    assert torch.equal(decode_state(encoded, expect_dtypes=None)["a.lora_A.weight"], state["a.lora_A.weight"])


def test_frames_claiming_more_than_they_hold_allocate_no_more_than_they_hold() -> None:
    """The one-shot decompressor allocates what a frame declares: a 45-byte frame declaring 256 MiB (the
    limit) cost 256 MiB. Such frames are now streamed first; real, highly compressible content still decodes."""
    import tracemalloc

    liar = b"\x28\xb5\x2f\xfd\xe0" + (256 << 20).to_bytes(8, "little") + (1 | 2 << 1 | 1024 << 3).to_bytes(3, "little")
    liar += b"\x00"  # one RLE block: 1 KiB of zeros, where 256 MiB were declared
    tracemalloc.start()
    with pytest.raises(WireError) as info:
        unpack(liar)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert info.value.reason == "bad_compression" and peak < 8 << 20
    zeros = pack(bytes(32 << 20))  # 32 MiB in a few kB: streamed, then decoded
    assert len(zeros) < 64 << 10 and unpack(zeros) == bytes(32 << 20)
