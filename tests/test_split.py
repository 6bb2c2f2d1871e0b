"""Split equals whole: one step through client + codec + server == the unsplit PEFT model.

Both crossings (activations up, activation gradient down) go through the real codec with an fp32
wire; loss and the gradient of every LoRA weight must agree to a relative 1e-5. The U-shaped split
(the device also holds the last blocks and the head) too, with its four crossings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, Qwen2Config

from splitft.shared.errors import ConfigError
from splitft.shared.model.equivalence import u_split_step
from splitft.shared.model.loading import load_config
from splitft.shared.model.lora import LoraSettings, block_ranks, load_lora_state
from splitft.shared.model.loss import causal_lm_loss, labels_from
from splitft.shared.model.split import SegmentSpec, build_segment
from splitft.shared.wire.codec import decode_tensor, encode_tensor, pack, unpack

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
    assert_same_gradients(whole_params, {**client.lora_parameters(), **server.lora_parameters()})


def assert_same_gradients(whole: dict[str, torch.nn.Parameter], split: dict[str, torch.nn.Parameter]) -> None:
    """Every LoRA weight of the whole model got a non-zero gradient, and the split the same one."""
    assert set(split) == set(whole)
    for name, p in whole.items():
        g_whole, g_split = p.grad, split[name].grad
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


# --------------------------------------------------------------------------- the U-shaped split


def check_u_split_equals_whole(source: str, cut: int, tail: int, attention: str, lengths: list[int]) -> None:
    """Device (embeddings, blocks 0..c-1, the last ``tail`` blocks, head) + server (the middle) == whole.

    All four crossings go through the codec (fp32); the loss is taken on the device.
    """
    config = load_config(source, attention)
    total = config.num_hidden_layers
    lora = LoraSettings(r=8, r_cut=4)
    device_spec = SegmentSpec.u_device(cut, tail, total)
    ranks = block_ranks(total, device_spec.cuts(total), lora)
    build = {"lora": lora, "ranks": ranks, "attn_implementation": attention}
    whole = build_segment(source, SegmentSpec.whole(total), **build)
    device = build_segment(source, device_spec, **build)
    server = build_segment(source, SegmentSpec(cut, total - tail, embed=False, head=False), **build)
    assert sorted({block_of(n) for n in device.lora_parameters()}) == [*range(cut), *range(total - tail, total)]
    assert sorted({block_of(n) for n in server.lora_parameters()}) == list(range(cut, total - tail))

    gen = torch.Generator().manual_seed(1)
    whole_params = whole.lora_parameters()
    state = {n: torch.randn(p.shape, generator=gen) * 0.05 for n, p in whole_params.items()}
    load_lora_state(whole.peft_model, state)
    for part in (device, server):
        load_lora_state(part.peft_model, {n: state[n] for n in part.lora_parameters()})

    input_ids, mask = padded_batch(config.vocab_size, lengths)
    labels = labels_from(input_ids, mask)
    reference = whole.peft_model(input_ids=input_ids, attention_mask=mask, labels=labels)
    reference.loss.backward()
    loss = u_split_step(device, server, input_ids, mask, labels, "fp32")

    assert loss.item() == pytest.approx(reference.loss.item(), rel=RTOL)
    assert_same_gradients(whole_params, {**device.lora_parameters(), **server.lora_parameters()})


def block_of(name: str) -> int:
    parts = name.split(".")
    return int(next(parts[i + 1] for i, p in enumerate(parts) if p in ("h", "layers")))


@pytest.mark.parametrize(
    ("cut", "tail", "attention"), [(1, 0, "eager"), (2, 1, "sdpa"), (3, 8, "sdpa"), (6, 5, "eager")]
)
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_u_split_equals_whole_presets(preset: str, cut: int, tail: int, attention: str) -> None:
    check_u_split_equals_whole(preset, cut, tail, attention, lengths=[13, 7, 2])


@pytest.mark.parametrize("tail", [0, 1])
@pytest.mark.parametrize("family", sorted(FOLDER_CONFIGS))
def test_u_split_equals_whole_local_folders(tmp_path: Path, family: str, tail: int) -> None:
    folder = save_model(FOLDER_CONFIGS[family], tmp_path / family)
    check_u_split_equals_whole(str(folder), 1, tail, "sdpa", lengths=[12, 9, 4])


def test_u_device_holds_only_its_ends(tmp_path: Path) -> None:
    """Tied embeddings (GPT-2) share one tensor with the head on the device; an untied head (Qwen2) is loaded
    as its own weight; no block of the server's middle is held."""
    gpt2 = build_segment("tiny-gpt2", SegmentSpec.u_device(2, 1, 12))
    model = gpt2.hf_model
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    held = {int(n.split(".")[2]) for n, _ in model.named_parameters() if n.startswith("transformer.h.")}
    assert held == {0, 1, 11}
    folder = save_model(FOLDER_CONFIGS["qwen2"], tmp_path / "qwen2")
    qwen = build_segment(str(folder), SegmentSpec.u_device(1, 1, 4)).hf_model
    assert qwen.lm_head.weight.data_ptr() != qwen.model.embed_tokens.weight.data_ptr()
    held = {int(n.split(".")[2]) for n, _ in qwen.named_parameters() if n.startswith("model.layers.")}
    assert held == {0, 3}
    with pytest.raises(ValueError, match="not held"):
        gpt2(torch.zeros(1, 4, 128), torch.ones(1, 4, dtype=torch.long), start=5)


def test_u_device_spec_is_checked() -> None:
    with pytest.raises(ConfigError, match="tail must start after"):
        SegmentSpec.u_device(6, 6, 12)
    with pytest.raises(ConfigError, match="holds the LM head"):
        SegmentSpec(0, 2, embed=True, head=False, tail_start=10)
    assert SegmentSpec.u_device(2, 0, 12).cuts(12) == [2]
    assert SegmentSpec.u_device(2, 3, 12).blocks(12) == [0, 1, 9, 10, 11]
