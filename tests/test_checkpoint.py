"""Checkpoints restore adapters and optimiser state bit for bit; bad checkpoints are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitft.coordinator.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
    verify_checkpoint,
)
from splitft.coordinator.server import ServerModel
from splitft.shared.errors import ConfigError
from splitft.shared.job.config import JobConfig
from splitft.shared.model.lora import lora_state
from splitft.shared.wire.messages import Activations


def trained_server(job: JobConfig, steps: int) -> ServerModel:
    server = ServerModel(job, [2])
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        hidden = torch.randn(2, 9, 128, generator=gen)
        labels = torch.randint(0, 50257, (2, 9), generator=gen)
        server.train_on(2, Activations(hidden, labels, torch.tensor([9, 5]), {}))
        server.finish_step()
    return server


def test_adamw_state_roundtrip_is_exact(tmp_path: Path) -> None:
    job = JobConfig(model="tiny-llama", cut=2)
    server = trained_server(job, steps=3)
    folder = save_checkpoint(tmp_path, 4, server, {"note": "x"})
    assert latest_checkpoint(tmp_path) == folder

    fresh = ServerModel(job, [2])
    state = load_checkpoint(folder, fresh)
    assert state["round"] == 4 and state["note"] == "x"
    before, after = lora_state(server.segment.peft_model), lora_state(fresh.segment.peft_model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    saved, loaded = server.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    assert saved["state"].keys() == loaded["state"].keys() and saved["state"]
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, loaded["state"][index][key]), (index, key)

    # One more identical step on both: the restored run continues exactly like the original.
    gen = torch.Generator().manual_seed(9)
    hidden, labels = torch.randn(2, 9, 128, generator=gen), torch.randint(0, 50257, (2, 9), generator=gen)
    for s in (server, fresh):
        s.train_on(2, Activations(hidden, labels, torch.tensor([9, 9]), {}))
        s.finish_step()
    before, after = lora_state(server.segment.peft_model), lora_state(fresh.segment.peft_model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_only_complete_checkpoints_count_and_old_ones_go(tmp_path: Path) -> None:
    job = JobConfig(model="tiny-gpt2", cut=2, optimizer=JobConfig().optimizer)
    server = trained_server(job, steps=1)
    for r in range(1, 6):
        save_checkpoint(tmp_path, r, server, {})
    (tmp_path / ".round-00006.tmp").mkdir()  # a crash while writing round 6
    assert sorted(p.name for p in tmp_path.glob("round-*")) == ["round-00003", "round-00004", "round-00005"]
    assert latest_checkpoint(tmp_path) == tmp_path / "round-00005"


def test_checkpoint_of_another_layout_is_refused(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path, 1, trained_server(JobConfig(model="tiny-gpt2", cut=2), 1), {})
    other = ServerModel(JobConfig(model="tiny-gpt2", cut=5), [5])
    with pytest.raises(ConfigError, match="block ranks"):
        load_checkpoint(folder, other)


def damaged_checkpoint(root: Path) -> Path:
    """A real checkpoint with one byte of its adapter weights flipped."""
    folder = save_checkpoint(root, 1, trained_server(JobConfig(model="tiny-gpt2", cut=2), steps=2), {})
    assert verify_checkpoint(folder) == read_state(folder)["state_digest"]  # intact: its files reproduce it
    path = folder / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    return folder


def test_a_damaged_checkpoint_is_found_from_its_files(tmp_path: Path) -> None:
    folder = damaged_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="damaged: its files do not reproduce its state digest"):
        verify_checkpoint(folder)
    (folder / "optimizer.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="is damaged"):
        verify_checkpoint(folder)


def test_a_server_step_does_not_depend_on_the_order_the_batches_arrived_in() -> None:
    """Three devices' batches in two arrival orders: the same adapters and optimiser state, bit for bit."""
    gen = torch.Generator().manual_seed(4)
    batches = {
        name: Activations(torch.randn(2, 9, 128, generator=gen), torch.randint(0, 50257, (2, 9), generator=gen),
                          torch.tensor([9, 6]), {})
        for name in ("a1", "a2", "a3")
    }  # fmt: skip
    states = []
    for order in (("a1", "a2", "a3"), ("a3", "a1", "a2")):
        server = ServerModel(JobConfig(model="tiny-gpt2", cut=2), [2])
        for name in order:
            server.train_on(2, batches[name], name)
        server.finish_step()
        states.append(lora_state(server.segment.peft_model))
    assert all(torch.equal(states[0][n], states[1][n]) for n in states[0])
