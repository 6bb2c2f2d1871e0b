"""The study's parts on tiny cases: the task loaders, the text scores, the oracle against brute force, the
emulated server the controller plans with, and a study that goes on where it was interrupted."""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
from pathlib import Path

import pytest
from transformers import GPT2Config

from splitft.bench import study
from splitft.bench.clock import CostModel, Device, Server, server_from
from splitft.bench.study import hindsight, methods, run
from splitft.bench.study.cli import study_label
from splitft.bench.study.metrics import bleu, rouge_l
from splitft.bench.study.reporting import section
from splitft.bench.study.settings import model_settings
from splitft.bench.study.tasks import e2e_pairs, held_out, prepare_task, references, wikitext_paragraphs
from splitft.coordinator.controller import ServerEstimate
from splitft.coordinator.estimates import FleetEstimates
from splitft.shared.errors import ConfigError
from splitft.shared.job.config import JobConfig
from splitft.shared.job.records import Pair, Text, load_records
from splitft.tools import pretrain as pb

# --------------------------------------------------------------------------- tasks


def test_wikitext_paragraphs_leave_out_headings_and_short_lines(tmp_path: Path) -> None:
    path = tmp_path / "w.txt.gz"
    long = " ".join(["word"] * 25)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(f" \n = Title = \n \n {long} \n = = Section = = \n a short caption \n {long} two \n")
    assert wikitext_paragraphs(path) == [Text(long), Text(f"{long} two")]


def test_e2e_pairs_and_their_references(tmp_path: Path) -> None:
    path = tmp_path / "e.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("name : A | area : riverside||A is by the river .\nname : A | area : riverside||By the river : A .\n")
        f.write("\nname : B||B is a pub .\n")
    pairs = e2e_pairs(path)
    assert pairs == [
        Pair("name : A | area : riverside", "A is by the river ."),
        Pair("name : A | area : riverside", "By the river : A ."),
        Pair("name : B", "B is a pub ."),
    ]
    refs = references(pairs)
    assert [(r.prompt, len(r.answers)) for r in refs] == [("name : A | area : riverside", 2), ("name : B", 1)]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("name : A||fine\nno separator here\n")
    with pytest.raises(ValueError, match="line 2"):
        e2e_pairs(path)


@pytest.mark.parametrize("name", ["gsm8k", "wikitext", "e2e"])
def test_every_task_prepares_files_the_runtime_reads(name: str, tmp_path: Path) -> None:
    task = prepare_task(name, tmp_path)
    train, evals = load_records(task.train, limit=50), load_records(task.eval, limit=50)
    kind = Text if name == "wikitext" else Pair
    assert train and evals and all(isinstance(r, kind) for r in train + evals)
    refs = held_out(task)
    if name == "wikitext":
        assert refs == []
    else:  # E2E's 630 test meaning representations, each with all its references; GSM8K's 1,319 problems
        assert len(refs) == (630 if name == "e2e" else 1319) and all(r.answers for r in refs)
        assert name == "gsm8k" or max(len(r.answers) for r in refs) > 1
    with pytest.raises(ValueError, match="unknown task"):
        prepare_task("squad", tmp_path)


def test_the_settings_check_task_split_and_server() -> None:
    with pytest.raises(ValueError, match="task"):
        dataclasses.replace(study.QUICK, task="squad")
    with pytest.raises(ValueError, match="split"):
        dataclasses.replace(study.QUICK, split="three-part")
    with pytest.raises(ConfigError, match="unknown device profile"):
        dataclasses.replace(study.QUICK, server="gpu-h9000")


# --------------------------------------------------------------------------- scores


def test_bleu_and_rouge_l_of_identical_and_disjoint_texts() -> None:
    hyps = ["the cat sat on the mat today", "a pub near the river serves cheap food"]
    assert bleu(hyps, [[h] for h in hyps]) == pytest.approx(100.0)
    assert rouge_l(hyps, [[h] for h in hyps]) == pytest.approx(100.0)
    disjoint = [["zebra xylophone quantum"], ["violet umbrella kettle"]]
    assert bleu(hyps, disjoint) == 0.0 and rouge_l(hyps, disjoint) == 0.0
    # Several references of different counts: the matching one counts, the others do not lower it.
    mixed = [["zebra xylophone quantum", hyps[0]], [hyps[1]]]
    assert bleu(hyps, mixed) == pytest.approx(100.0) and rouge_l(hyps, mixed) == pytest.approx(100.0)
    partial = bleu(["the cat sat on a mat today"], [[hyps[0]]])
    assert 0 < partial < 100
    with pytest.raises(ValueError, match="reference sets"):
        bleu(hyps, [["x"]])
    with pytest.raises(ValueError, match="at least one reference"):
        rouge_l(hyps, [["x"], []])


# --------------------------------------------------------------------------- the oracle


def _round(rng: random.Random, devices: int) -> list[methods.AgentRound]:
    agents = []
    for i in range(devices):
        device = Device(f"d{i}", rng.uniform(2e9, 4e11), rng.uniform(1e6, 2e8), rng.uniform(1e6, 2e8), 0.01)
        shapes = tuple((2, rng.randint(32, 128), 60) for _ in range(2))
        act = rng.uniform(1e4, 1e6)
        agents.append(methods.AgentRound(f"d{i}", device, 2, None, shapes, act, act, 4e5, 4e5))
    return agents


@pytest.mark.parametrize("seed", range(6))
def test_the_oracle_finds_the_shortest_round_that_brute_force_finds(seed: int) -> None:
    config = GPT2Config(vocab_size=2048, n_positions=256, n_embd=128, n_layer=6, n_head=2)
    rng = random.Random(seed)
    costs = CostModel(config, Server(rng.uniform(5e10, 5e12), rng.uniform(5e10, 5e12)))
    agents = _round(rng, 3)
    limits = {"d0": 5, "d1": 5, "d2": rng.randint(2, 5)}  # one device's memory holds fewer blocks
    oracle = hindsight.oracle_cuts(costs, agents, limits)
    brute = hindsight.brute_force_cuts(costs, agents, limits)
    assert all(1 <= oracle[n] <= limits[n] for n in limits)
    found, best = (
        methods.round_timing(costs, agents, oracle).seconds,
        methods.round_timing(costs, agents, brute).seconds,
    )
    assert found == pytest.approx(best, rel=1e-9), (oracle, brute)


# --------------------------------------------------------------------------- the emulated server


def test_an_emulated_server_is_named_not_measured() -> None:
    job = JobConfig(job="j", model="tiny-gpt2", emulate_server="gpu-l4")
    assert job.emulate_server == "gpu-l4"
    assert server_from("gpu-l4") == server_from("12.1,12.1")  # the profile's sustained rate: peak x efficiency
    with pytest.raises(ConfigError, match="two ways"):
        JobConfig(job="j", model="tiny-gpt2", emulate_server="1", server_speedup=3)
    with pytest.raises(ConfigError, match="TFLOP/s"):
        JobConfig(job="j", model="tiny-gpt2", emulate_server="1,2,3")
    fixed = FleetEstimates(0.3, ServerEstimate(0.01, 0.02), 10.0, measure_server=False)
    measured = FleetEstimates(0.3, ServerEstimate(0.01, 0.02), 10.0)
    for estimates in (fixed, measured):
        estimates.observe_server(12, 2, 5.0)  # this host: far slower than the estimate
    assert fixed.server() == ServerEstimate(0.01, 0.02)
    assert measured.server().block_s > 0.01


# --------------------------------------------------------------------------- resume


TINY_BASE = pb.Settings(
    family="gpt2", vocab_size=512, layers=2, hidden=32, heads=2, intermediate=64, seq_len=256, batch_size=4, steps=4,
    warmup_steps=1, lr=3e-3, corpus_chars=40_000, eval_every=4, eval_tokens=256, final_eval_tokens=256,
)  # fmt: skip


class Interrupted(BaseException):
    """Stands for the study's process being stopped (not an Exception: a failed run is recorded and skipped)."""


def test_an_interrupted_study_goes_on_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = pb.build_base(TINY_BASE, tmp_path / "base", log=lambda _: None)
    settings = dataclasses.replace(
        study.QUICK, task="e2e", alphas=(1.0,), rounds=1, local_steps=1, batch_size=2, max_length=64,
        samples_per_agent=4, eval_samples=4, final_eval_samples=4, gen_samples=2, gen_tokens=4,
        methods=("centralised", "fedavg"), wire_dtypes=(),
    )  # fmt: skip
    out = tmp_path / "study"
    real_fedavg = run.run_fedavg

    def stopped(*args: object, **kwargs: object) -> object:
        raise Interrupted

    monkeypatch.setattr(run, "run_fedavg", stopped)
    with pytest.raises(Interrupted):
        run.run_study(settings, out, base)
    central = out / "runs" / "alpha-1" / "centralised"
    kept = (central / "summary.json").read_text()
    assert json.loads(kept)["bleu"] >= 0 and json.loads(kept)["e2e_problems"] == 2  # E2E scored by generation
    assert not (out / "runs" / "alpha-1" / "fedavg" / "summary.json").exists()

    def not_again(*args: object, **kwargs: object) -> object:
        raise AssertionError("a finished run ran again")

    monkeypatch.setattr(run, "run_centralised", not_again)
    monkeypatch.setattr(run, "run_fedavg", real_fedavg)
    run.run_study(settings, out, base)
    summaries = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [s["method"] for s in summaries] == ["centralised", "fedavg"]
    assert json.dumps(summaries[0]) + "\n" == kept  # the finished run's summary, as it was written
    meta = json.loads((out / "study.json").read_text())
    assert (meta["runs"], meta["kept_runs"]) == (2, 1)  # its time is the last start's: the report says which runs
    header = section(meta, "", out).splitlines()[2]
    assert " for 1 of its 2 runs (1 was kept from an earlier start; its time is not in it)." in header
    assert " minutes in all." in section({**meta, "kept_runs": 0}, "", out).splitlines()[2]

    # Other settings in the same folder: refused, not mixed.
    with pytest.raises(run.StudyMismatch, match="other settings"):
        run.run_study(dataclasses.replace(settings, rounds=2), out, base)


def test_the_command_names_its_study_and_refuses_what_it_cannot_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert study_label(study.QUICK, None) == "study-quick"
    assert study_label(dataclasses.replace(study.QUICK, task="e2e"), None) == "study-quick-e2e-tiny-base"
    assert study_label(study.FULL, Path("/models/My_Model.gguf")) == "study-full-gsm8k-my-model"
    assert study_label(study.QUICK, Path("/x"), "smollm2") == "study-quick-gsm8k-smollm2-135m"
    u_split = dataclasses.replace(study.QUICK, task="e2e", split="u")
    assert study_label(u_split, Path("/x"), "smollm2") == "study-quick-e2e-smollm2-135m-u"  # beside the two-part one
    assert study_label(dataclasses.replace(study.QUICK, split="u"), None) == "study-quick-u"
    assert model_settings(True, "wikitext").max_length == 128 and model_settings(True, "e2e").max_length == 256
    assert model_settings(False, "e2e").rounds == 8
    assert model_settings(False, "gsm8k").gen_tokens == 256 and model_settings(False, "e2e").gen_tokens == 96
    assert study.main(["--quick", "--model", "/no/such/model"]) == 2
    assert "no such model" in capsys.readouterr().err
    assert study.main(["--quick", "--task", "squad"]) == 2
    assert study.main(["--quick", "--server", "gpu-h9000"]) == 2
