"""The privacy audit and the defenses: real tiny presets, the vendored text, the real CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from splitft.agent.step import forward
from splitft.coordinator.cli import app
from splitft.shared.errors import ConfigError, ExitCode
from splitft.shared.model.defense import DefenseSettings, defend, distance_correlation, distance_loss, nopeek_loss
from splitft.shared.model.lora import lora_state
from splitft.shared.model.split import SegmentSpec, build_segment
from splitft.shared.model.tokenizer import load_tokenizer
from splitft.tools.audit import (
    AttackSettings,
    Bottleneck,
    Channel,
    CutResult,
    DefenseCase,
    TokenBatch,
    audit_inversion,
    audit_labels,
    block_outputs,
    client_segment,
    device_examples,
    device_tokens,
    evaluate_split,
    exact_search,
    finetune_split,
    on_the_wire,
    parse_cuts,
    search_sequences,
)
from splitft.tools.audit.exact import candidate_step
from splitft.tools.audit.report import best_cell

runner = CliRunner()
TINY = AttackSettings(public_tokens=2048, eval_tokens=1024, steps=100, exact_tokens=0)

# --------------------------------------------------------------------------- defend


def test_defend_is_the_identity_when_off() -> None:
    hidden = torch.randn(2, 5, 16)
    assert defend(hidden, DefenseSettings()) is hidden
    assert not DefenseSettings(nopeek=1.0).active  # NoPeek acts on the loss, not on the activations
    assert defend(hidden, DefenseSettings(nopeek=1.0)) is hidden


def test_clip_bounds_every_token_norm_and_leaves_small_tokens_alone() -> None:
    hidden = torch.randn(3, 7, 32) * torch.linspace(0.01, 3.0, 7).view(1, 7, 1)  # norms from ~0.06 to ~17
    clipped = defend(hidden, DefenseSettings(clip=1.5))
    norms, before = clipped.norm(dim=-1), hidden.norm(dim=-1)
    assert float(norms.max()) <= 1.5 + 1e-5
    small = before <= 1.5
    assert small.any() and (~small).any()
    torch.testing.assert_close(clipped[small], hidden[small])
    torch.testing.assert_close(norms[~small], torch.full_like(norms[~small], 1.5))
    # the direction is kept
    cos = torch.nn.functional.cosine_similarity(clipped, hidden, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


@pytest.mark.parametrize(("noise", "clip"), [(0.5, 2.0), (1.0, None), (0.25, 0.3)])
def test_noise_has_the_stated_std(noise: float, clip: float | None) -> None:
    width = 256
    settings = DefenseSettings(noise=noise, clip=clip)
    expected = noise * (clip or 1.0) / math.sqrt(width)
    assert settings.noise_std(width) == pytest.approx(expected)
    sent = defend(torch.zeros(8, 64, width), settings, torch.Generator().manual_seed(0))  # zeros: the clip is a no-op
    assert float(sent.std()) == pytest.approx(expected, rel=0.03)
    assert abs(float(sent.mean())) < expected * 0.02
    # the noise vector of a token has a norm of about noise * clip
    assert float(sent.norm(dim=-1).mean()) == pytest.approx(noise * (clip or 1.0), rel=0.03)


def test_noise_is_seeded() -> None:
    settings, hidden = DefenseSettings(noise=1.0, clip=1.0), torch.randn(2, 4, 8)
    a = defend(hidden, settings, torch.Generator().manual_seed(3))
    b = defend(hidden, settings, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, defend(hidden, settings, torch.Generator().manual_seed(4)))


def test_gradients_flow_through_clip_and_noise() -> None:
    hidden = (torch.randn(2, 3, 8) * 3).requires_grad_(True)
    direction = torch.randn(2, 3, 8)
    (
        defend(hidden, DefenseSettings(noise=0.5, clip=1.0), torch.Generator().manual_seed(0)) * direction
    ).sum().backward()
    grad = hidden.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the gradient is the clip's alone: the same without the (additive) noise
    plain = hidden.detach().clone().requires_grad_(True)
    (defend(plain, DefenseSettings(clip=1.0)) * direction).sum().backward()
    torch.testing.assert_close(grad, plain.grad)
    # a clipped token's gradient is projected: no component along the token itself
    radial = (grad * hidden.detach()).sum(-1)
    torch.testing.assert_close(radial, torch.zeros_like(radial), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"noise": -0.1}, "defense.noise"),
        ({"noise": float("nan")}, "defense.noise"),
        ({"noise": True}, "defense.noise"),
        ({"clip": 0.0}, "defense.clip"),
        ({"clip": -1.0}, "defense.clip"),
        ({"clip": float("inf")}, "defense.clip"),
        ({"nopeek": -1.0}, "defense.nopeek"),
        ({"nopeek": "1"}, "defense.nopeek"),
    ],
)
def test_bad_defense_settings_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        DefenseSettings(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"steps": 0}, "audit.steps"), ({"window": -1}, "audit.window"), ({"lr": 2.0}, "audit.lr")],
)
def test_bad_attack_settings_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        AttackSettings(**kwargs)  # type: ignore[arg-type]


def test_distance_correlation_and_nopeek_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (4, 32), generator=gen)
    mask = torch.ones_like(ids)
    table = torch.randn(6, 16, generator=gen)
    leaky = table[ids].requires_grad_(True)  # activations that are a function of the token
    independent = torch.randn(4, 32, 16, generator=gen)
    high = nopeek_loss(ids, leaky, mask, weight=1.0)
    low = nopeek_loss(ids, independent, mask, weight=1.0)
    assert 0.0 <= float(low) < 0.35 < 0.9 < float(high.detach()) <= 1.0 + 1e-5
    high.backward()
    assert leaky.grad is not None and torch.isfinite(leaky.grad).all()
    x = torch.randn(50, 3, generator=gen)
    assert float(distance_correlation(torch.cdist(x, x), x)) == pytest.approx(1.0, abs=1e-4)
    assert float(nopeek_loss(ids, leaky, mask, weight=0.5).detach()) == pytest.approx(
        0.5 * float(high.detach()), rel=1e-5
    )


# --------------------------------------------------------------------------- the audit


def test_block_outputs_equal_the_client_segment() -> None:
    tokenizer = load_tokenizer("tiny-gpt2")
    data = device_tokens(device_examples(tokenizer, 200, 48), tokenizer.pad_token_id)
    deep = build_segment("tiny-gpt2", SegmentSpec.client(4))
    hidden = block_outputs(deep, data, [1, 3, 4])
    for cut in (1, 3, 4):
        expected = build_segment("tiny-gpt2", SegmentSpec.client(cut))(data.ids, data.mask)
        torch.testing.assert_close(hidden[cut], expected)


def test_inversion_recovers_tokens_at_cut_1_and_heavy_noise_lowers_it() -> None:
    rows = audit_inversion(
        "tiny-gpt2",
        [1],
        [DefenseCase("none"), DefenseCase("heavy noise", DefenseSettings(noise=4.0), clip_quantile=0.5)],
        TINY,
    )
    plain, noisy = rows
    for row in rows:
        assert 0.0 <= row.recovery <= 1.0 and 0.0 <= row.baseline <= 1.0
        assert row.eval_tokens >= 1000
    # random weights at std 0.02: the hidden state at cut 1 is close to the token embedding
    assert plain.recovery > 0.8 and plain.recovery > plain.baseline + 0.5
    assert noisy.clip is not None and noisy.noise_std == pytest.approx(4.0 * noisy.clip / math.sqrt(128))
    assert noisy.recovery < plain.recovery - 0.4


def test_inversion_is_deterministic() -> None:
    quick = AttackSettings(public_tokens=512, eval_tokens=256, steps=10, exact_tokens=0)
    first = audit_inversion("tiny-gpt2", [2], settings=quick)
    assert audit_inversion("tiny-gpt2", [2], settings=quick) == first


# --------------------------------------------------------------------------- the exact-search attacker

EXACT = AttackSettings(public_tokens=512, eval_tokens=256, steps=10, exact_tokens=16)


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_exact_search_recovers_every_token_of_an_undefended_device_at_cut_1(preset: str) -> None:
    (row,) = audit_inversion(preset, [1], settings=EXACT)
    assert row.exact_tokens == 16
    assert row.exact == 1.0, f"exact search recovered {row.exact:.1%} of 16 tokens"
    assert row.best == (1.0, "exact search")


def test_a_candidate_step_computes_what_the_device_sends() -> None:
    tokenizer = load_tokenizer("tiny-llama")
    data = device_tokens(device_examples(tokenizer, 200, 48), tokenizer.pad_token_id)
    segment = build_segment("tiny-llama", SegmentSpec.client(2))
    with torch.no_grad():
        sent = segment(data.ids[:1, :12], data.mask[:1, :12])[0]  # (12, C)
        candidates = torch.tensor([int(data.ids[0, 11]), 5, 77])
        hidden = candidate_step(segment, 2, data.ids[0, :11], candidates)  # the true token 11 and two others
    torch.testing.assert_close(hidden[0], sent[11], atol=1e-4, rtol=1e-4)
    assert float((hidden[1:] - sent[11]).norm(dim=-1).min()) > 1e-2


def test_exact_search_reads_the_labels_and_keeps_to_its_proposals() -> None:
    tokenizer = load_tokenizer("tiny-gpt2")
    data = device_tokens(device_examples(tokenizer, 200, 48), tokenizer.pad_token_id)
    segment = build_segment("tiny-gpt2", SegmentSpec.client(1))
    sent = on_the_wire(block_outputs(segment, data, [1])[1], "fp16")
    # A text job trains on every position: each label is the next input.
    text = TokenBatch(data.ids, data.mask, torch.cat([data.ids[:, 1:], data.ids[:, -1:]], 1) * data.mask)
    found = search_sequences(segment, 1, sent, text, Channel(), tokens=10)
    assert (found.exact, found.exact_tokens, found.exact_labels) == (1.0, 10, 1.0)
    # Proposals that hold the true token find it; proposals without it fall back to the whole vocabulary.
    truth = data.ids[0, :6]
    wrong = torch.stack([torch.tensor([(int(t) + 1) % 50257, (int(t) + 2) % 50257]) for t in truth])
    right = torch.cat([wrong, truth[:, None]], 1)
    assert torch.equal(exact_search(segment, 1, sent[0, :6], proposals=right), truth)
    assert torch.equal(exact_search(segment, 1, sent[0, :6], proposals=wrong), truth)


def test_the_channel_whitens_by_the_noise_of_each_coordinate() -> None:
    hidden = torch.tensor([[3.0, 4.0], [0.0, 10.0]])
    target = torch.tensor([0.0, 0.0])
    assert Channel().distance(hidden, target).tolist() == [25.0, 100.0]
    assert Channel(clip=5.0).distance(hidden, target).tolist() == [25.0, 25.0]
    # noise ten times wider on the second coordinate: the first candidate is then the farther one
    uneven = Channel(gain=torch.tensor([2.0, 1.0]), std=torch.tensor([1.0, 10.0]))
    assert uneven.noisy and uneven.distance(hidden, target).tolist() == pytest.approx([36.16, 1.0])
    assert Channel.of(DefenseSettings(clip=2.0, noise=1.0), 4).std == pytest.approx(1.0)
    # by direction, a scaled candidate matches
    turned = Channel(direction=True).distance(torch.tensor([[6.0, 8.0], [8.0, 6.0]]), torch.tensor([3.0, 4.0]))
    assert turned[0] == pytest.approx(0.0, abs=1e-6) and float(turned[1]) > 0.1


def test_the_report_names_the_search_by_direction() -> None:
    row = CutResult(2, "private", 0.5, 0.0, None, 0.0, 10, 1.0, exact=0.9, exact_tokens=8, exact_match="directions")
    assert row.best == (0.9, "exact search by direction") and best_cell(row) == "90.0% (exact, directions)"
    assert replace(row, exact_match="vectors").best == (0.9, "exact search")


def test_a_search_by_direction_reads_activations_off_by_a_scale() -> None:
    """The model-completion server's copy of the segment may be off by a scale (adapters that scale the
    activations down): matching vectors then fails, matching directions does not."""
    tokenizer = load_tokenizer("tiny-gpt2")
    data = device_tokens(device_examples(tokenizer, 200, 48), tokenizer.pad_token_id)
    segment = build_segment("tiny-gpt2", SegmentSpec.client(1))
    scaled = 0.01 * on_the_wire(block_outputs(segment, data, [1])[1], "fp16")[0, :6]
    truth = data.ids[0, :6]
    assert torch.equal(exact_search(segment, 1, scaled, Channel(direction=True)), truth)
    assert not torch.equal(exact_search(segment, 1, scaled, Channel()), truth)


def test_the_bottleneck_starts_near_the_identity_and_prices_information() -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 64, generator=gen) * 3.0
    neck = Bottleneck(64, scale=3.0, weight=0.5, sigma=1e-4)
    with torch.no_grad():
        sent, kl = neck(hidden, gen)
    torch.testing.assert_close(sent, hidden, atol=2e-3, rtol=0)
    assert kl.shape == (2, 5) and float(kl.min()) > 0
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert float(neck.loss(kl, mask)) == pytest.approx(0.5 * float(kl[mask.bool()].mean()), rel=1e-5)
    # more noise, less information; a gate of zero, none
    wide = Bottleneck(64, scale=3.0, weight=0.5, sigma=1.0)
    assert wide.information(hidden.flatten(0, 1)) < neck.information(hidden.flatten(0, 1))
    with torch.no_grad():
        wide.gate.zero_()
    assert wide.information(hidden.flatten(0, 1)) == 0.0
    with pytest.raises(ValueError, match="bottleneck"):
        Bottleneck(64, scale=0.0, weight=1.0)


def test_a_bottleneck_trains_and_the_audit_attacks_through_it() -> None:
    tokenizer = load_tokenizer("tiny-gpt2")
    examples = device_examples(tokenizer, 400, 32)
    neck = Bottleneck(128, scale=0.05, weight=1.0, sigma=0.1)
    start = neck.log_sigma.detach().clone()
    client, server = finetune_split("tiny-gpt2", 1, DefenseSettings(), examples, steps=3, batch_size=2, bottleneck=neck)
    assert not torch.equal(neck.log_sigma.detach(), start)  # the KL term pushes the noise up
    result = evaluate_split(
        client, server, DefenseSettings(), examples[:4], int(tokenizer.pad_token_id), bottleneck=neck
    )
    assert math.isfinite(result.loss)
    adapters = lora_state(client.peft_model)
    # almost no noise: the attacker who knows the bottleneck still reads every token; wide noise: far fewer
    quiet = Bottleneck(128, scale=0.05, weight=1.0, sigma=1e-3)
    loud = Bottleneck(128, scale=0.05, weight=1.0, sigma=8.0)
    settings = AttackSettings(public_tokens=512, eval_tokens=256, steps=10, exact_tokens=8, proposals=4)
    cases = [DefenseCase(n, adapters=adapters, bottleneck=b) for n, b in (("quiet", quiet), ("loud", loud))]
    rows = audit_inversion("tiny-gpt2", [1], cases, settings)
    assert rows[0].exact == 1.0 and rows[0].exact_tokens == 8
    assert rows[1].exact is not None and rows[1].exact < 0.5
    with pytest.raises(ConfigError, match="bottleneck"):
        audit_inversion("tiny-gpt2", [1], [DefenseCase("both", DefenseSettings(noise=1.0), bottleneck=quiet)], settings)


def test_label_leakage_without_tail_is_near_total() -> None:
    (row,) = audit_labels("tiny-gpt2", [0], TINY)
    assert row.depth == 12 and 0.0 <= row.hidden_only <= 1.0
    # the gradient of the head's loss points away from the label's embedding
    assert row.recovery > 0.9 and row.recovery > row.hidden_only + 0.5


def test_finetune_with_nopeek_trains_the_adapters() -> None:
    tokenizer = load_tokenizer("tiny-gpt2")
    examples = device_examples(tokenizer, 400, 32)
    client, server = finetune_split("tiny-gpt2", 1, DefenseSettings(nopeek=1.0), examples, steps=2, batch_size=2)
    b = [p.detach() for n, p in client.lora_parameters().items() if ".lora_B." in n]
    assert b and any(float(p.abs().sum()) > 0 for p in b)
    assert server.spec == SegmentSpec.server(1, 12)
    # the attacker's copy of the trained client (from the adapters it aggregates) computes the same
    data = device_tokens(examples[:2], tokenizer.pad_token_id)
    copy = client_segment("tiny-gpt2", 1, lora_state(client.peft_model))
    with torch.no_grad():
        torch.testing.assert_close(copy(data.ids, data.mask), client(data.ids, data.mask))


def test_parse_cuts() -> None:
    assert parse_cuts("all", 4) == [1, 2, 3]
    assert parse_cuts("3, 1", 12) == [1, 3]
    for bad in ("0", "12", "a", ""):
        with pytest.raises(ConfigError, match="cuts"):
            parse_cuts(bad, 12)


# --------------------------------------------------------------------------- the command


def test_audit_command_writes_table_plot_and_json(tmp_path: Path) -> None:
    out = tmp_path / "audit"
    args = ["audit", "--model", "tiny-gpt2", "--cuts", "1", "--out", str(out), "--public-tokens", "1024"]
    args += ["--eval-tokens", "512", "--steps", "30", "--noise", "2", "--clip", "median", "--tails", "0"]
    args += ["--exact-tokens", "6"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Token recovery" in result.output and "label leakage" in result.output
    assert {p.name for p in out.iterdir()} == {"audit.md", "audit.json", "audit.png"}
    numbers = json.loads((out / "audit.json").read_text())
    assert [r["defense"] for r in numbers["inversion"]] == ["none", "clip median, noise 2"]
    assert all(0 <= r["recovery"] <= 1 for r in numbers["inversion"]) and numbers["labels"][0]["tail"] == 0
    for row in numbers["inversion"]:
        assert row["exact_tokens"] == 6 and row["best"] == max(row["recovery"], row["exact"])
        assert row["best_attacker"] in ("exact search", "learned inverse")
    assert numbers["inversion"][0]["exact"] == 1.0  # undefended, cut 1: every searched token
    assert "| 1 |" in (out / "audit.md").read_text() and "(exact)" in (out / "audit.md").read_text()
    assert (out / "audit.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("extra", "name"),
    [
        (["--cuts", "12"], "cuts"),
        (["--cuts", "x"], "cuts"),
        (["--noise", "-1"], "defense.noise"),
        (["--clip", "wide"], "--clip"),
        (["--clip", "0"], "defense.clip"),
        (["--nopeek", "1"], "--finetune-steps"),
        (["--distance", "1"], "--finetune-steps"),
        (["--private"], "--adapter"),
        (["--tails", "a"], "--tails"),
        (["--steps", "0"], "audit.steps"),
    ],
)
def test_audit_command_refuses_bad_options(tmp_path: Path, extra: list[str], name: str) -> None:
    out = tmp_path / "audit"
    result = runner.invoke(app, ["audit", "--model", "tiny-gpt2", "--out", str(out), *extra], env={"COLUMNS": "200"})
    assert result.exit_code == ExitCode.CONFIG, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and name in errors[0], result.output
    assert not out.exists()


def test_audit_command_refuses_a_missing_model(tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == ExitCode.MODEL, result.output


# --------------------------------------------------------------------------- private adapters, the distance term


def test_the_distance_term_turns_the_activations_away_from_the_base() -> None:
    base = torch.randn(2, 5, 16)
    mask = torch.ones(2, 5)
    same = base.clone().requires_grad_(True)
    term = distance_loss(same + 1e-3, base, mask, 2.0)
    assert float(term.detach()) == pytest.approx(2.0, abs=1e-2)  # at the base: the whole weight
    term.backward()
    assert same.grad is not None and float(same.grad.abs().sum()) > 0
    # scaled up, the activations are as near as the base's: scale does not meet the term
    assert float(distance_loss(3 * base, base, mask, 2.0)) == pytest.approx(2.0, abs=1e-4)
    assert float(distance_loss(-base, base, mask, 2.0)) == 0.0  # turned away: no push
    assert float(distance_loss(base, base, torch.zeros(2, 5), 2.0)) == 0.0  # padding only


def test_an_attacker_without_the_private_adapters_completes_the_segment_from_the_base() -> None:
    """Adapters far from the base (B drawn large): the server that has them recovers every token; the one that
    completes the segment from the public base does not."""
    segment = client_segment("tiny-llama", 1)
    gen = torch.Generator().manual_seed(0)
    adapters = {
        n: (torch.randn(t.shape, generator=gen) * 0.5 if ".lora_B." in n else t) for n, t in lora_state(segment.peft_model).items()
    }  # fmt: skip
    known, private = audit_inversion(
        "tiny-llama", [1],
        [DefenseCase("known", adapters=adapters), DefenseCase("private", adapters=adapters, knows_adapters=False)],
        replace(EXACT, exact_tokens=8),
    )  # fmt: skip
    assert known.exact == 1.0
    assert private.exact is not None and private.exact < 0.5


def test_an_agent_adds_the_distance_term_to_its_loss() -> None:
    """Near the base (B small, as after a first step) the term is about its whole weight, and its gradient reaches
    the device's LoRA weights. (At B = 0 exactly the term has no gradient: the task's loss moves B first.)"""
    segment = build_segment("tiny-gpt2", SegmentSpec.client(2))
    with torch.no_grad():
        for name, p in segment.lora_parameters().items():
            if ".lora_B." in name:
                p.normal_(0, 1e-4, generator=torch.Generator().manual_seed(0))
    ids, lengths = torch.randint(0, 1000, (2, 8)), torch.tensor([8, 5])
    args = (segment, ids, None, lengths, "fp32", {}, None, 1.0)
    _, none, _, _ = forward(*args, DefenseSettings(), torch.Generator())
    _, extra, _, _ = forward(*args, DefenseSettings(distance=3.0), torch.Generator())
    assert none is None and extra is not None and 2.9 < float(extra.detach()) <= 3.0
    extra.backward()
    grads = [p.grad for n, p in segment.lora_parameters().items() if ".lora_B." in n]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
