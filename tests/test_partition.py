"""The length-based Dirichlet partition: coverage, determinism, skew vs alpha, files, plot, argument errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from splitft.shared.errors import ConfigError
from splitft.shared.job.data import tokenize
from splitft.shared.job.partition import (
    Partition,
    describe,
    length_dirichlet_partition,
    plot_partition,
    token_lengths,
    write_partition,
)
from splitft.shared.job.records import load_records
from splitft.shared.model.tokenizer import GSM8K, load_tokenizer


def synthetic_lengths(n: int = 2000, seed: int = 123) -> list[int]:
    """Log-normal token lengths around 150, like instruction data."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(150), 0.5, n).astype(int), 8, None).tolist()


def assert_covers(partition: Partition, n: int) -> None:
    flat = [i for part in partition.parts for i in part]
    assert sorted(flat) == list(range(n)), "every sample must be in exactly one client"


@pytest.fixture(scope="module")
def gsm8k() -> tuple[list[tuple[str, str]], list[int]]:
    pairs = load_records(GSM8K / "train.jsonl", limit=600)
    return pairs, token_lengths(pairs, load_tokenizer("tiny-gpt2"))


def test_gsm8k_lengths_match_tokenize_and_partition_covers(gsm8k: tuple[list[tuple[str, str]], list[int]]) -> None:
    pairs, lengths = gsm8k
    examples = tokenize(pairs, load_tokenizer("tiny-gpt2"), max_length=100_000)
    assert lengths == [len(e.input_ids) for e in examples]
    p = length_dirichlet_partition(lengths, num_clients=6, alpha=0.3, seed=1)
    assert_covers(p, len(pairs))
    assert min(p.counts()) >= 2 and len(p.edges) == 3
    # Buckets are quantile cuts: each holds roughly a quarter of the samples, and longer buckets hold longer samples.
    sizes = np.bincount(p.bucket_of, minlength=4)
    assert all(100 <= s <= 200 for s in sizes), sizes
    assert all(lengths[i] < p.edges[0] for i in range(len(lengths)) if p.bucket_of[i] == 0)
    assert all(lengths[i] >= p.edges[-1] for i in range(len(lengths)) if p.bucket_of[i] == 3)
    rows = describe(p, lengths)
    assert [r["samples"] for r in rows] == p.counts()
    assert [r["buckets"] for r in rows] == p.bucket_histogram()
    assert all(r["median"] <= r["p90"] for r in rows)


def test_deterministic_for_a_seed_and_different_for_another() -> None:
    lengths = synthetic_lengths()
    a = length_dirichlet_partition(lengths, 8, 0.5, seed=7)
    assert a == length_dirichlet_partition(lengths, 8, 0.5, seed=7)
    assert a.parts != length_dirichlet_partition(lengths, 8, 0.5, seed=8).parts


@pytest.mark.parametrize("alpha", [0.1, 1.0, 1000.0])
@pytest.mark.parametrize("num_buckets", [1, 4, 7])
def test_every_sample_exactly_once(alpha: float, num_buckets: int) -> None:
    lengths = synthetic_lengths(999)
    p = length_dirichlet_partition(lengths, 5, alpha, num_buckets=num_buckets, seed=3)
    assert_covers(p, len(lengths))
    assert len(p.edges) == num_buckets - 1
    assert sum(map(sum, p.bucket_histogram())) == len(lengths)


def test_min_samples_respected_by_redrawing() -> None:
    lengths = synthetic_lengths(400)
    for seed in range(10):
        p = length_dirichlet_partition(lengths, 10, 0.1, min_samples=5, seed=seed)
        assert min(p.counts()) >= 5
        assert_covers(p, len(lengths))


def test_unreachable_min_samples_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"alpha.*min_samples.*cannot be met"):
        length_dirichlet_partition(synthetic_lengths(200), 20, 0.01, min_samples=10)


def test_tied_lengths_leave_buckets_empty_but_cover_everything() -> None:
    lengths = [5] * 50 + [9] * 10
    p = length_dirichlet_partition(lengths, 3, 1.0, num_buckets=4)
    assert_covers(p, 60)
    assert p.edges == (5.0, 5.0, 5.0)
    assert set(p.bucket_of) == {3}  # all samples land right of every edge: buckets 0-2 are empty
    assert p.skew() == 0.0


def test_skew_and_mean_lengths_follow_alpha() -> None:
    # Measured over seeds 0-29: alpha 0.1 skew 0.52-0.68, mean-length ratio 1.9-4.8; alpha 1000 skew <= 0.015,
    # ratio <= 1.08. The thresholds leave a wide margin on both sides.
    lengths = synthetic_lengths()
    for seed in range(3):
        noniid = length_dirichlet_partition(lengths, 8, 0.1, seed=seed)
        iid = length_dirichlet_partition(lengths, 8, 1000.0, seed=seed)
        mid = length_dirichlet_partition(lengths, 8, 1.0, seed=seed)
        assert noniid.skew() > 0.4
        assert iid.skew() < 0.1
        assert iid.skew() < mid.skew() < noniid.skew()
        means = [r["mean"] for r in describe(noniid, lengths)]
        assert max(means) / min(means) > 1.5
        means = [r["mean"] for r in describe(iid, lengths)]
        assert max(means) / min(means) < 1.15


def test_write_partition_round_trips(tmp_path: Path, gsm8k: tuple[list[tuple[str, str]], list[int]]) -> None:
    pairs, lengths = gsm8k
    p = length_dirichlet_partition(lengths, 4, 0.5, seed=2)
    paths = write_partition(pairs, p, tmp_path / "parts")
    assert paths == [tmp_path / "parts" / f"client-{c}.jsonl" for c in range(4)]
    for path, part in zip(paths, p.parts, strict=True):
        assert load_records(path) == [pairs[i] for i in part]
    assert not list((tmp_path / "parts").glob("*.tmp"))
    with pytest.raises(ConfigError, match="599 records, but the partition covers 600"):
        write_partition(pairs[:-1], p, tmp_path / "other")


def test_plot_partition_writes_a_png(tmp_path: Path) -> None:
    lengths = synthetic_lengths()
    p = length_dirichlet_partition(lengths, 6, 0.1, seed=0)
    out = plot_partition(p, lengths, tmp_path / "fig" / "partition.png", title="alpha 0.1")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5_000


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lengths": []}, "lengths"),
        ({"num_clients": 0}, "num_clients"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
        ({"num_buckets": 0}, "num_buckets"),
        ({"min_samples": 6}, "min_samples"),
        ({"min_samples": -1}, "min_samples"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, object], name: str) -> None:
    args: dict[str, object] = {"lengths": list(range(10, 30)), "num_clients": 4, "alpha": 1.0} | kwargs
    with pytest.raises(ConfigError, match=name):
        length_dirichlet_partition(**args)  # type: ignore[arg-type]
