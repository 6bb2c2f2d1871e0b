"""Model sources, families and segment building: what loads, what is refused, what a device holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, LlamaConfig

from splitft.shared.errors import ConfigError, ModelError
from splitft.shared.model.loading import PRESETS, load_config
from splitft.shared.model.lora import LoraSettings, block_ranks, init_lora, lora_state
from splitft.shared.model.split import SegmentSpec, build_segment

from conftest import save_model


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_have_twelve_blocks_and_fixed_weights(preset: str) -> None:
    assert load_config(preset).num_hidden_layers == 12
    a = build_segment(preset, SegmentSpec.client(2))
    b = build_segment(preset, SegmentSpec.client(2))
    base_a = {n: p for n, p in a.peft_model.named_parameters() if "lora_" not in n}
    base_b = dict(b.peft_model.named_parameters())
    assert all(torch.equal(p, base_b[n]) for n, p in base_a.items())


def test_client_segment_loads_only_its_blocks(tmp_path: Path) -> None:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=2,
        tie_word_embeddings=False,
    )
    folder = save_model(config, tmp_path / "llama")
    client = build_segment(str(folder), SegmentSpec.client(2))
    names = [n for n, _ in client.peft_model.named_parameters()]
    assert any(".layers.1." in n for n in names)
    assert not any(f".layers.{i}." in n for i in range(2, 6) for n in names)
    assert not any("lm_head" in n or (n.endswith("norm.weight") and ".layers." not in n) for n in names)
    assert not any(p.is_meta for p in client.peft_model.parameters())
    per_block = 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32
    base = sum(p.numel() for n, p in client.peft_model.named_parameters() if "lora_" not in n)
    assert base == 256 * 32 + 2 * per_block  # embeddings + two blocks, nothing else

    server = build_segment(str(folder), SegmentSpec.server(2, 6))
    base = sum(p.numel() for n, p in server.peft_model.named_parameters() if "lora_" not in n)
    assert base == 4 * per_block + 32 + 256 * 32  # four blocks, final norm, untied LM head
    with pytest.raises(RuntimeError, match="not held"):
        server.hf_model.model.embed_tokens(torch.zeros(1, 1, dtype=torch.long))


def test_segments_share_adapter_names_and_initial_values() -> None:
    lora = LoraSettings(r=4, r_cut=2)
    ranks = block_ranks(12, [5], lora)
    whole = build_segment("tiny-gpt2", SegmentSpec.whole(12), lora=lora, ranks=ranks, lora_seed=3)
    client = build_segment("tiny-gpt2", SegmentSpec.client(5), lora=lora, lora_seed=3)
    server = build_segment("tiny-gpt2", SegmentSpec.server(5, 12), lora=lora, lora_seed=3)
    w = lora_state(whole.peft_model)
    parts = {**lora_state(client.peft_model), **lora_state(server.peft_model)}
    assert set(parts) == set(w)
    assert all(torch.equal(parts[n], w[n]) for n in w)
    assert all(n.startswith("base_model.model.transformer.h.") for n in w)
    b = [t for n, t in w.items() if "lora_B" in n]
    assert b and all(not t.any() for t in b)  # B starts at zero: the adapted model equals the base
    init_lora(whole.peft_model, 4)
    assert not all(torch.equal(t, w[n]) for n, t in lora_state(whole.peft_model).items() if "lora_A" in n)


def test_ranks_and_scaling_per_block() -> None:
    lora = LoraSettings(r=16, r_cut=8, alpha_per_rank=2.0)
    client = build_segment("tiny-llama", SegmentSpec.client(4), lora=lora)
    server = build_segment("tiny-llama", SegmentSpec.server(4, 12), lora=lora)
    assert client.ranks == {0: 16, 1: 16, 2: 16, 3: 8}
    assert server.ranks[4] == 8 and all(server.ranks[i] == 16 for i in range(5, 12))
    for segment in (client, server):
        for name, module in segment.peft_model.named_modules():
            if name.endswith("q_proj") and hasattr(module, "lora_A"):
                block = int(name.split(".layers.")[1].split(".")[0])
                assert module.lora_A["default"].weight.shape[0] == segment.ranks[block]
                assert module.scaling["default"] == pytest.approx(2.0)


def test_block_ranks_rules() -> None:
    lora = LoraSettings(r=16, r_cut=8)
    assert block_ranks(4, [], lora) == {0: 16, 1: 16, 2: 16, 3: 16}
    assert block_ranks(4, [1, 3], lora) == {0: 8, 1: 8, 2: 8, 3: 8}
    for bad in (0, 4):
        with pytest.raises(ConfigError, match="cut layer"):
            block_ranks(4, [bad], lora)


@pytest.mark.parametrize(
    ("field", "value"), [("r", 0), ("r_cut", -1), ("alpha_per_rank", 0.0), ("dropout", 1.0), ("targets", ())]
)
def test_lora_settings_name_the_bad_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        LoraSettings(**{field: value})  # type: ignore[arg-type]


def test_segment_spec_rules() -> None:
    with pytest.raises(ConfigError):
        SegmentSpec(3, 3, embed=False, head=False)
    with pytest.raises(ConfigError):
        SegmentSpec(1, 4, embed=True, head=False)
    with pytest.raises(ConfigError, match="has 12 blocks"):
        build_segment("tiny-gpt2", SegmentSpec.server(3, 13))
    with pytest.raises(ConfigError, match=r"cut layers are 1\.\.11"):
        build_segment("tiny-gpt2", SegmentSpec.client(12))


def test_bad_model_sources(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="neither a preset"):
        load_config("no-such-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_config(str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read the config"):
        load_config(str(broken))
    with pytest.raises(ModelError, match="attention"):
        load_config("tiny-gpt2", "flash")

    bert = tmp_path / "bert"
    BertConfig(num_hidden_layers=2).save_pretrained(bert)
    with pytest.raises(ModelError, match="unsupported model type 'bert'"):
        load_config(str(bert))

    no_weights = tmp_path / "no-weights"
    load_config("tiny-llama").save_pretrained(no_weights)
    with pytest.raises(ModelError, match=r"no model\.safetensors"):
        build_segment(str(no_weights), SegmentSpec.client(2))


def test_checkpoint_missing_a_needed_tensor(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        tie_word_embeddings=False,
    )
    folder = save_model(config, tmp_path / "m")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.3.mlp.up_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    build_segment(str(folder), SegmentSpec.client(2))  # the client never needs block 3
    with pytest.raises(ModelError, match=r"lacks 1 weights.*layers\.3\.mlp\.up_proj"):
        build_segment(str(folder), SegmentSpec.server(2, 4))


def test_sharded_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_config("tiny-llama"))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    assert json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    server = build_segment(str(tmp_path / "sharded"), SegmentSpec.server(6, 12))
    ref = model.model.layers[7].mlp.down_proj.weight
    got = server.hf_model.model.layers[7].mlp.down_proj.base_layer.weight
    assert torch.equal(got, ref)


def test_sequences_longer_than_the_positions_are_refused() -> None:
    """GPT-2's learned positions end at n_positions: a longer max_length is a clear error, not an IndexError."""
    from transformers import GPT2Config

    from splitft.shared.errors import WireError
    from splitft.shared.model.loading import check_max_length, max_positions
    from splitft.shared.wire.control import parse_assign

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64)
    assert max_positions(config) == 64 and max_positions(load_config("tiny-llama")) == 1024
    check_max_length(config, 64)
    with pytest.raises(ConfigError, match="max_length 65 exceeds the model's 64 positions"):
        check_max_length(config, 65)
    body = {
        "model": "m", "fingerprint": "m1", "cut": 1, "ranks": [8], "lora": {}, "adapter": {}, "local_steps": 1, "batch_size": 1,
        "max_length": 65, "optimizer": {}, "wire_dtype": "fp16", "adapter_wire_dtype": "fp32",
        "step_timeout_s": 10.0, "seed": 0,
    }  # fmt: skip
    with pytest.raises(WireError, match="exceeds the model's 64 positions"):
        parse_assign(1, body, "m1", 2, max_positions(config))
    assert parse_assign(1, {**body, "max_length": 64}, "m1", 2, 64).max_length == 64
