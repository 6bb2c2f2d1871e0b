"""scripts/study.py end to end on a tiny pretrained base: the in-process baselines, real split runs through
Mosquitto with five virtually emulated agent processes, the simulated clock, the final evaluation, the
report and the plots."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import pytest

from splitft.bench import study
from splitft.bench.study.reporting import _bytes_per_token
from splitft.coordinator.answers import gsm8k_answer
from splitft.tools import pretrain as pb

TINY_BASE = pb.Settings(
    family="gpt2",
    vocab_size=1024,
    layers=4,
    hidden=32,
    heads=2,
    intermediate=64,
    seq_len=512,
    batch_size=4,
    steps=10,
    warmup_steps=2,
    lr=3e-3,
    corpus_chars=100_000,
    eval_every=10,
    eval_tokens=512,
    final_eval_tokens=512,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pb.build_base(TINY_BASE, tmp_path_factory.mktemp("base") / "gpt2", log=lambda _: None)


def test_the_settings_refuse_a_study_without_its_reference() -> None:
    with pytest.raises(ValueError, match="centralised"):
        dataclasses.replace(study.QUICK, methods=("splitft",))
    with pytest.raises(ValueError, match="wire_alpha"):
        dataclasses.replace(study.QUICK, alphas=(0.5,))


def test_gsm8k_answers_are_read_after_the_marker() -> None:
    assert gsm8k_answer("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert gsm8k_answer("#### -5.") == "-5"
    assert gsm8k_answer("the answer is 7") is None


def test_a_small_study_runs_every_part_and_reports_it(base: Path, tmp_path: Path) -> None:
    settings = dataclasses.replace(
        study.QUICK,
        alphas=(1.0,),
        rounds=2,
        local_steps=1,
        batch_size=2,
        max_length=512,
        samples_per_agent=12,
        eval_samples=8,
        final_eval_samples=8,
        gen_samples=2,
        gen_tokens=8,
        methods=("centralised", "fedavg", "fixed", "splitft"),
        wire_dtypes=("fp16", "int8"),
    )
    out = tmp_path / "study"
    study.run_study(settings, out, base)

    everything = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    summaries = [s for s in everything if "replayed_from" not in s]
    assert [(s["method"], s["wire_dtype"]) for s in summaries] == [
        ("centralised", None),
        ("fedavg", None),
        ("fixed", "fp16"),
        ("splitft", "fp16"),
        ("splitft", "int8"),
    ]
    # The fixed run replayed at every cut the devices hold (the tiny base has 4 blocks) and at the oracle's cuts:
    # the same learning, other times; the oracle is never slower than any single cut, round by round.
    replayed = {s["method"]: s for s in everything if s.get("replayed_from") == "fixed"}
    assert set(replayed) == {"fixed-1", "fixed-2", "fixed-3", "oracle"}
    fixed_rows = [json.loads(line) for line in (out / summaries[2]["rounds"]).read_text().splitlines()]
    by_label = {m: [json.loads(x) for x in (out / s["rounds"]).read_text().splitlines()] for m, s in replayed.items()}
    for rows in by_label.values():
        assert [r["eval_ppl"] for r in rows] == [r["eval_ppl"] for r in fixed_rows]
    assert by_label["fixed-2"][-1]["virtual_s"] == pytest.approx(fixed_rows[-1]["virtual_s"])  # the run's own cut
    for r in range(1, 3):
        step = {m: rows[r]["virtual_s"] - rows[r - 1]["virtual_s"] for m, rows in by_label.items()}
        assert step["oracle"] <= min(step.values()) + 1e-9, step
    untrained = []
    for s in summaries:
        rows = [json.loads(line) for line in (out / s["rounds"]).read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert all(b["virtual_s"] > a["virtual_s"] for a, b in itertools.pairwise(rows))
        assert all(math.isfinite(r["eval_ppl"]) and r["eval_ppl"] > 1 for r in rows)
        untrained.append(rows[0]["eval_ppl"])
        assert math.isfinite(s["final_ppl"]) and 0 <= s["final_acc"] <= 1
        assert s["gsm8k_problems"] == 2 and 0 <= s["gsm8k_correct"] <= s["gsm8k_answered"] <= 2
    # Round 0 evaluates the same base on the same problems, whatever the method: one perplexity for all.
    assert max(untrained) == pytest.approx(min(untrained), rel=1e-5), untrained
    targets = study.with_targets(out, summaries, settings.target_margin)
    assert len({t["target_ppl"] for t in targets}) == 1 and targets[0]["target_ppl"] > 0  # centralised's, for all
    assert targets[0]["time_to_target_s"] is not None  # the reference reaches its own target
    central, fedavg, _, split, int8 = summaries
    assert central["bytes_down"] == 0 and central["bytes_up"] > 0  # the raw data, once
    assert fedavg["bytes_up"] == fedavg["bytes_down"] > 0  # adapters only, the same size each way
    assert split["retried_rounds"] == 0 and set(split["final_cuts"]) == {f"agent-{i}" for i in range(1, 6)}
    # Round 2 re-planned from round 1's measurements: its achieved step time is never below the balanced ideal.
    assert split["achieved_over_ideal"] is not None and split["achieved_over_ideal"] >= 0.999
    up16, _ = _bytes_per_token(out, split)
    up8, _ = _bytes_per_token(out, int8)
    assert up8 < 0.75 * up16  # int8 activations are about half of fp16's on the wire

    text = study.report(out)
    assert "| splitft |" in text and "| fedavg |" in text and "**Wire dtype**" in text
    assert "| best fixed (" in text and "| oracle (replayed) |" in text
    for plot in ("study_ppl.png", "study_bytes.png", "study_cuts.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"

    # The report replays the split runs from their metrics: the simulated clock is a pure function of them.
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n")
    assert study.main(["--quick", "--out", str(out), "--report-only", "--write", str(report)]) == 0
    again = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [s["virtual_s"] for s in again] == [s["virtual_s"] for s in everything]
    assert "## Benchmark study (quick, gsm8k, tiny base)" in report.read_text()
    kept = tmp_path / "benchmarks" / "study-quick"
    assert (kept / "summary.jsonl").is_file() and (kept / "study_ppl.png").is_file()
    assert len(list(kept.glob("runs/*/*/rounds.jsonl"))) == 5
