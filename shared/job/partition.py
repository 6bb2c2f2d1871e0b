"""Length-based Dirichlet partition: non-IID client shards that differ in how long their sequences are.

The method follows the SplitFT paper. Every sample gets a token length; the ``K - 1`` quantile edges of
those lengths cut them into ``K`` buckets (short ... long). Each bucket is shuffled and cut among the
``N`` clients by proportions drawn from ``Dirichlet(alpha, ..., alpha)``: a small ``alpha`` (0.1) hands
most of a bucket to one or two clients, so devices see very different lengths (and memory, and step
time); a large ``alpha`` (1000) gives every client nearly the global mix, i.e. an IID split.
:meth:`Partition.skew` measures the result as the mean total-variation distance between each client's
bucket distribution and the global one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from splitft.shared.errors import ConfigError
from splitft.shared.job.data import encode, write_parts
from splitft.shared.job.records import Record

MAX_TRIES = 100  # redraws of the whole partition before min_samples is declared unreachable


@dataclass(frozen=True)
class Partition:
    """Sample indices per client, with the length bucket of every sample and the bucket edges."""

    parts: tuple[tuple[int, ...], ...]  # sample indices per client
    bucket_of: tuple[int, ...]  # bucket index of every sample
    edges: tuple[float, ...]  # the K-1 length quantile edges

    @property
    def num_buckets(self) -> int:
        return len(self.edges) + 1

    def counts(self) -> list[int]:
        """Number of samples of each client."""
        return [len(part) for part in self.parts]

    def bucket_histogram(self) -> list[list[int]]:
        """Per client, the number of its samples in each length bucket."""
        hist = [[0] * self.num_buckets for _ in self.parts]
        for client, part in enumerate(self.parts):
            for i in part:
                hist[client][self.bucket_of[i]] += 1
        return hist

    def skew(self) -> float:
        """Mean over clients of the total-variation distance between the client's bucket distribution and the global one.

        0 means every client holds the global mix (IID); the bound is 1. Clients without samples are left out.
        """
        glob = np.bincount(np.asarray(self.bucket_of, dtype=np.int64), minlength=self.num_buckets) / len(self.bucket_of)
        tvs = [0.5 * float(np.abs(np.asarray(h) / sum(h) - glob).sum()) for h in self.bucket_histogram() if sum(h)]
        return float(np.mean(tvs)) if tvs else 0.0


def _cut_bucket(rng: np.random.Generator, members: np.ndarray, num_clients: int, alpha: float) -> list[np.ndarray]:
    # Shuffle, then cut at the rounded cumulative Dirichlet proportions: the pieces always cover the bucket.
    shuffled = rng.permutation(members)
    cuts = np.rint(np.cumsum(rng.dirichlet([alpha] * num_clients))[:-1] * len(shuffled)).astype(np.int64)
    return np.split(shuffled, cuts)


def length_dirichlet_partition(
    lengths: Sequence[int], num_clients: int, alpha: float, num_buckets: int = 4, min_samples: int = 2, seed: int = 0
) -> Partition:
    """Split samples among ``num_clients`` by length bucket and per-bucket Dirichlet(``alpha``) proportions.

    The ``num_buckets - 1`` edges are the numpy quantiles of ``lengths`` at ``k / num_buckets``; sample ``i``
    falls in the bucket ``searchsorted(edges, lengths[i], "right")``, so tied lengths share a bucket and some
    buckets may stay empty. Each bucket's indices are shuffled and cut by the rounded cumulative proportions of
    a fresh Dirichlet draw. When a client ends with fewer than ``min_samples`` samples the whole partition is
    drawn again from the same generator (rejection sampling, up to :data:`MAX_TRIES` times), so the result is
    a function of ``seed``. Client parts are sorted; every sample is in exactly one of them.
    """
    n = len(lengths)
    if n == 0:
        raise ConfigError("lengths must not be empty")
    if num_clients < 1:
        raise ConfigError(f"num_clients must be at least 1, got {num_clients}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"alpha must be a finite number > 0, got {alpha}")
    if num_buckets < 1:
        raise ConfigError(f"num_buckets must be at least 1, got {num_buckets}")
    if min_samples < 0 or min_samples * num_clients > n:
        raise ConfigError(
            f"min_samples ({min_samples}) must be >= 0 and min_samples * num_clients ({num_clients}) <= {n} samples"
        )
    arr = np.asarray(lengths, dtype=np.float64)
    edges = np.quantile(arr, np.arange(1, num_buckets) / num_buckets) if num_buckets > 1 else np.empty(0)
    bucket_of = np.searchsorted(edges, arr, side="right")
    buckets = [np.flatnonzero(bucket_of == k) for k in range(num_buckets)]
    rng = np.random.default_rng(seed)
    for _ in range(MAX_TRIES):
        pieces = [_cut_bucket(rng, members, num_clients, alpha) for members in buckets]
        parts = [np.sort(np.concatenate([p[c] for p in pieces])) for c in range(num_clients)]
        if min(len(p) for p in parts) >= min_samples:
            return Partition(
                parts=tuple(tuple(int(i) for i in p) for p in parts),
                bucket_of=tuple(int(b) for b in bucket_of),
                edges=tuple(float(e) for e in edges),
            )
    raise ConfigError(
        f"alpha={alpha} with min_samples={min_samples} cannot be met: {MAX_TRIES} draws for {num_clients} clients "
        f"over {n} samples each left a client short; raise alpha or lower min_samples"
    )


def token_lengths(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, chat_template: str | bool = "auto"
) -> list[int]:
    """Tokens of every record as :func:`data.tokenize` renders it, untruncated."""
    return [len(ids) for ids, _ in encode(records, tokenizer, chat_template)]


def write_partition(
    records: Sequence[Record], partition: Partition, out_dir: str | Path, prefix: str = "client"
) -> list[Path]:
    """One JSONL file ``out_dir/{prefix}-{i}.jsonl`` per client (see :func:`data.write_parts`), written atomically."""
    if len(records) != len(partition.bucket_of):
        raise ConfigError(f"{len(records)} records, but the partition covers {len(partition.bucket_of)}")
    return write_parts(records, partition.parts, out_dir, prefix)


def plot_partition(partition: Partition, lengths: Sequence[int], out_png: str | Path, title: str = "") -> Path:
    """A PNG with one small length-histogram panel per client, on shared bins, with the bucket edges dashed."""
    from matplotlib.figure import Figure  # lazy: plotting is optional, and Figure needs no pyplot state

    arr = np.asarray(lengths, dtype=np.float64)
    n = len(partition.parts)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * rows), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, squeeze=False)).ravel()
    bins = np.histogram_bin_edges(arr, bins=40)
    for client, part in enumerate(partition.parts):
        ax = axes[client]
        ax.hist(arr[list(part)], bins=bins, color=f"C{client % 10}")
        for edge in partition.edges:
            ax.axvline(edge, color="grey", linestyle="--", linewidth=0.8)
        mean = f", mean {arr[list(part)].mean():.0f}" if part else ""
        ax.set_title(f"client {client}: {len(part)} samples{mean}", fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.supxlabel("tokens per sample", fontsize=9)
    if title:
        fig.suptitle(title)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def describe(partition: Partition, lengths: Sequence[int]) -> list[dict[str, Any]]:
    """Per client: ``client``, ``samples``, ``mean``/``median``/``p90`` length (NaN when empty), ``buckets`` counts."""
    arr = np.asarray(lengths, dtype=np.float64)
    rows = []
    for client, (part, hist) in enumerate(zip(partition.parts, partition.bucket_histogram(), strict=True)):
        own = arr[list(part)]
        stats = (float(own.mean()), float(np.median(own)), float(np.quantile(own, 0.9))) if part else (math.nan,) * 3
        rows.append(
            {
                "client": client,
                "samples": len(part),
                "mean": stats[0],
                "median": stats[1],
                "p90": stats[2],
                "buckets": hist,
            }
        )
    return rows
