"""The model work of one local step on the device: the client forward, the U split's tail, the backward pass.

Plain functions on a segment and tensors, without messages or waiting: the agent runs them on its
compute thread (agent/training.py), and splitft.bench.emulation times them against a device profile.
With an :class:`~splitft.agent.emulation.Emulation`, each pads its time to what the emulated device
needs for ``flops`` and returns that time (see agent/emulation.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from splitft.agent.emulation import Emulation
from splitft.shared.model.defense import DefenseSettings, defend, distance_loss, nopeek_loss
from splitft.shared.model.loss import padding_mask
from splitft.shared.model.split import Segment
from splitft.shared.wire.messages import act_body

__all__ = ["backward", "forward", "tail_step"]


def forward(
    segment: Segment,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None,
    lengths: torch.Tensor,
    wire_dtype: str,
    timings: Mapping[str, float],
    emulation: Emulation | None,
    flops: float,
    defense: DefenseSettings,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any], float]:
    """Client forward (B, T) -> (B, T, C), the defense applied, and the encoded activation message.

    Returns (the activations as sent, the NoPeek and distance terms to add to the loss or None, the message
    body, the forward time). ``labels`` go into the message only in the two-part split (None in the U split)."""
    t0 = time.perf_counter()
    mask = padding_mask(lengths, input_ids.shape[1]).to(segment.device)
    segment.train()
    hidden = segment(input_ids.to(segment.device), mask)  # (B, T, C)
    extra = nopeek_loss(input_ids.to(segment.device), hidden, mask, defense.nopeek) if defense.nopeek > 0 else None
    if defense.distance > 0:  # away from the public base's activations (private adapters)
        with torch.no_grad(), segment.peft_model.disable_adapter():
            base = segment(input_ids.to(segment.device), mask)
        term = distance_loss(hidden, base, mask, defense.distance)
        extra = term if extra is None else extra + term
    sent = defend(hidden, defense, generator) if defense.active else hidden  # (B, T, C)
    forward_s = time.perf_counter() - t0
    if emulation is not None:
        forward_s = emulation.pad_compute(forward_s, flops)
    return sent, extra, act_body(sent, labels, lengths, wire_dtype, timings), forward_s


def tail_step(
    segment: Segment,
    top: torch.Tensor,
    labels: torch.Tensor,
    lengths: torch.Tensor,
    tail_start: int,
    emulation: Emulation | None,
    flops: float,
) -> tuple[torch.Tensor, float, float]:
    """U split: the device's tail blocks, norm, head and loss on its own labels, and their backward pass.

    Returns d(mean loss)/d(top) (B, T, C), the loss and the time; the tail's LoRA gradients stay in the
    segment for the optimiser step that ends the step.
    """
    t0 = time.perf_counter()
    mask = padding_mask(lengths, top.shape[1]).to(segment.device)
    top = top.to(segment.device).requires_grad_()  # (B, T, C)
    result = segment.target_loss(top, mask, labels.to(segment.device), tail_start)
    loss = result.loss_sum / max(result.tokens, 1)  # the mean over this device's targets
    loss.backward()
    assert top.grad is not None
    seconds = time.perf_counter() - t0
    if emulation is not None:
        seconds = emulation.pad_compute(seconds, flops)
    return top.grad.cpu(), float(loss.detach()), seconds


def backward(
    hidden: torch.Tensor,
    grad: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    emulation: Emulation | None,
    flops: float,
    extra: torch.Tensor | None = None,
) -> float:
    """Finish the backward pass from the server's activation gradient (and a NoPeek term) and step;
    returns the time."""
    t0 = time.perf_counter()
    if extra is None:
        hidden.backward(grad.to(hidden))  # the device and dtype of the activations
    else:
        torch.autograd.backward([hidden, extra], [grad.to(hidden), torch.ones_like(extra)])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    backward_s = time.perf_counter() - t0
    return emulation.pad_compute(backward_s, flops) if emulation is not None else backward_s
