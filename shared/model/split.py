"""Cutting a causal LM into segments that run on different machines.

A :class:`Segment` is a contiguous slice of the model: optionally the embeddings, blocks
``[start, end)``, optionally the final norm and LM head. The client segment of cut ``c`` is
``(embed, 0..c)``, the server segment ``(c..L, head)``, the whole model ``(embed, 0..L, head)``; a
U-shaped tail or any middle slice is just another spec.

How a segment is built: the full ``*ForCausalLM`` skeleton is created, every module the segment
does not hold is replaced by a parameter-free :class:`_Hole`, and only then are weights loaded
(weights.py; for a local folder, tensor by tensor from its safetensors files), so a device holding ``c`` blocks
never holds the others. Module and parameter names stay those of the full model, which makes
adapter names identical on every side. LoRA is applied by PEFT to the blocks the segment holds.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from accelerate import init_empty_weights
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from splitft.shared.errors import ConfigError
from splitft.shared.model.loading import (
    PRESETS,
    Family,
    family_of,
    load_config,
    num_layers,
    resolve_source,
)
from splitft.shared.model.lora import LoraSettings, block_ranks, init_lora, lora_parameters, peft_config, quiet_peft
from splitft.shared.model.loss import IGNORE_INDEX, TargetLoss, linear_cross_entropy
from splitft.shared.model.precision import autocast
from splitft.shared.model.weights import Cast, FolderWeights, PresetWeights, materialize

log = logging.getLogger(__name__)

_BUILD_LOCK = threading.Lock()


@dataclass(frozen=True)
class SegmentSpec:
    """Which part of the model a segment holds.

    Blocks ``[start, end)``, and with ``tail_start`` also blocks ``[tail_start, L)`` (none when
    ``tail_start == L``): the U-shaped device, which holds both ends of the model so that its tokens
    and labels never leave it.
    """

    start: int  # first block held
    end: int  # one past the last block held (of the first run of blocks)
    embed: bool  # holds the token (and position) embeddings; requires start == 0
    head: bool  # holds the final norm and LM head; requires end == num_layers, or a tail
    tail_start: int | None = None  # U-shaped device: also holds blocks tail_start..L-1 and the head

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ConfigError(f"segment blocks must satisfy 0 <= start < end, got [{self.start}, {self.end})")
        if self.embed and self.start != 0:
            raise ConfigError("a segment with the embeddings must start at block 0")
        if self.tail_start is not None:
            if not self.head:
                raise ConfigError("a segment with a tail holds the LM head")
            if self.tail_start <= self.end:
                raise ConfigError(
                    f"the tail must start after the first blocks end: [{self.start}, {self.end}) and {self.tail_start}"
                )

    @classmethod
    def client(cls, cut: int) -> SegmentSpec:
        """Embeddings and blocks ``0..cut-1``: what an edge device runs."""
        return cls(0, cut, embed=True, head=False)

    @classmethod
    def server(cls, cut: int, num_layers: int) -> SegmentSpec:
        """Blocks ``cut..L-1``, final norm and LM head: what the GPU host runs."""
        return cls(cut, num_layers, embed=False, head=True)

    @classmethod
    def u_device(cls, cut: int, tail: int, num_layers: int) -> SegmentSpec:
        """Embeddings, blocks ``0..cut-1``, the last ``tail`` blocks, final norm and LM head: a U-shaped device."""
        return cls(0, cut, embed=True, head=True, tail_start=num_layers - tail)

    @classmethod
    def whole(cls, num_layers: int) -> SegmentSpec:
        return cls(0, num_layers, embed=True, head=True)

    def blocks(self, num_layers: int) -> list[int]:
        """Every block held, in order."""
        tail = [] if self.tail_start is None else list(range(self.tail_start, num_layers))
        return [*range(self.start, self.end), *tail]

    def cuts(self, num_layers: int) -> list[int]:
        """The cut layers at this segment's edges."""
        return [c for c in (self.start, self.end, self.tail_start) if c is not None and 0 < c < num_layers]

    def check(self, num_layers: int) -> None:
        last = self.end if self.tail_start is None else self.tail_start
        if last > num_layers:
            raise ConfigError(f"segment ends at block {last} but the model has {num_layers} blocks")
        # The head goes with the last block; only a U-shaped server's middle (no embeddings) ends there without it.
        if self.tail_start is None and self.head != (self.end == num_layers) and (self.head or self.embed):
            raise ConfigError(
                f"the LM head goes with block {num_layers - 1}, the last one: segment [{self.start}, {self.end}) "
                f"{'holds' if self.head else 'lacks'} it (cut layers are 1..{num_layers - 1})"
            )


class _Hole(nn.Module):
    """Stands in for a module this segment does not hold; running it is a bug."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.name} is not held by this segment")


class Segment(nn.Module):
    """A slice of a causal LM with LoRA on the blocks it holds.

    ``forward`` takes token ids ``(B, T)`` if the segment holds the embeddings, else hidden states
    ``(B, T, C)``; it returns hidden states ``(B, T, C)``, or logits ``(B, T, V)`` if it holds the head.
    ``attention_mask`` ``(B, T)`` marks real tokens with 1 and padding with 0.
    """

    def __init__(
        self,
        peft_model: PeftModel,
        config: PretrainedConfig,
        family: Family,
        spec: SegmentSpec,
        ranks: dict[int, int],
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.dtype = dtype  # of the frozen weights and the hidden states (precision.py); the adapters are fp32
        self.peft_model = peft_model
        self.config = config
        self.family = family
        self.spec = spec
        self.ranks = ranks  # LoRA rank of each block held
        self.num_layers = num_layers(config)

    @property
    def hf_model(self) -> nn.Module:
        """The (pruned) ``*ForCausalLM`` model with PEFT's LoRA layers injected."""
        return cast(nn.Module, self.peft_model.base_model.model)

    @property
    def device(self) -> torch.device:
        return next(p.device for p in self.lora_parameters().values())

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        return lora_parameters(self.peft_model)

    def autocast(self) -> Any:
        """The autocast context of this segment's computation (half precision on CUDA; none on a CPU)."""
        return autocast(self.device, self.dtype)

    def forward(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        start: int | None = None,
        stop: int | None = None,
        with_head: bool = True,
    ) -> torch.Tensor:
        """Run blocks ``start..stop-1``; with ``start``, ``inputs`` are the hidden states entering block ``start``.

        ``start`` lets one server segment serve devices cut at different layers; ``stop`` (default: the
        end of the run of held blocks that ``start`` is in) lets it stop below the head, at a U-shaped
        device's tail. The head runs when ``stop`` is the model's last layer and the segment holds it
        (a U-shaped device with no tail blocks runs only the head: ``start = stop = L``).
        """
        spec = self.spec
        total = self.num_layers
        first = spec.start if start is None else start
        held = spec.blocks(total)
        if stop is None:
            stop = first
            while stop in held:
                stop += 1
        head = with_head and spec.head and stop == total
        at_head = spec.head and stop == total  # a U-shaped device with no tail blocks: nothing but the head
        if not (first <= stop and all(i in held for i in range(first, stop)) and (first < stop or at_head)):
            raise ValueError(f"blocks [{first}, {stop}) are not held by this segment (it holds {held})")
        embed = spec.embed and start is None
        batch, length = inputs.shape[:2]
        if attention_mask.shape != (batch, length):
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match inputs {(batch, length)}")
        if position_ids is None:
            # Hugging Face's default: positions 0..T-1 whatever the padding (batches are right-padded).
            position_ids = torch.arange(length, device=inputs.device).unsqueeze(0)
        with self.autocast():
            return self._run(inputs, attention_mask, position_ids, embed, first, stop, head)

    def _run(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        embed: bool,
        first: int,
        stop: int,
        head: bool,
    ) -> torch.Tensor:
        model, family = self.hf_model, self.family
        # Hidden states from another machine arrive in the wire's dtype: compute in this segment's.
        hidden = family.embed(model, inputs, position_ids) if embed else inputs.to(self.dtype)  # (B, T, C)
        if first < stop:
            block_kwargs = family.block_context(
                model, self.config, hidden, attention_mask, position_ids, range(first, stop)
            )
            layers = cast(nn.ModuleList, model.get_submodule(family.layers))
            for i in range(first, stop):
                hidden = layers[i](hidden, **block_kwargs(i))  # (B, T, C); blocks return a tensor in transformers 5
        if not head:
            return hidden
        return self.head(hidden)  # (B, T, V)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on hidden states ``(..., C)`` -> logits ``(..., V)`` (both act per token)."""
        model, family = self.hf_model, self.family
        with self.autocast():
            return model.get_submodule(family.lm_head)(model.get_submodule(family.final_norm)(hidden))

    def target_loss(
        self, inputs: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, start: int | None = None
    ) -> TargetLoss:
        """Blocks ``start..L-1`` (``start`` as in :meth:`forward`), then the head only at the positions that
        predict a target, and the summed next-token cross-entropy there.

        The same loss and gradients as :func:`causal_lm_loss` on the full logits (the norm and the head act
        per token), without computing the head for prompt and padding positions: the head is the largest
        single cost of a small model's step (V x C per token), and a U-shaped device pays it.
        """
        hidden = self(inputs, attention_mask, start=start, with_head=False)  # (B, T, C) after the last block
        return self.head_loss(hidden, labels)

    def head_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> TargetLoss:
        """The head at the positions of ``hidden`` (the last block's output, ``(B, T, C)``) that predict a
        target of ``labels`` (``(B, T)``), and the summed next-token cross-entropy there, a chunk of positions
        at a time (:func:`linear_cross_entropy`: no ``(N, V)`` logits tensor)."""
        model, family = self.hf_model, self.family
        targets = labels[:, 1:]  # position t predicts labels[t + 1]
        picked = targets != IGNORE_INDEX  # (B, T-1)
        wanted = targets[picked]  # (N,)
        if wanted.numel() == 0:  # no target: a zero loss that still has a graph
            return TargetLoss(hidden.sum() * 0.0, 0, 0)
        with self.autocast():
            normed = model.get_submodule(family.final_norm)(hidden[:, :-1][picked])  # (N, C)
        loss_sum, correct = linear_cross_entropy(normed, cast(nn.Linear, model.get_submodule(family.lm_head)), wanted)
        return TargetLoss(loss_sum, int(wanted.numel()), correct)


# --------------------------------------------------------------------------- building


def build_segment(
    source: str | Path,
    spec: SegmentSpec,
    *,
    lora: LoraSettings | None = None,
    ranks: Mapping[int, int] | None = None,
    lora_seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    load_weights: bool = True,
) -> Segment:
    """Build one segment of a preset or local model folder, with LoRA on its blocks.

    ``ranks`` gives the LoRA rank of each block held (default: :func:`block_ranks` at the segment's
    own cuts). The adapters are initialised by :func:`init_lora` from ``lora_seed``. With
    ``load_weights=False`` the base weights stay on the meta device (for sizing a split without
    reading or allocating them).
    """
    lora = lora or LoraSettings()
    config = load_config(source, attn_implementation)
    family = family_of(config)
    total = num_layers(config)
    spec.check(total)
    if ranks is None:
        ranks = block_ranks(total, spec.cuts(total), lora)
    blocks = spec.blocks(total)
    held = {i: ranks[i] for i in blocks if i in ranks}
    if len(held) != len(blocks):
        raise ConfigError(f"ranks must give a rank for every block held ({blocks})")

    # init_empty_weights patches torch's parameter registration process-wide: while it is active, any
    # parameter registered by any thread lands on the meta device. Agents and the coordinator build
    # segments in worker threads, so builds take turns.
    with _BUILD_LOCK:
        return _build(source, spec, config, family, total, held, lora, lora_seed, device, dtype, load_weights)


def matrix_dims(config: PretrainedConfig) -> list[tuple[int, int]]:
    """The (rows, columns) of every matrix of the model, read on the meta device: nothing is allocated.
    (Remembered per config: a harness of many agents in one process asks once.)"""
    return list(_matrix_dims(config.to_json_string()))


@functools.lru_cache(maxsize=8)
def _matrix_dims(config_json: str) -> tuple[tuple[int, int], ...]:
    config = AutoConfig.for_model(**json.loads(config_json))
    with _BUILD_LOCK, init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    return tuple((int(p.shape[0]), int(p.shape[1])) for p in model.parameters() if p.dim() == 2)


def _build(
    source: str | Path,
    spec: SegmentSpec,
    config: PretrainedConfig,
    family: Family,
    total: int,
    held: dict[int, int],
    lora: LoraSettings,
    lora_seed: int,
    device: str | torch.device,
    dtype: torch.dtype,
    load_weights: bool,
) -> Segment:
    model = _frozen_part(source, spec, config, family, total, device, dtype, load_weights)
    with quiet_peft():
        peft_model = get_peft_model(model, peft_config(family, held, lora))
    if load_weights:
        init_lora(peft_model, lora_seed)
        peft_model.to(device)
    return Segment(peft_model, config, family, spec, dict(held), dtype)


def _frozen_part(
    source: str | Path,
    spec: SegmentSpec,
    config: PretrainedConfig,
    family: Family,
    total: int,
    device: str | torch.device,
    dtype: torch.dtype,
    load_weights: bool,
) -> nn.Module:
    """The ``*ForCausalLM`` model holding only ``spec``'s modules, with their frozen weights."""
    # Parameters on the meta device until materialised; buffers (rotary frequencies) stay real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    _prune(model, family, spec, total)
    if load_weights:
        # Each tensor is cast to ``dtype`` as it is read: never an fp32 copy of the whole part. Buffers that
        # are not in the checkpoint (rotary frequencies) stay fp32, as Hugging Face keeps them.
        cast = Cast(device, dtype)
        if str(source) in PRESETS:
            materialize(model, PresetWeights(model, config, cast), f"preset {source}")
        else:
            materialize(model, FolderWeights(model, Path(resolve_source(source)), cast), str(source))
        model.to(device=device)
    model.requires_grad_(False)
    return model


def load_base_model(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """The whole base model without LoRA: a plain ``*ForCausalLM`` (``PeftModel.from_pretrained`` takes it).

    For a preset this is the only way to get its weights outside SplitFT; ``save_pretrained`` makes it
    an ordinary Hugging Face folder.
    """
    config = load_config(source, attn_implementation)
    family = family_of(config)
    total = num_layers(config)
    with _BUILD_LOCK:
        model = _frozen_part(source, SegmentSpec.whole(total), config, family, total, device, dtype, True)
    return cast(PreTrainedModel, model)


def _prune(model: nn.Module, family: Family, spec: SegmentSpec, total: int) -> None:
    layers = model.get_submodule(family.layers)
    assert isinstance(layers, nn.ModuleList)
    held = set(spec.blocks(total))
    for i in range(total):
        if i not in held:
            layers[i] = _Hole(f"block {i}")
    dropped = [] if spec.embed else list(family.embeddings)
    if not spec.head:
        dropped += [family.final_norm, family.lm_head]
    for path in dropped:
        model.set_submodule(path, _Hole(path))
