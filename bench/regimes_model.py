"""The model of the regimes study (:mod:`.regimes`): the study's small base by default, or any model's shape; what
LoRA adapts in one of its blocks, what the results say of it, and this machine's rates on it (for comparison
only: the regimes' servers are named, not measured)."""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GPT2Config, PretrainedConfig

from splitft.bench.clock import Server, calibrate_server
from splitft.shared.model.loading import num_layers


def base_config() -> PretrainedConfig:
    """The study's base model (splitft.tools.pretrain's default shape): 12 blocks, width 256, vocab 8,192."""
    return GPT2Config(
        vocab_size=8192, n_positions=256, n_embd=256, n_layer=12, n_head=4, n_inner=1024, bos_token_id=0, eos_token_id=0
    )


def adapted_shapes(config: PretrainedConfig) -> list[tuple[int, int]]:
    """(in, out) of every matrix LoRA adapts in one block (the family's default targets): GPT-2's c_attn,
    c_proj (attention and MLP) and c_fc; the LLaMA family's q, k, v, o, gate, up and down projections."""
    h = int(config.hidden_size)
    if config.model_type == "gpt2":
        inner = int(getattr(config, "n_inner", None) or 4 * h)
        return [(h, 3 * h), (h, h), (h, inner), (inner, h)]
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    inner = int(config.intermediate_size)
    q, k = heads * head_dim, kv * head_dim
    return [(h, q), (h, k), (h, k), (q, h), (h, inner), (h, inner), (inner, h)]


def describe_model(name: str, source: str, config: PretrainedConfig) -> dict[str, Any]:
    """What the results say of the model: its name, where it was read from ('' for the base), its family, shape
    and parameter count (counted on the meta device: no weights are made)."""
    with torch.device("meta"):
        parameters = AutoModelForCausalLM.from_config(config).num_parameters()
    return {
        "name": name,
        "source": source,
        "type": config.model_type,
        "parameters": parameters,
        "layers": num_layers(config),
        "hidden": int(config.hidden_size),
        "vocab": int(config.vocab_size),
    }


def calibrate_host(batch: int, length: int, config: PretrainedConfig | None = None, repeats: int = 5) -> Server:
    """This machine's server rates on the model's shape (random weights: the speed does not depend on them). For
    comparison only (``scripts/regimes.py --calibrate``): the regimes' servers are named, not measured."""
    with tempfile.TemporaryDirectory(prefix="splitft-regimes-") as folder:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config if config is not None else base_config()).save_pretrained(folder)
        return calibrate_server(folder, batch, length, repeats=repeats)[0]
