"""Model sources: named presets built from a config, a local Hugging Face folder, or a GGUF file.

Two families are supported, each described by a :class:`Family` that knows where the parts of the
model live and how to run them one block at a time:

* ``gpt2``: ``transformer.wte`` + ``transformer.wpe`` -> ``transformer.h[i]`` -> ``transformer.ln_f``
  -> ``lm_head``;
* ``llama`` (Llama, Qwen2, Mistral): ``model.embed_tokens`` -> ``model.layers[i]`` (with rotary
  ``position_embeddings`` from ``model.rotary_emb``) -> ``model.norm`` -> ``lm_head``.

Nothing is ever downloaded: a source is a preset name, an existing folder, or a GGUF file, which is converted
once into a folder in the cache (:mod:`splitft.shared.model.gguf`); :func:`resolve_source` names that folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, GPT2Config, LlamaConfig, PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from splitft.shared.errors import ConfigError, ModelError
from splitft.shared.model.gguf import cached_folder, is_gguf

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


# --------------------------------------------------------------------------- presets

#: Preset seed: every process that builds a preset gets the same frozen weights.
PRESET_SEED = 1234
#: The GPT-2 BPE vocabulary, so presets pair with the GPT-2 tokenizer.
GPT2_VOCAB = 50257


def _tiny_gpt2() -> PretrainedConfig:
    return GPT2Config(
        vocab_size=GPT2_VOCAB,
        n_positions=1024,
        n_embd=128,
        n_layer=12,
        n_head=4,
        # No dropout in the frozen base: split and whole must compute the same function.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=GPT2_VOCAB - 1,
        eos_token_id=GPT2_VOCAB - 1,
    )


def _tiny_llama() -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=GPT2_VOCAB,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in current LLaMA-family models
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=GPT2_VOCAB - 1,
        eos_token_id=GPT2_VOCAB - 1,
    )


PRESETS: dict[str, Callable[[], PretrainedConfig]] = {
    "tiny-gpt2": _tiny_gpt2,
    "tiny-llama": _tiny_llama,
}


def is_preset(source: str) -> bool:
    return source in PRESETS


def resolve_source(source: str | Path) -> str:
    """Where a model is read from: a preset's name or a folder as given; for a GGUF file, the folder it was
    converted into (made on first use, see :func:`splitft.shared.model.gguf.cached_folder`)."""
    if is_gguf(source) and str(source) not in PRESETS:
        return str(cached_folder(Path(source), supported=MODEL_TYPES))
    return str(source)


def load_config(source: str | Path, attn_implementation: str | None = None) -> PretrainedConfig:
    """The config of a preset, a local model folder or a GGUF file (no hub access)."""
    if attn_implementation is not None and attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ModelError(f"attention must be one of {list(ATTENTION_IMPLEMENTATIONS)}, got {attn_implementation!r}")
    name = str(source)
    if name in PRESETS:
        config = PRESETS[name]()
    else:
        folder = Path(resolve_source(source))
        if not folder.is_dir():
            raise ModelError(
                f"model {name!r} is neither a preset ({', '.join(PRESETS)}), an existing folder nor a .gguf file"
            )
        if not (folder / "config.json").is_file():
            raise ModelError(f"model folder {folder} has no config.json")
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise ModelError(f"cannot read the config in {folder}: {exc}") from exc
    family_of(config)  # refuse unsupported families early
    config._attn_implementation = attn_implementation or "sdpa"
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (one, or those its index names)."""
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{index_file} is not a valid safetensors index: {exc}") from exc
        return sorted({folder / name for name in weight_map.values()})
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelError(
        f"{folder} has no model.safetensors (or index). SplitFT reads safetensors only, never pickled "
        "weights: convert with `model.save_pretrained(folder, safe_serialization=True)`."
    )


#: config fields that say where or with what a model was saved, not what it is
_VOLATILE_CONFIG = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation"})
_SAMPLE_BYTES = 1 << 16


def model_fingerprint(source: str | Path) -> str:
    """A short id of a model's content: its config, the names, shapes and dtypes of its weights, and samples
    of the weights' bytes. Two copies of one model have the same id wherever they are kept (``models/x``,
    ``/abs/models/x/``); another model, or the same architecture with other weights, has another. A GGUF file
    has the id of the folder it is converted into."""
    digest = hashlib.sha256()
    name = str(source)
    if name in PRESETS:
        config = {k: v for k, v in PRESETS[name]().to_dict().items() if k not in _VOLATILE_CONFIG}
        digest.update(b"preset\0" + name.encode() + b"\0" + json.dumps(config, sort_keys=True, default=str).encode())
        return digest.hexdigest()[:16]
    folder = Path(resolve_source(source))
    load_config(folder)  # a ModelError naming the folder if it is not a model
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the config in {folder}: {exc}") from exc
    config = {k: v for k, v in raw.items() if k not in _VOLATILE_CONFIG}
    digest.update(b"folder\0" + json.dumps(config, sort_keys=True, default=str).encode())
    for file in weight_files(folder):
        header, data_start = _safetensors_header(file)
        digest.update(json.dumps(header, sort_keys=True).encode())
        try:
            with file.open("rb") as f:
                size = file.stat().st_size
                for offset in (data_start, (data_start + size) // 2, max(size - _SAMPLE_BYTES, data_start)):
                    f.seek(offset)
                    digest.update(f.read(_SAMPLE_BYTES))
        except OSError as exc:
            raise ModelError(f"cannot read the weights {file}: {exc}") from exc
    return digest.hexdigest()[:16]


def _safetensors_header(file: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's tensor table (name -> dtype, shape, offsets) and where its data starts."""
    try:
        with file.open("rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if not 0 < header_size < 1 << 28:
                raise ModelError(f"{file} is not a safetensors file")
            header = json.loads(f.read(header_size))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the weights {file}: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelError(f"{file} is not a safetensors file")
    header.pop("__metadata__", None)
    return header, 8 + header_size


def check_weights(source: str | Path, config: PretrainedConfig) -> None:
    """The weights of a model folder (or GGUF file) are those its config describes: as many blocks, the same
    hidden size. A ModelError names the difference (a 24-block config over 4 blocks of weights would otherwise
    train on 20 randomly initialised blocks). A preset's weights are made from its config: nothing to check."""
    if str(source) in PRESETS:
        return
    folder = Path(resolve_source(source))
    family = family_of(config)
    # "transformer.h.3.attn..." or, saved without the model's prefix, "h.3.attn..."
    block = re.compile(rf"(?:^|\.){re.escape(family.layers.rsplit('.', 1)[-1])}\.(\d+)\.")
    embedding = family.embeddings[0].rsplit(".", 1)[-1] + ".weight"  # wte / embed_tokens
    blocks: set[int] = set()
    widths: set[int] = set()
    for file in weight_files(folder):
        header, _ = _safetensors_header(file)
        for name, entry in header.items():
            match = block.search(name)
            if match:
                blocks.add(int(match.group(1)))
            elif name.endswith(embedding) and isinstance(entry, dict):
                shape = entry.get("shape") or []
                if len(shape) == 2:
                    widths.add(int(shape[1]))
    layers, width = num_layers(config), hidden_size(config)
    if blocks != set(range(layers)):
        found = f"blocks {min(blocks)}..{max(blocks)} ({len(blocks)})" if blocks else "no block"
        raise ModelError(
            f"{folder}: config.json describes {layers} blocks, but its weights hold {found}: the config and the "
            "weights are of different models"
        )
    if widths and widths != {width}:
        raise ModelError(
            f"{folder}: config.json says hidden size {width}, but the token embedding is {sorted(widths)} wide: the "
            "config and the weights are of different models"
        )


# --------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """Where the parts of one model family live, and how to run them block by block.

    Paths are attribute paths from the ``*ForCausalLM`` model.
    """

    name: str
    layers: str  # the nn.ModuleList of transformer blocks
    embeddings: tuple[str, ...]  # modules the first segment needs besides the blocks
    shared: tuple[str, ...]  # parameter-free helpers every segment keeps (rotary embeddings)
    final_norm: str
    lm_head: str
    lora_targets: tuple[str, ...]  # LoRA target module names inside a block
    fan_in_fan_out: bool  # GPT-2's Conv1D stores weights transposed

    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> hidden states (B, T, C) entering block 0."""
        if self.name == "gpt2":
            h = model.get_submodule("transformer.wte")(input_ids) + model.get_submodule("transformer.wpe")(position_ids)
            return model.get_submodule("transformer.drop")(h)
        return model.get_submodule("model.embed_tokens")(input_ids)

    def block_context(
        self,
        model: nn.Module,
        config: PretrainedConfig,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        layer_indices: range,
    ) -> Callable[[int], dict[str, Any]]:
        """Keyword arguments for running block ``i`` of ``layer_indices`` on ``hidden``.

        Each segment builds its own causal mask: passing ``None`` under eager attention would make
        attention silently non-causal.
        """
        kinds = {layer_kind(config, i) for i in layer_indices}
        masks: dict[str, Any] = {}
        for kind in kinds:
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            masks[kind] = make(
                config=config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                cache=None,
                position_ids=position_ids,
            )
        extra: dict[str, Any] = {"position_ids": position_ids}
        for path in self.shared:  # rotary embeddings: (cos, sin), computed by every segment for itself
            extra["position_embeddings"] = model.get_submodule(path)(hidden, position_ids=position_ids)
        return lambda i: {"attention_mask": masks[layer_kind(config, i)], **extra}


GPT2_FAMILY = Family(
    name="gpt2",
    layers="transformer.h",
    embeddings=("transformer.wte", "transformer.wpe"),
    shared=(),
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    lora_targets=("c_attn", "c_proj", "c_fc"),
    fan_in_fan_out=True,
)

LLAMA_FAMILY = Family(
    name="llama",
    layers="model.layers",
    embeddings=("model.embed_tokens",),
    shared=("model.rotary_emb",),
    final_norm="model.norm",
    lm_head="lm_head",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    fan_in_fan_out=False,
)

_FAMILIES = {"gpt2": GPT2_FAMILY, "llama": LLAMA_FAMILY, "qwen2": LLAMA_FAMILY, "mistral": LLAMA_FAMILY}
#: the model types SplitFT splits (a GGUF file's ``general.architecture`` is one of these too)
MODEL_TYPES = frozenset(_FAMILIES)


def family_of(config: PretrainedConfig) -> Family:
    """The family of a config, or a :class:`ModelError` naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise ModelError(f"unsupported model type {model_type!r}: SplitFT splits {', '.join(sorted(_FAMILIES))} models")
    return _FAMILIES[model_type]


def layer_kind(config: PretrainedConfig, index: int) -> str:
    """``full_attention`` or ``sliding_attention`` for block ``index``."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return str(layer_types[index])
    if config.model_type == "mistral" and getattr(config, "sliding_window", None):
        return "sliding_attention"
    return "full_attention"


def num_layers(config: PretrainedConfig) -> int:
    return int(config.num_hidden_layers)


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position embeddings cover (None: the config does not say)."""
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if type(value) is int and value > 0:
            return value
    return None


def check_max_length(config: PretrainedConfig, max_length: int) -> None:
    """A job's sequences must fit the model's positions (GPT-2's learned positions end there)."""
    limit = max_positions(config)
    if limit is not None and max_length > limit:
        raise ConfigError(f"max_length {max_length} exceeds the model's {limit} positions")


def hidden_size(config: PretrainedConfig) -> int:
    return int(config.hidden_size)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``; ``cpu``/``cuda``/``cuda:N`` as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def block_params(config: PretrainedConfig) -> int:
    """Weights in one transformer block (the matrices; norms and biases are negligible)."""
    h = int(config.hidden_size)
    if config.model_type == "gpt2":
        inner = int(getattr(config, "n_inner", None) or 4 * h)
        return 4 * h * h + 2 * h * inner
    heads, kv = (
        int(config.num_attention_heads),
        int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
    )
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    return attention + 3 * h * int(config.intermediate_size)


def block_flops(config: PretrainedConfig, batch: int, length: int) -> float:
    """Forward FLOPs of one block for a (batch, length) step; the backward costs about the same."""
    tokens = batch * length
    return 2.0 * block_params(config) * tokens + 4.0 * tokens * length * int(config.hidden_size)


def head_flops(config: PretrainedConfig, batch: int, length: int) -> float:
    """Forward FLOPs of the LM head (the final norm and the loss are negligible) for a (batch, length) step."""
    return 2.0 * int(config.hidden_size) * int(config.vocab_size) * batch * length
