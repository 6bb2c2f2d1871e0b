"""Small GGUF files written on the spot, so tests can import a GGUF model without downloading one.

The files are laid out the way llama.cpp's ``convert_hf_to_gguf.py`` lays out a Llama checkpoint
(metadata keys, tensor names, the q/k row permutation, a "gpt2" BPE vocabulary), because that is the
shape every GGUF found in the wild has, and the shape transformers' GGUF loader expects. All tensors
are F32: no quantization, so a file read back gives the very weights that were written, and a test can
compare bit for bit.

The model is the ``tiny-llama`` preset's architecture with fewer blocks (4 instead of 12): the
embedding (50257 x 128) dominates the file either way, but fewer blocks keep writing, loading and any
forward pass in a test cheap. Pass ``model=`` to write another Llama (the full preset, say).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from splitft.shared.model.loading import load_config
from splitft.shared.model.tokenizer import GPT2_TOKENIZER

__all__ = [
    "CHAT_TEMPLATE",
    "GGUF_MODEL_NAME",
    "GPT2_EOS",
    "tiny_llama_model",
    "write_llama_gguf",
    "write_unsupported_gguf",
]

#: A small ChatML-style template. ``<|im_start|>`` is not one token of the GPT-2 vocabulary; it only
#: has to render, so that a test can see the template travel from the file to the tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: ``general.name`` of the written Llama file. It must not contain "mistral": transformers then reads
#: a "llama" file as a Mistral.
GGUF_MODEL_NAME = "SplitFT Tiny Llama"

#: The GPT-2 end-of-text token, BOS and EOS at once (as in the presets' configs).
GPT2_EOS = "<|endoftext|>"

#: Blocks of the default model: few, since the embedding makes most of the file anyway.
DEFAULT_LAYERS = 4


def tiny_llama_model(num_layers: int = DEFAULT_LAYERS, seed: int = 0) -> LlamaForCausalLM:
    """The ``tiny-llama`` preset's architecture with ``num_layers`` blocks, seeded random weights.

    Built from the preset's own config, so the file tracks the preset (width, heads, GQA, vocabulary,
    tied embeddings) if it ever changes; only the depth is cut, to keep the file and the test fast.
    """
    preset = load_config("tiny-llama").to_dict()
    preset["num_hidden_layers"] = num_layers
    config = LlamaConfig.from_dict(preset)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert isinstance(model, LlamaForCausalLM)
    return model.eval()


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: q/k rows reordered from HF's rotate-half to GGML's interleaved rope.

    transformers undoes exactly this on load (``LlamaTensorProcessor._reverse_permute_weights``), so a
    file without it would load with scrambled attention.
    """
    if n_head != n_head_kv:
        n_head = n_head_kv
    return np.ascontiguousarray(
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _add_gpt2_vocab(writer: gguf.GGUFWriter, vocab_size: int, chat_template: str | None) -> None:
    """The vendored GPT-2 tokenizer, as ``convert_hf_to_gguf.py`` writes a "gpt2"-model BPE vocabulary.

    Tokens are stored in GPT-2's byte-level spelling (``Ġthe``), the end-of-text token is marked
    CONTROL (it is a special added token), ids the vocabulary lacks would be padding. BOS and EOS are
    both ``<|endoftext|>``; ``add_bos_token`` is written false because GPT-2 prepends nothing, which
    is also what SplitFT's own tokenizer for the presets does.
    """
    spec = json.loads(GPT2_TOKENIZER.read_text(encoding="utf-8"))
    by_id = {index: token for token, index in spec["model"]["vocab"].items()}
    special = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        special[added["id"]] = bool(added["special"])
    tokens: list[str] = []
    types: list[int] = []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if special.get(index) else gguf.TokenType.NORMAL)
    # tokenizer.json has "a b" strings in older files and ["a", "b"] pairs in newer ones; GGUF wants "a b".
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    eos = tokens.index(GPT2_EOS)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def write_llama_gguf(
    path: Path,
    *,
    chat_template: str | None = CHAT_TEMPLATE,
    model: LlamaForCausalLM | None = None,
) -> LlamaForCausalLM:
    """Write ``model`` (default: :func:`tiny_llama_model`) to ``path`` as an all-F32 llama.cpp-style GGUF.

    Returns the model written, the source of truth a test compares the imported one against. Metadata
    keys and tensor names are llama.cpp's for architecture "llama"; there is no ``output.weight``
    when the head is tied to the embedding, which is how a reader tells the two apart. The tokenizer
    is the vendored GPT-2 one; ``chat_template=None`` leaves ``tokenizer.chat_template`` out.
    """
    if model is None:
        model = tiny_llama_model()
    config = model.config
    n_head = int(config.num_attention_heads)
    n_head_kv = int(config.num_key_value_heads or n_head)  # None means one KV head per query head
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    tied = bool(getattr(config, "tie_word_embeddings", False))

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "llama")  # also writes general.architecture
    writer.add_type("model")
    writer.add_name(GGUF_MODEL_NAME)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_gpt2_vocab(writer, int(config.vocab_size), chat_template)

    state = {name: t.detach().to(torch.float32).cpu().numpy() for name, t in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    parts = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for block in range(int(config.num_hidden_layers)):
        for hf_part, gguf_part in parts.items():
            weights = state[f"model.layers.{block}.{hf_part}.weight"]
            if gguf_part == "attn_q":
                weights = _permute(weights, n_head, n_head)
            elif gguf_part == "attn_k":
                weights = _permute(weights, n_head, n_head_kv)
            writer.add_tensor(f"blk.{block}.{gguf_part}.weight", weights)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not tied:
        writer.add_tensor("output.weight", state["lm_head.weight"])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def write_unsupported_gguf(path: Path, architecture: str = "rwkv7") -> None:
    """A minimal valid GGUF whose ``general.architecture`` is one SplitFT does not split.

    Two tiny tensors and a few metadata keys: enough for a reader to open it and get as far as the
    architecture, which is what a refusal test needs; nothing in it could run.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_type("model")
    writer.add_name(f"SplitFT unsupported {architecture}")
    writer.add_block_count(1)
    writer.add_embedding_length(4)
    writer.add_context_length(16)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
