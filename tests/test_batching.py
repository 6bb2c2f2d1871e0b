"""The batched server segment: several devices' batches of a step merged into as few passes as fit, equal to
serving them one by one (loss, accuracy, the gradient each device gets, every LoRA gradient; fp32, 1e-5)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_runtime import assert_equals_centralised, equivalence_job, read_metrics, run_job, shards
from test_usplit import assert_u_equals_centralised, u_job

from splitft.coordinator.server import BatchItem, ServerModel
from splitft.shared.job.config import JobConfig, OptimizerSettings
from splitft.shared.model.lora import lora_state
from splitft.shared.wire.messages import Activations

from conftest import Broker

# (agent, cut, rows, length): devices cut at three depths, batches of different lengths
DEVICES = [("d1", 1, 2, 20), ("d2", 3, 2, 32), ("d3", 1, 3, 17), ("d4", 5, 2, 32), ("d5", 3, 1, 9)]


def batches(hidden_size: int, vocab: int) -> list[BatchItem]:
    gen = torch.Generator().manual_seed(3)
    items = []
    for agent, cut, rows, length in DEVICES:
        lengths = torch.randint(length // 2, length + 1, (rows,), generator=gen)
        lengths[0] = length
        labels = torch.randint(0, vocab, (rows, length), generator=gen)
        prompt = torch.arange(length).unsqueeze(0) < (lengths // 3).unsqueeze(1)  # no loss on the prompt
        padding = torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)
        labels[prompt | padding] = -100
        hidden = torch.randn(rows, length, hidden_size, generator=gen)
        items.append(BatchItem(agent, cut, Activations(hidden, labels, lengths, {})))
    return items


def server() -> ServerModel:
    job = JobConfig(model="tiny-gpt2", optimizer=OptimizerSettings(name="sgd", lr=0.1))
    return ServerModel(job, [1, 3, 5])


def summed_grads(model: ServerModel) -> dict[str, torch.Tensor]:
    shares = model._step_grads.values()
    return {n: sum(s[n] for s in shares if n in s) for n in model.params if any(n in s for s in shares)}  # type: ignore[misc]


@pytest.mark.parametrize("max_tokens", [0, 96])  # one pass; several passes under a cap
def test_merged_passes_equal_one_device_at_a_time(max_tokens: int) -> None:
    one, merged = server(), server()
    items = batches(one.hidden_size, one.vocab_size)
    alone = {i.agent: one.train_on(i.cut, i.act, i.agent) for i in items}
    together = merged.train_batch(items, max_tokens=max_tokens)
    assert set(together) == set(alone)
    for agent, expected in alone.items():
        got = together[agent]
        assert got.tokens == expected.tokens
        assert got.loss == pytest.approx(expected.loss, rel=1e-5)
        assert got.accuracy == pytest.approx(expected.accuracy, abs=1e-9)
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-5, atol=1e-7)
    assert merged._step_tokens == one._step_tokens
    expected_grads, got_grads = summed_grads(one), summed_grads(merged)
    assert set(got_grads) == set(expected_grads) and expected_grads
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    if max_tokens:
        assert len(merged._step_grads) > 1  # the cap did split the step into passes
    one.finish_step()
    merged.finish_step()
    for name, p in one.params.items():  # one SGD step from equal gradients: equal adapters
        torch.testing.assert_close(merged.params[name], p, rtol=1e-5, atol=1e-7, msg=name)


async def test_batched_job_equals_centralised_sgd(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through Mosquitto, with the server merging every step's activations: still centralised SGD on the
    union batch (the cuts 1, 2, 3 join the merged pass at their own blocks)."""
    job = replace(equivalence_job("batched"), server_batching=True)
    data = shards(tmp_path)
    merged: list[list[str]] = []
    train_batch = ServerModel.train_batch

    def spy(self: ServerModel, items: list[BatchItem], max_tokens: int = 0) -> dict:
        merged.append([i.agent for i in items])  # which agents each merged step took; then the real thing
        return train_batch(self, items, max_tokens)

    monkeypatch.setattr(ServerModel, "train_batch", spy)
    coordinator = await run_job(broker, tmp_path / "out", job, data)
    assert coordinator.server is not None
    assert merged == [sorted(data)] * job.rounds  # one merged pass per step, every agent in it
    assert_equals_centralised(lora_state(coordinator.server.segment.peft_model), job, data)
    metrics = read_metrics(tmp_path / "out")
    assert all(a["server_s"] > 0 and a["dropped"] is None for m in metrics[1:] for a in m["agents"].values())


# U split: each device's tail start; rows join the merged batch at their cut and leave it there
U_TAIL_STARTS = {"d1": 10, "d2": 9, "d3": 12, "d4": 11, "d5": 7}


def u_batches(hidden_size: int, vocab: int, which: str) -> list[BatchItem]:
    if which == "cuts":  # the two-part test's devices, each with a tail
        return [replace(i, tail_start=U_TAIL_STARTS[i.agent]) for i in batches(hidden_size, vocab)]
    gen = torch.Generator().manual_seed(5)  # "gap": no device between block 3 (g1 leaves) and 4 (g2 joins)
    return [
        BatchItem("g1", 1, Activations(torch.randn(2, 12, hidden_size, generator=gen), None, torch.tensor([12, 7]), {}), 3),
        BatchItem("g2", 4, Activations(torch.randn(1, 16, hidden_size, generator=gen), None, torch.tensor([16]), {}), 6),
    ]  # fmt: skip


@pytest.mark.parametrize(("which", "max_tokens", "dropped"), [("cuts", 0, "d3"), ("cuts", 96, None), ("gap", 0, None)])
def test_merged_u_passes_equal_one_device_at_a_time(which: str, max_tokens: int, dropped: str | None) -> None:
    """forward_batch/backward_batch equal forward_middle/backward_middle device by device: the activations
    entering each tail, the gradient each device gets, every LoRA gradient and the block token counts; a
    device dropped between the two passes (no tail gradient) leaves nothing in the step."""
    one, merged, reference = server(), server(), server()
    items = u_batches(one.hidden_size, one.vocab_size, which)
    gen = torch.Generator().manual_seed(6)
    tail_grads = {i.agent: torch.randn(i.act.hidden.shape, generator=gen) for i in items}
    alone = {i.agent: one.forward_middle(i.cut, i.tail_start, i.act) for i in items}
    expected = {i.agent: one.backward_middle(alone[i.agent], tail_grads[i.agent], i.agent) for i in items}
    together = merged.forward_batch(items, max_tokens=max_tokens)
    assert set(together) == set(alone)
    for agent, step in alone.items():
        torch.testing.assert_close(together[agent].top, step.top, rtol=1e-5, atol=1e-6, msg=agent)
        assert together[agent].tokens == step.tokens
    kept = {a: g for a, g in tail_grads.items() if a != dropped}
    grads = merged.backward_batch(together, kept)
    assert set(grads) == set(kept)
    for agent, grad in grads.items():
        torch.testing.assert_close(grad, expected[agent], rtol=1e-5, atol=1e-7, msg=agent)
    for i in items:  # the per-device path of the devices that finished
        if i.agent in kept:
            reference.backward_middle(reference.forward_middle(i.cut, i.tail_start, i.act), kept[i.agent], i.agent)
    assert merged._step_tokens == reference._step_tokens
    expected_grads, got_grads = summed_grads(reference), summed_grads(merged)
    assert set(got_grads) == set(expected_grads) and expected_grads
    for name, grad in expected_grads.items():  # (summed in another order: rounding, at the tensor's scale)
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()), msg=name)
    if max_tokens:
        assert len({s.merged for s in together.values()}) > 1  # the cap did split the step into passes


async def test_batched_u_job_equals_centralised_sgd(broker: Broker, tmp_path: Path) -> None:
    """Through Mosquitto, the U split with every step's activations and tail gradients merged: still
    centralised SGD on the union objective (cuts 1/2/3, tails 0/1/2)."""
    job = u_job("ubatched", server_batching=True)
    data = shards(tmp_path)
    coordinator = await run_job(broker, tmp_path / "out", job, data)
    assert coordinator.server is not None
    assert_u_equals_centralised(lora_state(coordinator.server.segment.peft_model), job, data)
    metrics = read_metrics(tmp_path / "out")
    assert all(a["server_s"] > 0 and a["dropped"] is None for m in metrics[1:] for a in m["agents"].values())
