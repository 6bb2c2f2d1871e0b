"""The job's privacy setting, the clip calibrated per cut, and the audited table ``run`` reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from splitft.coordinator.prepare import calibrated_clips, encode_assignment
from splitft.coordinator.private import PrivateAdapters
from splitft.coordinator.roster import Participant
from splitft.shared.errors import ConfigError
from splitft.shared.job.config import JobConfig
from splitft.shared.model.calibration import public_clips
from splitft.shared.model.defense import PRIVACY_LEVELS, DefenseSettings, defend
from splitft.shared.model.loading import model_fingerprint
from splitft.shared.wire.control import parse_assign
from splitft.tools.audit.table import (
    describe,
    job_privacy,
    load_table,
    record_audit,
    record_private,
    record_trained,
)


def test_privacy_levels_set_the_defense_and_private_adapters() -> None:
    assert JobConfig(model="tiny-gpt2").defense == DefenseSettings()
    for name in ("balanced", "strict"):
        job = JobConfig(model="tiny-gpt2", privacy=name)
        level = PRIVACY_LEVELS[name]
        assert job.defense == level.defense and job.defense.distance > 0 and job.private_adapters
        # a job written back and read again (checkpoints, workers) is the same job
        again = {"model": "tiny-gpt2", "privacy": name, "private_adapters": True, "defense": vars(job.defense)}
        assert JobConfig.from_dict(again) == job
    assert PRIVACY_LEVELS["strict"].defense.distance > PRIVACY_LEVELS["balanced"].defense.distance


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"privacy": "paranoid"}, "privacy must be one of"),
        ({"privacy": "strict", "defense": {"noise": 0.5}}, "leave \\[defense\\] out"),
        ({"defense": {"clip": 1.0, "clip_quantile": 0.5}}, "not both"),
        ({"private_adapters": True, "c_min": 2, "cut": 1}, "below c_min: \\(default\\) 1"),
        ({"private_adapters": "yes"}, "true or false"),
        ({"defense": {"clip_quantile": 0.0}}, "defense.clip_quantile"),
        ({"defense": {"clip_quantile": "median"}}, "defense.clip_quantile"),
    ],
)
def test_bad_privacy_settings_name_the_problem(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JobConfig.from_dict({"model": "tiny-gpt2", **data})


def test_an_uncalibrated_clip_is_not_applied() -> None:
    with pytest.raises(ValueError, match="calibrated"):
        defend(torch.ones(1, 2, 4), DefenseSettings(clip_quantile=0.5))
    assert DefenseSettings(noise=1.0, clip_quantile=0.5).calibrated(2.5) == DefenseSettings(noise=1.0, clip=2.5)


def test_each_assignment_carries_the_clip_of_its_cut() -> None:
    job = JobConfig(model="tiny-llama", defense=DefenseSettings(noise=1.0, clip_quantile=0.5), c_min=1, c_max=3, cut=2)
    clips = calibrated_clips(job, 4)
    assert sorted(clips) == [1, 2, 3] and len(set(clips.values())) == 3 and all(v > 0 for v in clips.values())
    assert clips == public_clips("tiny-llama", (1, 2, 3), 0.5)  # the same figures wherever computed
    # one cut alone gives the same clip as in one pass with the others
    assert public_clips("tiny-llama", (2,), 0.5)[2] == pytest.approx(clips[2], rel=1e-5)
    for cut in (1, 3):
        participant = Participant("a1", cut, dict.fromkeys(range(cut), 8), "s:1:1", "s", {})
        body = encode_assignment(job, "fp", 1, 1, participant, clips, PrivateAdapters(job), {})
        assert body["defense"] == {"noise": 1.0, "clip": clips[cut], "nopeek": 0.0}
        assert parse_assign(1, body, "fp", 4).defense == DefenseSettings(noise=1.0, clip=clips[cut])
    assert calibrated_clips(JobConfig(model="tiny-llama"), 4) == {}


def _results(fingerprint: str) -> dict[str, Any]:
    """What scripts/bench_exact_attack.py produces, in the fields the table reads."""
    return {
        "fingerprint": fingerprint, "model": "tiny test model", "date": "2026-12-05", "hidden_size": 64,
        "settings": {"exact_tokens": 32}, "defense_cut": 2,
        "plain": [
            {"cut": 1, "best": 1.0, "best_attacker": "exact search", "exact_labels": 1.0},
            {"cut": 2, "best": 0.98, "best_attacker": "exact search", "exact_labels": None},
        ],
        "defended": [
            {"defense": "clip + noise 1", "noise_std": 1.0 * 2.0 / 8, "clip": 2.0, "best": 0.4,
             "best_attacker": "learned inverse", "exact_labels": 0.3},
        ],
        "costs": [{"eval_loss": 2.0}, {"eval_loss": 2.1}],
        "labels": [{"tail": 0, "recovery": 0.9}],
    }  # fmt: skip


def test_the_audited_table_answers_for_a_job(tmp_path: Path) -> None:
    path = tmp_path / "audited.json"
    fingerprint = model_fingerprint("tiny-gpt2")
    record_audit(path, _results(fingerprint))
    record_audit(path, _results(fingerprint))  # recorded again: replaced, not doubled
    table = load_table(path)
    assert list(table) == [fingerprint] and table[fingerprint]["defenses"][0]["noise"] == 1.0
    plain = describe(fingerprint, [1, 3], "u", DefenseSettings(), table)
    assert "cut 1: 100% of tokens (exact search)" in plain and "cut 3: not audited" in plain
    assert "90% from the tail gradient" in plain
    noisy = describe(fingerprint, [2], "two-part", DefenseSettings(noise=1.0, clip_quantile=0.5), table)
    assert "clip + noise 1 at cut 2" in noisy and "40% of a device's tokens" in noisy and "+5.0% eval loss" in noisy
    assert "noise 4 not audited" in describe(
        fingerprint, [2], "u", DefenseSettings(noise=4.0, clip_quantile=0.5), table
    )
    assert "not audited" in describe("0" * 16, [1], "u", DefenseSettings(), table)
    assert "nopeek 1 is not audited" in describe(fingerprint, [1], "u", DefenseSettings(nopeek=1.0), table)
    private = {
        "model": "tiny test model", "cut": 2, "date": "2026-12-05",
        "rows": [
            {"distance": 0.0, "knows_adapters": True, "best": 1.0, "best_attacker": "exact search", "exact_labels": 1.0, "eval_loss": 1.0},
            {"distance": 0.5, "knows_adapters": False, "best": 0.7, "best_attacker": "exact search", "exact_labels": 0.6, "eval_loss": 1.1},
        ],
    }  # fmt: skip
    record_private(path, fingerprint, private)
    table = load_table(path)
    line = describe(fingerprint, [2], "u", DefenseSettings(distance=0.5), table, private=True)
    assert (
        "private adapters, distance 0.5, at cut 2" in line and "70% of a device's tokens" in line and "+10.0%" in line
    )
    assert "not audited" in describe(fingerprint, [2], "u", DefenseSettings(distance=2.0), table, private=True)


def test_figures_fine_tuned_with_the_noise_are_preferred(tmp_path: Path) -> None:
    path = tmp_path / "audited.json"
    fingerprint = model_fingerprint("tiny-gpt2")
    record_audit(path, _results(fingerprint))
    row = {"best_attacker": "exact search", "bottleneck": None, "distance": 0.0, "knows_adapters": True}
    trained = {
        "model": "tiny test model", "cut": 2, "date": "2026-12-05",
        "rows": [
            {**row, "setting": "none", "noise": 0.0, "best": 1.0, "exact_labels": 1.0, "eval_loss": 1.0},
            {**row, "setting": "clip + noise 1", "noise": 1.0, "best": 0.9, "exact_labels": 0.8, "eval_loss": 2.0},
            {**row, "setting": "bottleneck 1", "noise": 0.0, "bottleneck": 1.0, "best": 1.0, "exact_labels": 1.0, "eval_loss": 1.2},
            {**row, "setting": "private + distance 0.5 + clip + noise 1", "noise": 1.0, "distance": 0.5,
             "knows_adapters": False, "best": 0.3, "exact_labels": None, "eval_loss": 2.5},
        ],
    }  # fmt: skip
    record_trained(path, fingerprint, trained)
    record_audit(path, _results(fingerprint))  # the frozen figures recorded again keep the fine-tuned ones
    table = load_table(path)
    assert [r["name"] for r in table[fingerprint]["trained"]["settings"]] == [
        "clip + noise 1", "private + distance 0.5 + clip + noise 1"
    ]  # fmt: skip
    noisy = describe(fingerprint, [2], "two-part", DefenseSettings(noise=1.0, clip_quantile=0.5), table)
    assert "90% of a device's tokens and 80% of its labels, for +100.0% eval loss (audited, fine-tuned" in noisy
    both = DefenseSettings(noise=1.0, clip_quantile=0.5, distance=0.5)
    line = describe(fingerprint, [2], "u", both, table, private=True)
    assert line.startswith("privacy: private adapters + distance 0.5 + clip + noise 1 at cut 2")
    assert "completed from the public base) reads back 30% of a device's tokens, for +150.0%" in line
    # the frozen figure where nothing fine-tuned matches; a fixed clip is not the calibrated one
    frozen = describe(fingerprint, [2], "u", both, table)  # not private: nothing fine-tuned matches
    assert "40% of a device's tokens" in frozen and "(audited, frozen base)" in frozen
    assert "not audited" in describe(fingerprint, [2], "u", DefenseSettings(noise=1.0, clip=3.0), table)


def test_run_says_what_the_audit_found_for_the_shipped_table() -> None:
    table = load_table()
    assert table, "the package ships the audited table"
    for entry in table.values():
        assert entry["cuts"] and all(0 <= row["tokens"] <= 1 for row in entry["cuts"].values())
    assert job_privacy(JobConfig(model="tiny-gpt2")).startswith("privacy: not audited")
