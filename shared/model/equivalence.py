"""The split-equals-whole check: one training step through the split, compared with the unsplit model.

Two-part split: the client segment's activations and the server's activation gradient pass through
the real codec, as they would over MQTT. U-shaped split (``tail`` given): all four crossings do, the
activations at the cut up, the server's activations at the tail down, the gradient at the tail up and
the gradient at the cut down; the loss is taken on the device. With an fp32 wire the loss and every LoRA gradient must match the unsplit
PEFT model up to float rounding; with a lossy wire dtype the report shows what the wire costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitft.shared.model.loading import load_config, num_layers
from splitft.shared.model.lora import LoraSettings, block_ranks, load_lora_state, lora_parameters
from splitft.shared.model.loss import causal_lm_loss, labels_from
from splitft.shared.model.split import Segment, SegmentSpec, build_segment
from splitft.shared.wire.codec import decode_tensor, encode_tensor


@dataclass(frozen=True)
class EquivalenceReport:
    loss_whole: float
    loss_split: float
    max_grad_rel_error: float  # worst over LoRA weights of |g_split - g_whole| / |g_whole|
    worst_weight: str
    num_weights: int

    @property
    def loss_rel_error(self) -> float:
        return abs(self.loss_split - self.loss_whole) / max(abs(self.loss_whole), 1e-12)

    def within(self, tolerance: float) -> bool:
        return self.loss_rel_error <= tolerance and self.max_grad_rel_error <= tolerance


def split_step(
    client: Segment,
    server: Segment,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    wire_dtype: str = "fp32",
) -> torch.Tensor:
    """Forward and backward through client and server, both crossings through the codec.

    Leaves the LoRA gradients in both segments and returns the (detached) loss.
    """
    hidden = client(input_ids, attention_mask)  # (B, T, C)
    received = _crossing(hidden, wire_dtype, server.device).requires_grad_()
    loss = causal_lm_loss(server(received, attention_mask.to(server.device)), labels.to(server.device))
    loss.backward()
    assert received.grad is not None
    hidden.backward(_crossing(received.grad, wire_dtype, hidden.device))
    return loss.detach()


def _crossing(tensor: torch.Tensor, wire_dtype: str, to: torch.device) -> torch.Tensor:
    """``tensor`` as the other side receives it: through the codec in ``wire_dtype``, onto its device."""
    return decode_tensor(encode_tensor(tensor.detach(), wire_dtype)).to(to)


def u_split_step(
    device: Segment,
    server: Segment,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    wire_dtype: str = "fp32",
) -> torch.Tensor:
    """One U-shaped step: device head blocks, server middle, device tail and loss; every crossing through the codec.

    Leaves the LoRA gradients in both segments and returns the (detached) loss. Only float tensors
    cross: the labels stay with ``device``.
    """
    cut, tail_start = device.spec.end, device.spec.tail_start
    assert tail_start is not None, "a U-shaped device segment has a tail"
    hidden = device(input_ids, attention_mask)  # (B, T, C) at the cut
    mask = attention_mask.to(server.device)
    received = _crossing(hidden, wire_dtype, server.device).requires_grad_()
    top = server(received, mask, start=cut, stop=tail_start)  # (B, T, C) entering the tail
    down = _crossing(top, wire_dtype, device.device).requires_grad_()
    loss = causal_lm_loss(device(down, attention_mask, start=tail_start), labels)
    loss.backward()
    assert down.grad is not None
    top.backward(_crossing(down.grad, wire_dtype, server.device))
    assert received.grad is not None
    hidden.backward(_crossing(received.grad, wire_dtype, device.device))
    return loss.detach()


def random_batch(vocab: int, batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, a right-padded attention mask with unequal lengths (one row full), and labels."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, length), generator=gen)
    lengths = torch.randint(2, length + 1, (batch,), generator=gen)
    lengths[0] = length
    attention_mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return input_ids, attention_mask, labels_from(input_ids, attention_mask)


def compare_split_to_whole(
    source: str,
    cut: int,
    *,
    wire_dtype: str = "fp32",
    attn_implementation: str = "sdpa",
    lora: LoraSettings | None = None,
    batch: int = 4,
    length: int = 32,
    seed: int = 0,
    tail: int | None = None,
) -> EquivalenceReport:
    """Run one step split at ``cut`` and unsplit, with the same random (non-zero) adapters and batch.

    With ``tail`` the split is U-shaped: the device also holds the last ``tail`` blocks and the head.
    """
    lora = lora or LoraSettings()
    config = load_config(source, attn_implementation)
    total = num_layers(config)
    if tail is None:
        specs = (SegmentSpec.client(cut), SegmentSpec.server(cut, total))
    else:
        device_spec = SegmentSpec.u_device(cut, tail, total)
        specs = (device_spec, SegmentSpec(cut, total - tail, embed=False, head=False))
    ranks = block_ranks(total, specs[0].cuts(total), lora)
    whole, client, server = (
        build_segment(source, spec, lora=lora, ranks=ranks, attn_implementation=attn_implementation)
        for spec in (SegmentSpec.whole(total), *specs)
    )

    # Random B as well as A: with B = 0 (the usual start) every gradient of A would be zero.
    gen = torch.Generator().manual_seed(seed)
    weights = whole.lora_parameters()
    state = {name: torch.randn(p.shape, generator=gen) * 0.05 for name, p in weights.items()}
    load_lora_state(whole.peft_model, state)
    for part in (client, server):
        load_lora_state(part.peft_model, {n: state[n] for n in part.lora_parameters()})

    input_ids, attention_mask, labels = random_batch(config.vocab_size, batch, length, seed)
    out = whole.peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    step = split_step if tail is None else u_split_step
    loss_split = step(client, server, input_ids, attention_mask, labels, wire_dtype)

    split_weights = {**lora_parameters(client.peft_model), **lora_parameters(server.peft_model)}
    if set(split_weights) != set(weights):
        raise AssertionError("the split holds different LoRA weights from the whole model")
    errors = {}
    for name, p in weights.items():
        g_whole, g_split = p.grad, split_weights[name].grad
        assert g_whole is not None and g_split is not None
        errors[name] = float((g_split - g_whole).norm() / g_whole.norm().clamp_min(1e-30))
    worst = max(errors, key=errors.__getitem__)
    return EquivalenceReport(
        loss_whole=float(out.loss.detach()),
        loss_split=float(loss_split),
        max_grad_rel_error=errors[worst],
        worst_weight=worst,
        num_weights=len(errors),
    )
