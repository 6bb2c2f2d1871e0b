"""The command-line tools: real work, clear errors, named exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from splitft.coordinator.cli import app
from splitft.shared.exit_codes import ExitCode
from splitft.shared.models import load_config

from conftest import save_model

runner = CliRunner()


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_inspect_presets(preset: str) -> None:
    result = runner.invoke(app, ["inspect", "--model", preset, "--cut", "3"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "embeddings + blocks 0..2" in out and "blocks 3..11 + final norm + LM head" in out
    assert "0:16, 1:16, 2:8" in out and "3:8, 4:16" in out
    # hidden 128: fp32 512 B/token, fp16 256, int8 128 + a 4-byte scale
    assert "512" in out and "256" in out and "132" in out and "3.88x smaller" in out


def test_inspect_local_folder(tmp_path: Path) -> None:
    folder = save_model(load_config("tiny-llama"), tmp_path / "llama")
    result = runner.invoke(
        app, ["inspect", "--model", str(folder), "--cut", "5", "--rank", "4", "--cut-rank", "2"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "llama (llama family), 12 blocks" in result.output
    assert "4:2" in result.output and "5:2" in result.output


def test_inspect_errors_have_named_exit_codes(tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", "--model", "nope", "--cut", "3"])
    assert result.exit_code == ExitCode.MODEL
    assert "neither a preset" in result.output
    result = runner.invoke(app, ["inspect", "--model", "tiny-gpt2", "--cut", "12"])
    assert result.exit_code == ExitCode.CONFIG
    assert "cut layer" in result.output
    result = runner.invoke(app, ["inspect", "--model", "tiny-gpt2"])
    assert result.exit_code == ExitCode.USAGE


def test_verify_split_passes_and_reports_lossy_wire() -> None:
    result = runner.invoke(app, ["verify-split", "--model", "tiny-gpt2", "--cut", "1"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "OK: split equals whole" in result.output
    result = runner.invoke(
        app, ["verify-split", "--model", "tiny-gpt2", "--cut", "1", "--wire", "int8"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "lossy" in result.output
    result = runner.invoke(app, ["verify-split", "--model", "tiny-gpt2", "--cut", "1", "--wire", "fp64"])
    assert result.exit_code == ExitCode.CONFIG


def test_verify_split_reports_a_corrupted_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: a wire that perturbs what it carries must make the check fail."""
    import splitft.shared.equivalence as equivalence

    real_decode = equivalence.decode_tensor
    monkeypatch.setattr(equivalence, "decode_tensor", lambda obj, **kw: real_decode(obj, **kw) * 1.001)
    result = runner.invoke(app, ["verify-split", "--model", "tiny-llama", "--cut", "6"], env={"COLUMNS": "200"})
    assert result.exit_code == ExitCode.CHECK_FAILED, result.output
    assert "MISMATCH" in result.output


def test_console_scripts_are_installed() -> None:
    for script in ("splitft-coordinator", "splitft-agent"):
        path = Path(sys.executable).parent / script  # installed beside the interpreter running the tests
        assert path.is_file(), f"{script} is not installed: run scripts/setup.sh"
        done = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert "SplitFT" in done.stdout


def _agent(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "splitft.agent.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


def test_agent_join_errors_have_named_exit_codes(tmp_path: Path) -> None:
    base = ["join", "--broker", "mqtt://127.0.0.1:1", "--job", "j", "--model", "tiny-gpt2", "--id", "a1"]
    done = _agent(*base, "--data", str(tmp_path / "missing.jsonl"))
    assert done.returncode == ExitCode.DATA and "missing.jsonl" in done.stderr
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "2+2?", "response": "4"}\n')
    done = _agent(*base, "--data", str(data), "--connect-timeout", "1")
    assert done.returncode == ExitCode.BROKER and "cannot reach the MQTT broker" in done.stderr
    done = _agent(*base[:-1], "bad/name", "--data", str(data))
    assert done.returncode == ExitCode.CONFIG and "agent name" in done.stderr
    done = _agent(*base[:5], "--model", "no-such-model", "--id", "a1", "--data", str(data))
    assert done.returncode == ExitCode.MODEL


def test_run_refuses_a_broken_job_file(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('rounds = 0\n[optimizer]\nname = "adamw"\n')
    result = runner.invoke(app, ["run", "--broker", "mqtt://127.0.0.1:1", "--out", str(tmp_path), "--config", str(job)])
    assert result.exit_code == ExitCode.CONFIG and "rounds must be a positive integer" in result.output
    job.write_text("roundz = 3\n")
    result = runner.invoke(app, ["run", "--broker", "mqtt://127.0.0.1:1", "--out", str(tmp_path), "--config", str(job)])
    assert result.exit_code == ExitCode.CONFIG and "unknown setting(s) roundz" in result.output


def test_local_run_end_to_end(tmp_path: Path) -> None:
    """The README's main job, small: embedded broker, two agent processes, adapter + metrics + plot."""
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "splitft.coordinator.cli", "local", "--out", str(out), "--agents", "2",
        "--cuts", "1,3", "--rounds", "2", "--local-steps", "2", "--samples-per-agent", "8", "--max-length", "96",
        "--policy", "fixed", "--emulate", "",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "round   2: eval loss" in done.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "run.png").stat().st_size > 10_000
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and '"agent-1": 1' in lines[-1] and '"agent-2": 3' in lines[-1]


def test_partition_command_writes_shards_table_and_png(tmp_path: Path) -> None:
    from splitft.shared.text import GSM8K

    out = tmp_path / "parts"
    args = ["partition", "--data", str(GSM8K / "train.jsonl"), "--clients", "3", "--alpha", "0.1", "--limit", "120"]
    result = runner.invoke(app, [*args, "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Length-Dirichlet partition (alpha=0.1" in result.output
    lines = sum(len((out / f"client-{i}.jsonl").read_text().splitlines()) for i in range(3))
    assert lines == 120 and (out / "partition.png").stat().st_size > 5000
    result = runner.invoke(app, [*args[:-2], "--limit", "4", "--min-samples", "2", "--out", str(out)])
    assert result.exit_code == ExitCode.CONFIG and "min_samples" in result.output
