"""Tensor codec: tensors and named tensor states <-> msgpack objects, and msgpack <-> zstd bytes.

Pure and synchronous; no network here. Everything that decodes treats its input as hostile:

* Never pickle and never ``torch.load`` wire bytes: both execute code chosen by the sender.
* Sizes are bounded before anything is allocated: the compressed length, the size a zstd frame
  declares (``zstandard``'s one-shot ``max_output_size`` is ignored when the frame declares its own
  content size, so the declared size itself is checked against the receiver's cap), and every msgpack
  length. A frame that declares no size is decompressed by a stream that stops at the cap. A frame that
  declares far more than its compressed size suggests must prove it by streaming (1 MiB at a time)
  before that much is allocated: a flipped bit in a size field must not cost hundreds of megabytes.
* Tensors are checked against a dtype whitelist, their byte length against their declared shape,
  and that shape against the one the caller expects. Non-finite values are refused by default.

Every refusal raises :class:`~splitft.shared.errors.WireError` with a stable ``reason`` code.

A tensor travels as a msgpack map ``{"dtype": str, "shape": [int, ...], "data": bin}``; the ``int8``
wire type adds ``"scale": bin`` with one float32 absmax scale per token (per row of the last dim).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch
import zstandard

from splitft.shared.errors import ConfigError, Refusal, WireError

#: Wire dtypes for floating-point tensors (activations, gradients, adapters). ``int8`` is
#: quantised with a per-token absmax scale; the others are plain casts.
FLOAT_WIRE_DTYPES = ("fp32", "fp16", "bf16", "int8")
#: Wire dtypes for integer tensors (token ids, labels, lengths); always exact.
INT_WIRE_DTYPES = ("int32", "int64")
WIRE_DTYPES = FLOAT_WIRE_DTYPES + INT_WIRE_DTYPES

_PLAIN: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
}
_ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int32": 4, "int64": 8}
_TENSOR_KEYS = frozenset({"dtype", "shape", "data"})
_INT8_KEYS = _TENSOR_KEYS | {"scale"}
_MAX_DIMS = 8
#: Larger than any real dimension (256 MiB hold 2**28 one-byte values); bounds the dims of empty
#: tensors, which no data length checks (``[0, 2**64 - 1]`` overflowed torch's reshape).
_MAX_DIM = 1 << 31


@dataclass(frozen=True)
class Limits:
    """Upper bounds applied to every decoded message."""

    max_compressed_bytes: int = 64 << 20  # what we accept off the wire, before decompression
    max_decoded_bytes: int = 256 << 20  # what a frame may expand to
    max_items: int = 100_000  # entries in any msgpack array or map
    max_str_len: int = 4096  # any msgpack string (names, ids)

    def __post_init__(self) -> None:
        for name in ("max_compressed_bytes", "max_decoded_bytes", "max_items", "max_str_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"Limits.{name} must be positive, got {getattr(self, name)}")


DEFAULT_LIMITS = Limits()


def wire_bytes_per_element(wire_dtype: str, last_dim: int) -> float:
    """Bytes on the wire per element before compression (int8 includes its per-token scale)."""
    _check_wire_dtype(wire_dtype)
    if wire_dtype == "int8":
        return 1.0 + 4.0 / last_dim
    return float(_ITEMSIZE[wire_dtype])


# --------------------------------------------------------------------------- tensors


def encode_tensor(tensor: torch.Tensor, wire_dtype: str = "fp16") -> dict[str, Any]:
    """Turn a tensor into a msgpack-ready map in ``wire_dtype``.

    Floating tensors may use any of :data:`FLOAT_WIRE_DTYPES`; integer tensors use ``int32`` or
    ``int64`` (exact; a value that does not fit is a ``ConfigError``).
    """
    _check_wire_dtype(wire_dtype)
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    shape = list(t.shape)
    if wire_dtype in INT_WIRE_DTYPES:
        if t.is_floating_point() or t.is_complex():
            raise ConfigError(f"wire dtype {wire_dtype} is for integer tensors, got {t.dtype}")
        info = torch.iinfo(_PLAIN[wire_dtype])
        if t.numel() and (int(t.min()) < info.min or int(t.max()) > info.max):
            raise ConfigError(f"tensor values do not fit wire dtype {wire_dtype}")
        return {"dtype": wire_dtype, "shape": shape, "data": _raw_bytes(t.to(_PLAIN[wire_dtype]))}
    if not t.is_floating_point():
        raise ConfigError(f"wire dtype {wire_dtype} is for floating tensors, got {t.dtype}")
    if wire_dtype == "int8":
        q, scale = quantize_int8(t)
        return {"dtype": "int8", "shape": shape, "data": _raw_bytes(q), "scale": _raw_bytes(scale)}
    return {"dtype": wire_dtype, "shape": shape, "data": _raw_bytes(t.to(_PLAIN[wire_dtype]))}


def decode_tensor(
    obj: Any,
    *,
    expect_shape: Sequence[int | None] | None = None,
    expect_dtypes: Sequence[str] | None = None,
    out_dtype: torch.dtype | None = torch.float32,
    allow_nonfinite: bool = False,
) -> torch.Tensor:
    """Validate a map produced by :func:`encode_tensor` and rebuild the tensor.

    ``expect_shape`` lists the dimensions the caller asked for (``None`` = any size); the number of
    dimensions must match too. ``expect_dtypes`` restricts the accepted wire dtypes. Floating
    tensors are returned as ``out_dtype`` (``None`` keeps the wire dtype; int8 always dequantises
    to float32 first). Integer tensors are returned as int64.
    """
    if not isinstance(obj, dict):
        raise WireError(Refusal.BAD_SCHEMA, f"tensor must be a map, got {type(obj).__name__}")
    wire = obj.get("dtype")
    if not isinstance(wire, str) or wire not in WIRE_DTYPES:
        raise WireError(Refusal.BAD_DTYPE, f"unknown wire dtype {_brief(wire)}")
    if expect_dtypes is not None and wire not in expect_dtypes:
        raise WireError(
            Refusal.BAD_DTYPE, f"wire dtype {wire} not accepted here (expected one of {list(expect_dtypes)})"
        )
    keys = set(obj)
    wanted = _INT8_KEYS if wire == "int8" else _TENSOR_KEYS
    if keys != wanted:
        raise WireError(Refusal.BAD_SCHEMA, f"tensor keys {sorted(keys)} != {sorted(wanted)}")
    shape = _check_shape(obj["shape"], expect_shape)
    data = obj["data"]
    if not isinstance(data, bytes):
        raise WireError(Refusal.BAD_SCHEMA, f"tensor data must be bytes, got {type(data).__name__}")
    numel = math.prod(shape)
    if len(data) != numel * _ITEMSIZE[wire]:
        raise WireError(
            Refusal.BAD_SHAPE,
            f"{len(data)} data bytes do not match shape {shape} of {wire} ({numel * _ITEMSIZE[wire]})",
        )

    if wire in INT_WIRE_DTYPES:
        return _from_bytes(data, _PLAIN[wire], shape).to(torch.int64)
    if wire == "int8":
        if not shape:
            raise WireError(Refusal.BAD_SHAPE, "int8 tensors need at least one dimension")
        scale_raw = obj["scale"]
        rows = math.prod(shape[:-1])
        if not isinstance(scale_raw, bytes) or len(scale_raw) != rows * 4:
            raise WireError(Refusal.BAD_SHAPE, f"int8 scale must be {rows} float32 values")
        scale = _from_bytes(scale_raw, torch.float32, shape[:-1])
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise WireError(Refusal.NONFINITE, "int8 scale has negative or non-finite values")
        q = _from_bytes(data, torch.int8, shape)
        t = dequantize_int8(q, scale)
    else:
        t = _from_bytes(data, _PLAIN[wire], shape)
        if not allow_nonfinite and not bool(torch.isfinite(t).all()):
            raise WireError(Refusal.NONFINITE, f"tensor of shape {shape} holds NaN or Inf")
    return t if out_dtype is None else t.to(out_dtype)


def quantize_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation with one absmax scale per token (row of the last dim).

    Each element's error is at most ``scale / 2 = absmax(row) / 254``.
    """
    if t.dim() == 0:
        raise ConfigError("int8 wire dtype needs a tensor with at least one dimension")
    x = t.float()
    absmax = x.abs().amax(dim=-1, keepdim=True) if x.shape[-1] else x.new_zeros(*x.shape[:-1], 1)
    scale = absmax / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe).clamp_(-127, 127).to(torch.int8)
    return q, scale.squeeze(-1)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_int8` (up to its rounding error)."""
    return q.float() * scale.unsqueeze(-1)


# --------------------------------------------------------------------------- named states


def encode_state(state: Mapping[str, torch.Tensor], wire_dtype: str = "fp32") -> dict[str, Any]:
    """Encode a dict of named floating tensors (e.g. LoRA adapter weights)."""
    return {name: encode_tensor(t, wire_dtype) for name, t in state.items()}


def decode_state(
    obj: Any,
    *,
    expect: Mapping[str, Sequence[int]] | None = None,
    expect_dtypes: Sequence[str] | None = FLOAT_WIRE_DTYPES,
    out_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Decode :func:`encode_state` output.

    With ``expect`` (name -> shape) the names must match exactly and every shape must agree. States
    are floating tensors (adapter weights): integer wire dtypes are refused unless ``expect_dtypes``
    says otherwise (``None`` accepts any).
    """
    if not isinstance(obj, dict):
        raise WireError(Refusal.BAD_SCHEMA, f"state must be a map, got {type(obj).__name__}")
    if expect is not None and set(obj) != set(expect):
        missing = sorted(set(expect) - set(obj))[:3]
        extra = sorted(map(str, set(obj) - set(expect)))[:3]
        raise WireError(
            Refusal.BAD_SCHEMA, f"state names differ from those expected (missing {missing}, extra {extra})"
        )
    out: dict[str, torch.Tensor] = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise WireError(Refusal.BAD_SCHEMA, f"state names must be strings, got {type(name).__name__}")
        shape = None if expect is None else list(expect[name])
        try:
            out[name] = decode_tensor(value, expect_shape=shape, expect_dtypes=expect_dtypes, out_dtype=out_dtype)
        except WireError as exc:
            raise WireError(exc.reason, f"{name}: {exc.detail}") from exc
    return out


# --------------------------------------------------------------------------- bytes


def pack(obj: Any, level: int = 1) -> bytes:
    """msgpack + zstd. The zstd frame always declares its content size (:func:`unpack` needs it) and
    carries a checksum of the content, so that a corrupted frame is refused rather than misread."""
    return compress(msgpack.packb(obj, use_bin_type=True), level)


def compress(raw: bytes, level: int = 1) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True).compress(raw)


def declared_size(data: bytes, limits: Limits = DEFAULT_LIMITS) -> int | None:
    """The bytes the zstd frame ``data`` says it decompresses to, read from its header alone (nothing is
    decompressed), after the checks :func:`unpack` makes first: bytes, within ``limits``. None: the frame
    declares no size (our encoders always declare it; such a frame is decompressed by a capped stream)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(Refusal.BAD_SCHEMA, f"payload must be bytes, got {type(data).__name__}")
    if len(data) > limits.max_compressed_bytes:
        raise WireError(Refusal.TOO_LARGE, f"{len(data)} compressed bytes > limit {limits.max_compressed_bytes}")
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise WireError(Refusal.BAD_COMPRESSION, f"not a zstd frame ({exc})") from exc
    if declared < 0:
        return None
    if declared > limits.max_decoded_bytes:
        raise WireError(Refusal.TOO_LARGE, f"frame declares {declared} bytes > limit {limits.max_decoded_bytes}")
    return int(declared)


def unpack(data: bytes, limits: Limits = DEFAULT_LIMITS, *, cap: int | None = None) -> Any:
    """Inverse of :func:`pack`, bounded by ``limits`` (and ``cap``, the most bytes this frame may hold) before
    any large allocation. A frame that declares no size is decompressed by a stream that stops at the cap."""
    most = limits.max_decoded_bytes if cap is None else min(cap, limits.max_decoded_bytes)
    declared = declared_size(data, limits)
    if declared is None:
        raw = _stream(data, most)
    else:
        if declared > most:
            raise WireError(Refusal.TOO_LARGE, f"frame declares {declared} bytes > {most} expected here")
        if declared > _PLAUSIBLE_RATIO * len(data) + _STREAM_STEP:
            _check_expands_to(data, declared)
        try:
            # One frame and nothing after it: bytes appended to a frame (another frame, a skippable frame,
            # garbage, or a checksum whose flag a flipped bit cleared) would otherwise pass unnoticed.
            raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=declared, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise WireError(Refusal.BAD_COMPRESSION, f"corrupt or truncated zstd frame ({exc})") from exc
        if len(raw) != declared:
            raise WireError(Refusal.BAD_COMPRESSION, f"frame declared {declared} bytes but held {len(raw)}")
    try:
        return msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_bin_len=limits.max_decoded_bytes,
            max_str_len=limits.max_str_len,
            max_array_len=limits.max_items,
            max_map_len=limits.max_items,
            max_ext_len=0,
            ext_hook=_refuse_ext,  # max_ext_len=0 still lets an ext of length 0 through
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise WireError(Refusal.BAD_MSGPACK, f"malformed msgpack ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------- helpers


def _check_wire_dtype(wire_dtype: str) -> None:
    if wire_dtype not in WIRE_DTYPES:
        raise ConfigError(f"wire dtype must be one of {list(WIRE_DTYPES)}, got {wire_dtype!r}")


#: Frames that declare more than this many times their compressed size (plus one step) are streamed first.
_PLAUSIBLE_RATIO = 16
_STREAM_STEP = 1 << 20


def _check_expands_to(data: bytes | bytearray | memoryview, declared: int) -> None:
    """Decompress ``data`` holding at most one step at a time: does it hold the ``declared`` bytes?

    The one-shot decompressor allocates the declared size up front, whatever the frame holds.
    """
    total = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
        while total < declared:
            step = reader.read(min(_STREAM_STEP, declared - total))
            if not step:
                break
            total += len(step)
    except zstandard.ZstdError as exc:
        raise WireError(Refusal.BAD_COMPRESSION, f"corrupt zstd frame ({exc})") from exc
    if total < declared:
        raise WireError(Refusal.BAD_COMPRESSION, f"frame declared {declared} bytes but held {total}")


def _stream(data: bytes | bytearray | memoryview, most: int) -> bytes:
    """Decompress one frame that declares no size, refusing it past ``most`` bytes.

    A stream holding one step at a time proves the size first (the one-shot decompressor would allocate
    ``max_output_size`` up front); then a decompressor object, whose output is now known to be bounded,
    gives the bytes and says whether anything follows the frame."""
    total = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
        while step := reader.read(_STREAM_STEP):
            total += len(step)
            if total > most:
                raise WireError(Refusal.TOO_LARGE, f"frame without a declared size holds more than {most} bytes")
        whole = zstandard.ZstdDecompressor().decompressobj()
        raw = whole.decompress(data)
    except zstandard.ZstdError as exc:
        raise WireError(Refusal.BAD_COMPRESSION, f"corrupt or truncated zstd frame ({exc})") from exc
    if not whole.eof or whole.unused_data:
        raise WireError(Refusal.BAD_COMPRESSION, "truncated zstd frame, or bytes after it")
    return raw


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed")


def _brief(value: Any) -> str:
    """A short description of an untrusted value for an error message, in bounded time and memory:
    ``repr`` of hostile input can be megabytes long, or recurse deeper than Python allows."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, (str, bytes, bytearray)):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if isinstance(value, (list, tuple)) and len(value) <= 16 and all(type(v) in (bool, int, float) for v in value):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return f"<{type(value).__name__} of {len(value)}>"
    return f"<{type(value).__name__}>"


def _check_shape(shape: Any, expect: Sequence[int | None] | None) -> list[int]:
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS:
        raise WireError(Refusal.BAD_SHAPE, f"shape must be a list of at most {_MAX_DIMS} ints, got {_brief(shape)}")
    if not all(type(d) is int and 0 <= d < _MAX_DIM for d in shape):
        raise WireError(Refusal.BAD_SHAPE, f"shape must hold ints in [0, 2**31), got {_brief(shape)}")
    if expect is not None and (
        len(expect) != len(shape) or any(e is not None and e != d for e, d in zip(expect, shape, strict=True))
    ):
        raise WireError(Refusal.BAD_SHAPE, f"shape {shape} does not match the expected {list(expect)}")
    return shape


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    # numpy has no bfloat16: move the bits through int16 (same for every 2-byte type, harmless).
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _from_bytes(data: bytes, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return _from_bytes(data, torch.int16, shape).view(torch.bfloat16)
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    # np.frombuffer shares the (read-only) bytes; copy once so the tensor owns writable memory.
    arr = np.frombuffer(data, dtype=np_dtype).copy()
    return torch.from_numpy(arr).reshape(tuple(shape))
