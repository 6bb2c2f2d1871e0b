"""The bodies of a step's messages and of the adapter upload: activations, gradients, the U split's tail
tensors, the client adapters. Each kind has a ``*_body`` function that builds it and a ``parse_*`` that checks it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from splitft.shared.errors import Refusal, WireError
from splitft.shared.wire.codec import (
    FLOAT_WIRE_DTYPES,
    decode_state,
    decode_tensor,
    encode_state,
    encode_tensor,
)
from splitft.shared.wire.fields import get_field, int_field, number_field, timings_field

# --------------------------------------------------------------------------- activations and gradients


@dataclass(frozen=True)
class Activations:
    """One step's cut-layer activations from an agent, with what the server needs for the loss."""

    hidden: torch.Tensor  # (B, T, C) float32
    labels: torch.Tensor | None  # (B, T) int64, -100 where no loss is taken; None in the U split (they stay home)
    lengths: torch.Tensor  # (B,) int64: real tokens per row (rows are right-padded)
    timings: dict[str, float]  # the agent's timings of its previous step

    @property
    def attention_mask(self) -> torch.Tensor:
        width = self.hidden.shape[1]
        return (torch.arange(width).unsqueeze(0) < self.lengths.unsqueeze(1)).long()  # (B, T)


def act_body(
    hidden: torch.Tensor,
    labels: torch.Tensor | None,
    lengths: torch.Tensor,
    wire_dtype: str,
    timings: Mapping[str, float],
) -> dict[str, Any]:
    """The activations at the cut; ``labels`` None in the U split, where the device keeps them.

    Masks travel as lengths (the padding of each row), labels as int32: a few bytes per token next to
    the activations.
    """
    body = {
        "act": encode_tensor(hidden, wire_dtype),
        "lengths": encode_tensor(lengths, "int32"),
        "timings": dict(timings),
    }
    if labels is not None:
        body["labels"] = encode_tensor(labels, "int32")
    return body


def parse_act(
    body: Mapping[str, Any],
    hidden_size: int,
    max_batch: int,
    max_length: int,
    vocab_size: int,
    *,
    with_labels: bool = True,
) -> Activations:
    """Activations at the cut; ``with_labels`` False (the U split) refuses a body that carries labels."""
    hidden = decode_tensor(
        get_field(body, "act", dict), expect_shape=[None, None, hidden_size], expect_dtypes=FLOAT_WIRE_DTYPES
    )
    batch, width = hidden.shape[:2]
    if not (1 <= batch <= max_batch and 1 <= width <= max_length):
        raise WireError(
            Refusal.BAD_SHAPE, f"activation batch {batch} x {width} outside 1..{max_batch} x 1..{max_length}"
        )
    lengths = decode_tensor(get_field(body, "lengths", dict), expect_shape=[batch], expect_dtypes=["int32"])
    if bool((lengths < 1).any()) or bool((lengths > width).any()):
        raise WireError(Refusal.BAD_SHAPE, f"lengths must lie in [1, {width}]")
    if not with_labels:
        if "labels" in body:
            raise WireError(Refusal.BAD_SCHEMA, "labels in a U-split job: they must stay on the device")
        return Activations(hidden, None, lengths, timings_field(body))
    labels = decode_tensor(get_field(body, "labels", dict), expect_shape=[batch, width], expect_dtypes=["int32"])
    if bool(((labels != -100) & ((labels < 0) | (labels >= vocab_size))).any()):
        raise WireError(Refusal.BAD_SCHEMA, f"labels must be -100 or token ids in [0, {vocab_size})")
    return Activations(hidden, labels, lengths, timings_field(body))


def grad_body(
    grad: torch.Tensor, wire_dtype: str, loss: float | None = None, tokens: int | None = None
) -> dict[str, Any]:
    """The gradient at the cut; in the two-part split with the batch's loss and target tokens (the server's)."""
    body: dict[str, Any] = {"grad": encode_tensor(grad, wire_dtype)}
    if loss is not None and tokens is not None:
        body.update(loss=float(loss), tokens=int(tokens))
    return body


def parse_grad(
    body: Mapping[str, Any], shape: tuple[int, ...], *, with_loss: bool = False
) -> tuple[torch.Tensor, float | None, int | None]:
    """(gradient, loss, tokens); loss and tokens are None when the server has none (the U split).

    ``with_loss`` (the two-part split) refuses a gradient without them."""
    grad = decode_tensor(get_field(body, "grad", dict), expect_shape=list(shape), expect_dtypes=FLOAT_WIRE_DTYPES)
    if not with_loss and "loss" not in body and "tokens" not in body:
        return grad, None, None
    return grad, number_field(body, "loss"), int_field(body, "tokens", 0, 1 << 40)


def tail_act_body(hidden: torch.Tensor, wire_dtype: str) -> dict[str, Any]:
    """U split, server -> device: the hidden states entering the device's tail blocks."""
    return {"act": encode_tensor(hidden, wire_dtype)}


def parse_tail_act(body: Mapping[str, Any], shape: tuple[int, ...]) -> torch.Tensor:
    return decode_tensor(get_field(body, "act", dict), expect_shape=list(shape), expect_dtypes=FLOAT_WIRE_DTYPES)


def tail_grad_body(grad: torch.Tensor, wire_dtype: str, loss: float | None) -> dict[str, Any]:
    """U split, device -> server: d(the device's mean loss)/d(the tail's input); the loss itself only if reported.

    No token count travels: the server weights by the real tokens of the rows (``lengths`` of ``act``).
    """
    return {"grad": encode_tensor(grad, wire_dtype), "loss": None if loss is None else float(loss)}


def parse_tail_grad(body: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[torch.Tensor, float | None]:
    grad = decode_tensor(get_field(body, "grad", dict), expect_shape=list(shape), expect_dtypes=FLOAT_WIRE_DTYPES)
    if body.get("loss") is None:
        if "loss" not in body:
            raise WireError(Refusal.BAD_SCHEMA, "message lacks field 'loss'")
        return grad, None
    return grad, number_field(body, "loss")


# --------------------------------------------------------------------------- adapters


def adapter_body(
    state: Mapping[str, torch.Tensor],
    tokens: int,
    samples: int,
    loss: float | None,
    timings: Mapping[str, float],
    wire_dtype: str = "fp32",
    sealed: bytes | None = None,
) -> dict[str, Any]:
    body = {
        "adapter": encode_state(state, wire_dtype),
        "tokens": int(tokens),
        "samples": int(samples),
        "loss": None if loss is None else float(loss),  # None: a U-split agent that does not report its loss
        "timings": dict(timings),
    }
    if sealed is not None:  # private adapters: the private blocks', sealed with the fleet key (sealed.py)
        body["sealed"] = sealed
    return body


@dataclass(frozen=True)
class AdapterUpload:
    state: dict[str, torch.Tensor]
    tokens: int
    samples: int
    loss: float | None
    timings: dict[str, float]
    sealed: bytes | None = None


def parse_adapter(
    body: Mapping[str, Any], expect: Mapping[str, tuple[int, ...]], sealed: bool = False
) -> AdapterUpload:
    """An adapter upload: its adapters of the names and shapes of ``expect``, and with ``sealed`` (private
    adapters) the private blocks' sealed ones, which must be there."""
    state = decode_state(get_field(body, "adapter", dict), expect={k: list(v) for k, v in expect.items()})
    blob = body.get("sealed")
    if sealed and not (isinstance(blob, bytes) and blob):
        raise WireError(Refusal.BAD_SCHEMA, "an upload of private adapters lacks its sealed part")
    if not sealed and blob is not None:
        raise WireError(Refusal.BAD_SCHEMA, "a sealed part in an upload of a job without private adapters")
    return AdapterUpload(
        state=state,
        tokens=int_field(body, "tokens", 1, 1 << 40),
        samples=int_field(body, "samples", 1, 1 << 40),
        loss=None if body.get("loss", 0) is None else number_field(body, "loss"),
        timings=timings_field(body),
        sealed=blob if sealed else None,
    )
