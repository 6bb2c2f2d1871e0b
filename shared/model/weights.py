"""Where a segment's frozen weights come from: a preset's, drawn per tensor from its seed, or a local folder's,
read tensor by tensor from its safetensors files; :func:`materialize` gives a pruned model (split.py) its
real values, each tensor cast to the segment's device and dtype as it is read (:class:`Cast`)."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import PretrainedConfig

from splitft.shared.errors import ModelError
from splitft.shared.model.loading import PRESET_SEED, weight_files


def materialize(model: nn.Module, source: PresetWeights | FolderWeights, what: str) -> None:
    """Give every parameter (and persistent buffer) the pruned ``model`` still holds its real value."""
    wanted = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    wanted += [n for n, _ in model.named_buffers() if _is_persistent(model, n)]
    state: dict[str, torch.Tensor] = {}
    missing = []
    for name in wanted:
        tensor = source.get(name)
        if tensor is None:
            missing.append(name)
        else:
            state[name] = tensor
    if missing:
        raise ModelError(f"{what}: the checkpoint lacks {len(missing)} weights this segment needs, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=False, assign=True)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ModelError(f"{what}: weights left unloaded: {still_meta[:3]}")


def _tied_sources(model: nn.Module) -> dict[str, str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return dict(tied) if isinstance(tied, dict) else {}


@dataclass(frozen=True)
class Cast:
    """Each tensor to ``device``, and a floating-point one to ``dtype``, as it is read."""

    device: str | torch.device
    dtype: torch.dtype

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        return tensor.to(device=self.device, dtype=dtype)


class PresetWeights:
    """Deterministic weights for a preset, drawn per tensor from the preset seed and the tensor's name.

    Like Hugging Face's initialisation (normal(0, initializer_range); norms one, biases zero; GPT-2's
    residual projections scaled by 1/sqrt(2 L)), but each tensor from its own generator: the values do
    not depend on which other modules a segment holds, nor on anything else using torch's global
    generator at the same time (agents build segments in threads).
    """

    def __init__(self, model: nn.Module, config: PretrainedConfig, cast: Cast) -> None:
        self.model = model
        self.cast = cast
        self.std = float(getattr(config, "initializer_range", 0.02))
        self.layers = int(config.num_hidden_layers)
        self.tied = _tied_sources(model)
        self.gpt2 = config.model_type == "gpt2"
        self._cache: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor | None:
        key = self.tied.get(name, name)  # a tied head is the embedding, drawn once under its name
        if key not in self._cache:
            self._cache[key] = self.cast(self._draw(name, key))
        return self._cache[key]

    def _draw(self, name: str, key: str) -> torch.Tensor:
        module_path, _, leaf = name.rpartition(".")
        module = self.model.get_submodule(module_path)
        shape = getattr(module, leaf).shape
        if isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__:
            return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
        if leaf == "bias":
            return torch.zeros(shape)
        std = self.std
        if self.gpt2 and key.endswith("c_proj.weight"):
            std /= math.sqrt(2 * self.layers)
        gen = torch.Generator().manual_seed(PRESET_SEED * 1_000_003 + zlib.crc32(key.encode()))
        return torch.randn(shape, generator=gen) * std


class FolderWeights:
    """Weights read tensor by tensor from a folder's safetensors files (never pickled ``.bin`` files)."""

    def __init__(self, model: nn.Module, folder: Path, cast: Cast) -> None:
        self.folder = folder
        self.cast = cast
        self.index: dict[str, Path] = {}
        for file in weight_files(folder):
            with safe_open(file, framework="pt", device="cpu") as f:
                self.index.update(dict.fromkeys(f.keys(), file))
        self.prefix = getattr(model, "base_model_prefix", "")
        self.tied = _tied_sources(model)
        self._cache: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor | None:
        candidates = [name]
        if self.prefix and name.startswith(self.prefix + "."):
            candidates.append(name[len(self.prefix) + 1 :])  # checkpoints saved from the bare base model
        if name in self.tied:  # a tied head stored once, as the embedding
            candidates += [self.tied[name], self.tied[name].removeprefix(self.prefix + ".")]
        key = next((c for c in candidates if c in self.index), None)
        if key is None:
            return None
        if key not in self._cache:
            with safe_open(self.index[key], framework="pt", device="cpu") as f:
                self._cache[key] = self.cast(f.get_tensor(key))
        return self._cache[key]


def _is_persistent(model: nn.Module, buffer_name: str) -> bool:
    module_path, _, leaf = buffer_name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    return leaf not in module._non_persistent_buffers_set
