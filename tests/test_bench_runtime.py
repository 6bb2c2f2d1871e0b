"""scripts/bench_runtime.py: its --configs, its one-process reference, its report and where it writes its section.

The split runs themselves (Mosquitto, three agent processes) are the benchmark's to measure; these checks take
seconds on the tiny preset and assert no timing.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from splitft.bench.sections import write_section
from splitft.coordinator import local
from splitft.coordinator.local import LocalRun
from splitft.shared.errors import ConfigError
from splitft.shared.job.config import JobConfig
from splitft.shared.model.tokenizer import GSM8K

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_runtime.py"
_spec = importlib.util.spec_from_file_location("bench_runtime", SCRIPT)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_runtime"] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)


def test_configs_are_read_in_order() -> None:
    configs = bench.parse_configs(
        "two-part:fp16, two-part:int8,u:fp16,u:int8,two-part:fp16:batched,u:fp16:nice,two-part:int8:nice:batched"
    )
    labels = ["two-part:fp16", "two-part:int8", "u:fp16", "u:int8", "two-part:fp16:batched", "u:fp16:nice"]
    assert [c.label for c in configs] == [*labels, "two-part:int8:batched:nice"]
    assert [c.batched for c in configs] == [False] * 4 + [True, False, True]
    assert [c.nice for c in configs] == [False] * 5 + [True, True]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "--configs is empty"),
        ("two-part", "is not SPLIT:WIRE"),
        ("two-part:fp16,", "'' is not SPLIT:WIRE"),
        (":fp16", "is not SPLIT:WIRE"),
        ("u:fp16:x", "is not SPLIT:WIRE[:batched][:nice]"),
        ("u:fp16:batched:", "is not SPLIT:WIRE[:batched][:nice]"),
        ("u:fp16:", "is not SPLIT:WIRE[:batched][:nice]"),
        ("u:fp16:nice:nice", "is not SPLIT:WIRE[:batched][:nice]"),
        ("u:fp16:nice,u:fp16:nice", "'u:fp16:nice' is given twice"),
        ("three-part:fp16", "the split must be one of two-part, u, got 'three-part'"),
        ("u:fp8", "the wire dtype must be one of"),
        ("u:int8,u:int8", "'u:int8' is given twice"),
    ],
)
def test_bad_configs_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        bench.parse_configs(text)
    assert says in str(caught.value)


def test_bad_options_are_refused_before_any_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, says in [
        (["--configs", "u:fp16", "--wire", "int8"], "either --configs or --split/--wire"),
        (["--configs", "two-part:fp16", "--tail", "1"], "--tail is the U split's"),
        (["--rounds", "1"], "--rounds must be at least 2"),
        (["--configs", "u:bf17"], "the wire dtype must be one of"),
        (["--model", "no-such-model"], "not a preset"),
    ]:
        monkeypatch.setattr(sys, "argv", ["bench_runtime.py", *argv])
        with pytest.raises(SystemExit) as caught:
            bench.main()
        assert says in capsys.readouterr().err + str(caught.value.code), argv


def _shards(tmp_path: Path) -> dict[str, Path]:
    lines = (GSM8K / "train.jsonl").read_text().splitlines()
    data = {}
    for i in range(3):
        path = tmp_path / f"agent-{i + 1}.jsonl"
        path.write_text("\n".join(lines[4 * i : 4 * i + 4]) + "\n")
        data[f"agent-{i + 1}"] = path
    return data


@pytest.mark.parametrize("split", ["two-part", "u"])
def test_the_one_process_reference_runs_the_agents_batches(tmp_path: Path, split: str) -> None:
    job = JobConfig(job="bench", model="tiny-gpt2", rounds=2, local_steps=1, batch_size=1, max_length=64, split=split)
    data = _shards(tmp_path)
    seconds = bench.one_process("tiny-gpt2", job, data)
    assert math.isfinite(seconds) and seconds > 0
    # The streams are the agents' own: the same shard, seed and rendering give the same batches each time.
    first = [s.next()[0] for s in bench.agent_streams("tiny-gpt2", job, data).values()]
    again = [s.next()[0] for s in bench.agent_streams("tiny-gpt2", job, data).values()]
    assert all((a == b).all() for a, b in zip(first, again, strict=True))


def test_server_layouts_follow_the_split() -> None:
    job = JobConfig(job="bench", model="tiny-gpt2")
    assert bench.server_layouts(job, 12) == [(1,), (2,), (3,)]
    u = replace(job, split="u", tail=2)
    assert bench.server_layouts(u, 12) == [(1, 10), (2, 10), (3, 10)]


def test_the_report_names_model_host_and_command() -> None:
    model = bench.Model("tiny-gpt2", "tiny-gpt2", 8_900_000, 12, 128, 50257)
    row = bench.Row(
        bench.Config("u", "int8"), one_process_s=1.0, one_process_runs=(1.05, 0.95), split_s=1.2, steps_s=1.1,
        before_s=0.05, after_s=0.05, server_s=0.8, forward_s=0.05, tail_s=0.1, backward_s=0.05, messaging_s=0.01,
        wait_s=0.9, bytes_step=1e6, load=(0.1, 0.2), others_cpu=0.05,
    )  # fmt: skip
    args = argparse.Namespace(model="tiny-gpt2")
    text = bench.report(model, [row], args, "python scripts/bench_runtime.py --configs u:int8")
    assert "tiny-gpt2, 8.9M parameters (12 blocks, hidden 128, vocabulary 50,257)" in text
    assert bench.cpu_name() in text
    assert "`python scripts/bench_runtime.py --configs u:int8`" in text
    assert "| u:int8 | 1.000 (1.05, 0.95) | 1.200 | 1.20 |" in text
    assert "u:int8: met (1.20)" in text  # the tiny preset's target is 1.25
    assert "nice 19" not in text
    nice = bench.report(model, [row, replace(row, config=bench.Config("u", "int8", nice=True))], args, "command")
    assert "| u:int8:nice | 1.000 (1.05, 0.95) |" in nice and "':nice': the agents' processes run at nice 19" in nice


def test_a_new_section_goes_after_the_runtime_section(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# B\n\n<!-- runtime:begin -->\nold\n<!-- runtime:end -->\n\n## Later\n")
    bench.place_section(path, "runtime-135m", "runtime")
    write_section(path, "runtime-135m", "new")
    bench.place_section(path, "runtime-135m", "runtime")  # already there: left as it is
    text = path.read_text()
    assert text.index("<!-- runtime:end -->") < text.index("new") < text.index("## Later")
    assert text.count("<!-- runtime-135m:begin -->") == 1
    assert "old" in text


def test_nice_agents_start_at_a_lower_priority_and_bad_values_are_refused(tmp_path: Path) -> None:
    """The ``:nice`` mode's agents: real agent processes (one that finds no broker here) at the coordinator's
    priority plus the increment; the increment is checked before anything starts."""
    job = JobConfig(job="bench", model="tiny-gpt2")
    shard = _shards(tmp_path)["agent-1"]
    own = os.getpriority(os.PRIO_PROCESS, 0)
    for nice in (0, 7, 19):
        run = LocalRun(job, tmp_path / f"out-{nice}", agent_nice=nice)
        run.out.mkdir()
        process = local._start_agent(run, job, "agent-1", shard, "mqtt://127.0.0.1:9", "5")
        try:
            assert psutil.Process(process.pid).nice() == min(19, own + nice)
        finally:
            local.stop_processes([process])
    for bad in (-1, 20):
        with pytest.raises(ConfigError, match=f"agent_nice must be 0 .* to 19 .*, got {bad}"):
            LocalRun(job, tmp_path / "refused", agent_nice=bad)
    assert not (tmp_path / "refused").exists()
