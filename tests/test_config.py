"""Job configuration: the README's example parses; every bad value is named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from splitft.shared.config import JobConfig
from splitft.shared.errors import ConfigError

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
        ("rounds = ", "cannot read job file"),
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


def test_overrides_ignore_flags_not_given() -> None:
    job = JobConfig(rounds=3).with_overrides(rounds=None, model="tiny-llama")
    assert job.rounds == 3 and job.model == "tiny-llama"
