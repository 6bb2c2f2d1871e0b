"""Split equals whole: one step through client + codec + server == the unsplit PEFT model.

Both crossings (activations up, activation gradient down) go through the real codec with an fp32
wire; loss and the gradient of every LoRA weight must agree to a relative 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, Qwen2Config

from splitft.shared.codec import decode_tensor, encode_tensor, pack, unpack
from splitft.shared.lora import LoraSettings, block_ranks, load_lora_state
from splitft.shared.models import load_config
from splitft.shared.split import SegmentSpec, build_segment, causal_lm_loss, labels_from

from conftest import save_model

RTOL = 1e-5


def padded_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.randint(0, vocab, (len(lengths), width), generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return input_ids, mask


def check_split_equals_whole(source: str, cut: int, attention: str, lengths: list[int]) -> None:
    config = load_config(source, attention)
    total = config.num_hidden_layers
    lora = LoraSettings(r=8, r_cut=4)
    ranks = block_ranks(total, [cut], lora)
    build = {"lora": lora, "ranks": ranks, "attn_implementation": attention}
    whole = build_segment(source, SegmentSpec.whole(total), **build)
    client = build_segment(source, SegmentSpec.client(cut), **build)
    server = build_segment(source, SegmentSpec.server(cut, total), **build)

    # Non-zero A and B everywhere, the same in the whole model and in the two segments.
    gen = torch.Generator().manual_seed(1)
    whole_params = whole.lora_parameters()
    state = {n: torch.randn(p.shape, generator=gen) * 0.05 for n, p in whole_params.items()}
    load_lora_state(whole.peft_model, state)
    load_lora_state(client.peft_model, {n: state[n] for n in client.lora_parameters()})
    load_lora_state(server.peft_model, {n: state[n] for n in server.lora_parameters()})
    assert {p.shape[0] for n, p in server.lora_parameters().items() if f".{cut}." in n and "lora_A" in n} == {4}

    input_ids, mask = padded_batch(config.vocab_size, lengths)
    labels = labels_from(input_ids, mask)

    # The reference: Hugging Face's own forward and loss on the unsplit PEFT model.
    reference = whole.peft_model(input_ids=input_ids, attention_mask=mask, labels=labels)
    reference.loss.backward()

    # The split: activations up and gradients down as msgpack + zstd bytes.
    hidden = client(input_ids, mask)
    assert hidden.shape == (len(lengths), max(lengths), config.hidden_size)
    up = pack({"act": encode_tensor(hidden, "fp32")})
    received = decode_tensor(unpack(up)["act"], expect_shape=list(hidden.shape)).requires_grad_()
    loss = causal_lm_loss(server(received, mask), labels)
    loss.backward()
    down = pack({"grad": encode_tensor(received.grad, "fp32")})
    hidden.backward(decode_tensor(unpack(down)["grad"], expect_shape=list(hidden.shape)))

    assert loss.item() == pytest.approx(reference.loss.item(), rel=RTOL)
    split_params = {**client.lora_parameters(), **server.lora_parameters()}
    assert set(split_params) == set(whole_params)
    for name, p in whole_params.items():
        g_whole, g_split = p.grad, split_params[name].grad
        assert g_whole is not None and g_split is not None, name
        assert g_whole.norm() > 0, f"{name} got no gradient: the comparison would prove nothing"
        torch.testing.assert_close(g_split, g_whole, rtol=RTOL, atol=RTOL * g_whole.abs().max().item())


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("cut", [1, 6, 11])
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_split_equals_whole_presets(preset: str, cut: int, attention: str) -> None:
    check_split_equals_whole(preset, cut, attention, lengths=[13, 7, 2])


FOLDER_CONFIGS = {
    # bias on q/k/v, untied head
    "qwen2": Qwen2Config(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    # sliding-window attention shorter than the batch: the mask each segment builds must slide
    "mistral": MistralConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=5,
    ),
}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("family", sorted(FOLDER_CONFIGS))
def test_split_equals_whole_local_folders(tmp_path: Path, family: str, attention: str) -> None:
    folder = save_model(FOLDER_CONFIGS[family], tmp_path / family)
    check_split_equals_whole(str(folder), 2, attention, lengths=[12, 9, 4])


def test_gpt2_folder_with_tied_head(tmp_path: Path) -> None:
    """GPT-2 checkpoints store the LM head once, as the tied token embedding: the server must find it."""
    folder = save_model(load_config("tiny-gpt2"), tmp_path / "gpt2")
    check_split_equals_whole(str(folder), 3, "eager", lengths=[10, 6])
