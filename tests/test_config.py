"""Job configuration: the README's example parses; every bad value is named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from splitft.shared.errors import ConfigError
from splitft.shared.job.config import JobConfig

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_job_file_parses(tmp_path: Path) -> None:
    block = re.search(r"```toml\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md has a TOML job example"
    path = tmp_path / "job.toml"
    path.write_text(block.group(1))
    job = JobConfig.from_toml(path)
    assert job.job == "gsm8k" and job.cut_of("jetson-1") == 1 and job.cut_of("someone") == 2
    assert job.lora.r_cut == 8 and job.optimizer.name == "adamw" and job.optimizer.lr == 1e-3
    job.check_cuts(12)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rounds = 0", "rounds must be a positive integer"),
        ("roundz = 3", r"unknown setting\(s\) roundz"),
        ('wire_dtype = "fp8"', "wire_dtype must be one of"),
        ('job = "a/b"', "job name"),
        ("[lora]\nr = 0", "lora.r must be"),
        ("[lora]\nrank = 4", r"unknown setting\(s\) lora.rank"),
        ('[optimizer]\nname = "lion"', "optimizer.name must be one of"),
        ("[optimizer]\nlr = -1.0", "optimizer.lr must be"),
        ("cuts = 3", r"\[cuts\] must be a table"),
        ("[cuts]\na1 = 0", "cuts.a1 must be a positive integer"),
        ("step_timeout_s = 0", "step_timeout_s must be a positive number"),
        ("rounds = ", r"job\.toml is not valid TOML: .*line 1"),
        ("rounds = 3\nrounds = 4", r"job\.toml is not valid TOML"),
        # wrong types are named, never a TypeError from a comparison
        ('rounds = "five"', "rounds must be a positive integer, got 'five'"),
        ("rounds = true", "rounds must be a positive integer, got True"),
        ("step_timeout_s = true", "step_timeout_s must be a positive number"),
        ('ewma = "x"', r"ewma must be a number in \(0, 1\], got 'x'"),
        ('gamma = "x"', "gamma must be a finite number >= 0"),
        ("hysteresis = -1", "hysteresis must be a finite number >= 0"),
        ('c_max = "x"', "c_max must be an integer >= c_min"),
        ("c_min = 0", "c_min must be a positive integer"),
        ("model = 3", "model must be a preset name or a model folder"),
        ('model = ""', "model must be a preset name or a model folder"),
        ("eval_data = 5", "eval_data must be the path of a JSONL/CSV file"),
        ('attn_implementation = "flash"', "attn_implementation must be one of .*got 'flash'"),
        ("lora = 3", r"\[lora\] must be a table"),
        ('[lora]\nr = "x"', "lora.r must be a positive integer"),
        ("[lora]\nr = true", "lora.r must be a positive integer"),
        ('[lora]\nalpha_per_rank = "x"', "lora.alpha_per_rank must be a number"),
        ('[lora]\ndropout = "x"', "lora.dropout must be a number"),
        ("[lora]\ntargets = 5", "lora.targets must be a list of module names"),
        ("[lora]\ntargets = [1]", "lora.targets must be a list of module names"),
        ("[optimizer]\nlr = true", "optimizer.lr must be a finite number"),
        ('[optimizer]\nmomentum = "x"', "optimizer.momentum must be a finite number"),
    ],
)
def test_bad_job_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        JobConfig.from_toml(path)


def test_missing_file_and_cut_bounds(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        JobConfig.from_toml(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"cut of a1 is 12, but the model's cut layers are 1\.\.11"):
        JobConfig(cuts={"a1": 12}).check_cuts(12)
    with pytest.raises(ConfigError, match=r"c_max is 12, but the model's cut layers are 1\.\.11"):
        JobConfig(c_max=12).check_cuts(12)
    with pytest.raises(ConfigError, match=r"c_min is 13"):
        JobConfig(c_min=13).check_cuts(12)
    JobConfig(c_min=2, c_max=11).check_cuts(12)


def test_folder_and_binary_job_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"job file {re.escape(str(tmp_path))} is a folder"):
        JobConfig.from_toml(tmp_path)
    path = tmp_path / "job.toml"
    path.write_bytes(b"rounds = 3\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"job\.toml is not UTF-8 text"):
        JobConfig.from_toml(path)


def test_broker_settings_name_the_option(tmp_path: Path) -> None:
    from splitft.shared.wire.broker import broker_settings

    key = tmp_path / "job.key"
    key.write_text("ab" * 32 + "\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("PEM\n")
    settings = broker_settings("mqtts://b:8883", ca_file=ca, auth_key_file=key, auth_window_s=30)
    assert settings.tls and settings.ca_file == str(ca) and settings.auth_key == bytes.fromhex("ab" * 32)
    assert settings.auth_window_s == 30 and settings.cert_file is None
    assert broker_settings("mqtt://b:1883").auth_key is None
    cases = [
        ({"ca_file": tmp_path / "nope.pem"}, "--ca-file .*nope.pem does not exist"),
        ({"ca_file": tmp_path}, "--ca-file .* is not a file"),
        ({"cert_file": ca}, "needs both --cert-file and --key-file"),
        ({"auth_key_file": ca}, "--auth-key-file: key file .*ca.pem must hold hex digits only"),
        ({"auth_window_s": 0}, "--auth-window must be a positive number"),
        ({"connect_timeout_s": -1.0}, "--connect-timeout must be a positive number"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            broker_settings("mqtts://b:8883", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="the broker url must be mqtts://"):
        broker_settings("mqtt://b:1883", ca_file=ca)
    with pytest.raises(ConfigError, match="broker url must look like"):
        broker_settings("b:1883")


def test_torch_device() -> None:
    from splitft.shared.job.config import torch_device

    assert torch_device("cpu") == "cpu"
    assert torch_device("auto") in ("cpu", "cuda")
    for bad, message in (("tpu", "device must be auto, cpu or cuda"), ("cuda:x", "cuda"), ("cuda:99", "no such")):
        with pytest.raises(ConfigError, match=message):
            torch_device(bad)


def test_overrides_ignore_flags_not_given() -> None:
    job = JobConfig(rounds=3).with_overrides(rounds=None, model="tiny-llama")
    assert job.rounds == 3 and job.model == "tiny-llama"
