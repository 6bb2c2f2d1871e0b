"""Token-weighted aggregation of LoRA adapters across the holders of each layer, with heterogeneous ranks.

Every module (one LoRA pair ``A`` (r, in), ``B`` (out, r)) is averaged over the contributions that hold
it, each weighted by the tokens it trained on, the weights normalised over those holders only. A
module nobody holds is left out of the result so the caller keeps its old value.

Why factors are averaged when the ranks agree: then ``A`` and ``B`` of every holder live in the same
parameter space, started from the same seed-by-name initialisation (``shared.lora.init_lora``), and
averaging them is plain FedAvg of the parameters the devices actually train. The gradient of a
token-weighted loss is the token-weighted average of the per-holder gradients, so one local step
followed by factor averaging is exactly one centralised SGD step on the pooled batch, up to float
rounding. Averaging the products instead would break that equality.

Why products are averaged when the ranks differ: factors of different ranks have different shapes
and their rank directions are unrelated, so averaging them means nothing. What every holder's
adapter contributes to the model is the update ``ΔW ∝ B @ A`` (out, in), and since
``lora_alpha = alpha_per_rank * rank`` the scaling is the same at every rank, so updates of different
ranks are directly comparable. Note ``avg(B @ A) != avg(B) @ avg(A)`` (the latter has cross terms
``B_i @ A_j``): we average the updates exactly, in float64, then re-factorise the average to the
target rank by truncated SVD (computed from the stacked factors, never forming the (out, in) update),
``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``, which by Eckart–Young is the best rank-r approximation
of the averaged update in Frobenius norm (exact when the average has rank <= r).

When the target rank exceeds the rank of the average (or ``min(out, in)``), the extra directions
must stay trainable: their ``A`` rows get a fresh Kaiming-uniform draw (bound ``1/sqrt(in)``, seeded
from ``seed`` and the module key) and their ``B`` columns zeros, so ``B @ A`` is unchanged while both
factors of the new directions receive gradients (a zero row of A *and* zero column of B never would).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from splitft.shared.errors import ConfigError

_A = ".lora_A.weight"
_B = ".lora_B.weight"


@dataclass(frozen=True)
class Contribution:
    """One holder's adapters for the modules it holds, and the weight (tokens it trained on)."""

    weight: float
    state: Mapping[str, torch.Tensor]  # saved names -> tensors, both lora_A and lora_B of each module it holds


def module_key(name: str) -> str:
    """The module key of a saved LoRA weight name: the name without ``.lora_A.weight`` / ``.lora_B.weight``."""
    for suffix in (_A, _B):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    raise ConfigError(f"{name!r} is not a LoRA weight name (expected a '{_A}' or '{_B}' suffix)")


def state_ranks(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Module key -> rank (``A.shape[0]``) of ``state``, checking every module has a consistent A/B pair."""
    names: dict[str, set[str]] = {}
    for name in state:
        names.setdefault(module_key(name), set()).add(name)
    ranks: dict[str, int] = {}
    for key in names:
        if key + _A not in state or key + _B not in state:
            lone = "lora_A" if key + _A in state else "lora_B"
            raise ConfigError(f"module {key!r}: {lone} given without its pair")
        a, b = state[key + _A], state[key + _B]
        if a.dim() != 2 or b.dim() != 2:
            raise ConfigError(f"module {key!r}: LoRA factors must be 2-D, got A {tuple(a.shape)}, B {tuple(b.shape)}")
        if a.shape[0] != b.shape[1] or 0 in (*a.shape, *b.shape):
            raise ConfigError(f"module {key!r}: A {tuple(a.shape)} and B {tuple(b.shape)} are not a LoRA pair")
        ranks[key] = a.shape[0]
    return ranks


def _check_rank(key: str, rank: object) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"module {key!r}: target rank must be a positive integer, got {rank!r}")
    return rank


def _weighted(probs: Sequence[float], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_h probs[h] * tensors[h]`` in float64."""
    out = probs[0] * tensors[0].double()
    for p, t in zip(probs[1:], tensors[1:], strict=True):
        out = out + p * t.double()
    return out


def _svd_of_product(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD ``u, s, vh`` of ``b @ a`` ((out, R) @ (R, in), float64) without forming the product.

    ``b = Q_b R_b`` and ``a^T = Q_a R_a`` (reduced QR), so ``b @ a = Q_b (R_b R_a^T) Q_a^T`` and the SVD of
    the small core ``R_b R_a^T`` gives the product's: the same singular values and vectors as an SVD of the
    (out, in) product, in O((out + in) R^2) instead of O(out in min(out, in)) (at SmolLM2-135M's MLP,
    1536 x 576 against a stacked rank of 32: about 30 times less work)."""
    q_b, r_b = torch.linalg.qr(b)  # (out, k_b), (k_b, R)
    q_a, r_a = torch.linalg.qr(a.T)  # (in, k_a), (k_a, R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # (k_b, k), (k,), (k, k_a)
    return q_b @ u, s, vh @ q_a.T


def _refactor(b: torch.Tensor, a: torch.Tensor, rank: int, key: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (A, B) of the update ``b @ a`` (float64 factors, (out, R) and (R, in)),
    padded to ``rank``; float32 out."""
    out_f, in_f = b.shape[0], a.shape[1]
    u, s, vh = _svd_of_product(b, a)
    # Singular values below the usual numerical-rank tolerance (that of an SVD of the (out, in) update) are
    # noise: keeping them would add directions of random orientation and ~0 scale that are neither the update
    # nor trainable.
    tol = s.max() * max(out_f, in_f) * torch.finfo(torch.float64).eps
    kept = min(rank, int((s > tol).sum()))
    root = s[:kept].sqrt()
    b_out = u[:, :kept] * root  # (out, kept)
    a_out = root[:, None] * vh[:kept]  # (kept, in)
    if kept < rank:
        # Draw the full (rank, in) block and keep its tail, so row i's init does not depend on `kept`.
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        fresh = (torch.rand((rank, in_f), generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(in_f)
        a_out = torch.cat([a_out, fresh[kept:].to(a.device)])  # (rank, in)
        b_out = torch.cat([b_out, b.new_zeros((out_f, rank - kept))], dim=1)  # (out, rank)
    return a_out.float(), b_out.float()


def to_rank(
    a: torch.Tensor, b: torch.Tensor, rank: int, *, key: str = "", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(A, B)`` of the update ``b @ a`` at ``rank``.

    Returns the inputs themselves when ``a`` already has that rank; otherwise the truncated-SVD
    re-factorisation (float32), with extra directions padded as the module docstring explains. ``key``
    and ``seed`` seed the padding draw.
    """
    rank = _check_rank(key, rank)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ConfigError(f"module {key!r}: A {tuple(a.shape)} and B {tuple(b.shape)} are not a LoRA pair")
    if a.shape[0] == rank:
        return a, b
    return _refactor(b.double(), a.double(), rank, key, seed)


def aggregate(
    contributions: Sequence[Contribution], ranks: Mapping[str, int], seed: int = 0
) -> dict[str, torch.Tensor]:
    """Token-weighted average of the adapters of every module in ``ranks`` that someone holds, at ``ranks[key]``.

    Each module is averaged over its holders only. Factors are averaged when every holder has the
    target rank; otherwise the products are averaged and re-factorised (see the module docstring).
    Returns saved names -> float32 tensors; modules nobody holds are absent.
    """
    if not contributions:
        raise ConfigError("aggregate needs at least one contribution")
    holders: dict[str, list[tuple[float, torch.Tensor, torch.Tensor]]] = {}
    for i, c in enumerate(contributions):
        try:
            w = float(c.weight)
        except (TypeError, ValueError):
            raise ConfigError(f"contribution {i}: weight must be a number, got {c.weight!r}") from None
        if not (math.isfinite(w) and w > 0):
            raise ConfigError(f"contribution {i}: weight must be finite and > 0, got {c.weight!r}")
        for key in state_ranks(c.state):
            if key not in ranks:
                raise ConfigError(f"module {key!r} held by contribution {i} has no target rank")
            holders.setdefault(key, []).append((w, c.state[key + _A], c.state[key + _B]))

    result: dict[str, torch.Tensor] = {}
    for key, held in holders.items():
        rank = _check_rank(key, ranks[key])
        in_f, out_f = held[0][1].shape[1], held[0][2].shape[0]
        for _, a, b in held:
            if a.shape[1] != in_f or b.shape[0] != out_f:
                raise ConfigError(
                    f"module {key!r}: holders disagree on the shape, (out, in) = {(b.shape[0], a.shape[1])} "
                    f"vs {(out_f, in_f)}"
                )
        total = sum(w for w, _, _ in held)
        # Normalise first so that a lone holder gets weight exactly 1.0 and its factors come back bit-exact.
        probs = [w / total for w, _, _ in held]
        if all(a.shape[0] == rank for _, a, _ in held):
            a_out = _weighted(probs, [a for _, a, _ in held]).float()  # (r, in)
            b_out = _weighted(probs, [b for _, _, b in held]).float()  # (out, r)
        else:
            # The weighted sum of the updates, sum_h p_h B_h A_h, is one product of the stacked factors.
            b_all = torch.cat([p * b.double() for p, (_, _, b) in zip(probs, held, strict=True)], dim=1)
            a_all = torch.cat([a.double() for _, a, _ in held])  # (sum of ranks, in)
            a_out, b_out = _refactor(b_all, a_all, rank, key, seed)
        result[key + _A], result[key + _B] = a_out, b_out
    return result


def convert_state(
    state: Mapping[str, torch.Tensor], ranks: Mapping[str, int], seed: int = 0
) -> dict[str, torch.Tensor]:
    """``state`` restricted to the modules in ``ranks``, each converted to its rank there.

    Modules already at their rank are copied unchanged; modules of ``state`` not in ``ranks`` are
    dropped (the receiver holds only some modules); a module in ``ranks`` missing from ``state`` is an error.
    """
    have = state_ranks(state)
    missing = sorted(set(ranks) - set(have))
    if missing:
        raise ConfigError(f"adapter state lacks modules to convert: {missing[:3]}")
    out: dict[str, torch.Tensor] = {}
    for key, rank in ranks.items():
        a, b = to_rank(state[key + _A], state[key + _B], rank, key=key, seed=seed)
        out[key + _A], out[key + _B] = a.clone(), b.clone()
    return out
