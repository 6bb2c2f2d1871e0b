"""Who may join a job, through a real Mosquitto and real `splitft-agent join` processes: agents are admitted
by their model's content (each device may keep the model at its own path), and an agent whose model or
data cannot take part is told why and exits with its code, while the job goes on with the others."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from peft import AutoPeftModelForCausalLM

from splitft.coordinator.runtime import Coordinator
from splitft.shared.errors import ExitCode
from splitft.shared.job.config import JobConfig
from splitft.shared.job.records import load_records
from splitft.shared.model.loading import load_config, model_fingerprint
from splitft.shared.model.tokenizer import GSM8K, load_tokenizer
from splitft.shared.wire.broker import BrokerSettings

from conftest import Broker, save_model


def model_folder(folder: Path, seed: int = 7) -> Path:
    """A small GPT-2 (3 blocks) saved with its tokenizer, as a user's model folder would be."""
    config = load_config("tiny-gpt2")
    config.n_layer = 3
    save_model(config, folder, seed=seed)
    load_tokenizer("tiny-gpt2").save_pretrained(folder)
    return folder


def agent(broker: Broker, job: str, name: str, model: Path | str, data: Path, cwd: Path) -> subprocess.Popen[str]:
    command = [
        sys.executable, "-m", "splitft.agent.cli", "join", "--broker", broker.url, "--job", job, "--id", name,
        "--model", str(model), "--data", str(data), "--connect-timeout", "20",
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        raise AssertionError(f"the agent did not exit: {err[-2000:]}") from None
    return process.returncode, err


def write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return path


async def test_admission_by_model_content_and_usable_data(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the job names its model by a path relative to the coordinator's folder
    model = model_folder(Path("models") / "m")
    copy = shutil.copytree(model, tmp_path / "device-disk" / "copy-of-m")  # the same model, another path
    other = model_folder(tmp_path / "models" / "other", seed=8).resolve()  # the same architecture, other weights
    assert model_fingerprint(copy) == model_fingerprint(f"{model}/") == model_fingerprint(model)
    assert model_fingerprint(other) != model_fingerprint(model) != model_fingerprint("tiny-gpt2")

    pairs = load_records(GSM8K / "train.jsonl", limit=16)
    data = write_jsonl(tmp_path / "good.jsonl", pairs)
    long_prompts = write_jsonl(tmp_path / "long.jsonl", [(p * 20, r) for p, r in pairs[:4]])  # > max_length
    job = JobConfig(
        job="admission", model="models/m", rounds=1, local_steps=1, batch_size=2, max_length=64, min_agents=1, cut=1,
        eval_samples=4, step_timeout_s=60, upload_timeout_s=60, join_window_s=3.0,
    )  # fmt: skip
    coordinator = asyncio.create_task(Coordinator(job, BrokerSettings(url=broker.url), tmp_path / "out").run())
    cwd = tmp_path / "device-disk"  # the good agent names the model by a relative path of its own
    agents = {
        "good": agent(broker, job.job, "good", "copy-of-m/", data, cwd),
        "wrong-model": agent(broker, job.job, "wrong-model", other, data, cwd),
        "no-usable-data": agent(broker, job.job, "no-usable-data", copy, long_prompts, cwd),
    }
    try:
        code, err = await asyncio.to_thread(finish, agents["wrong-model"])
        assert code == ExitCode.MODEL, err
        assert "not admitted" in err and model_fingerprint(other) in err and model_fingerprint(model) in err
        assert "Traceback" not in err
        code, err = await asyncio.to_thread(finish, agents["no-usable-data"])
        assert code == ExitCode.DATA, err
        assert "none of its 4 examples fits the job's max_length of 64 tokens" in err and "Traceback" not in err
        summary = await asyncio.wait_for(coordinator, timeout=300)
        code, err = await asyncio.to_thread(finish, agents["good"])
        assert code == 0, err
    finally:
        coordinator.cancel()
        for process in agents.values():
            if process.poll() is None:
                process.kill()
    assert summary["rounds"] == 1
    metrics = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2 and '"good"' in metrics[-1] and "wrong-model" not in metrics[-1]

    # The exported adapter names its base by an absolute path: it loads from any directory.
    adapter = tmp_path / "out" / "adapter"
    exported = json.loads((adapter / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == str((tmp_path / "models" / "m").resolve())
    monkeypatch.chdir(tmp_path / "device-disk")
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    assert sum("lora_B" in name for name, _ in loaded.named_parameters()) > 0
