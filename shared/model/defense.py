"""Defenses of the smashed data: what a device may do to its activations before the server sees them.

The threat: the server knows the frozen base model (it is public) and the client's LoRA adapters
(it aggregates them every round), so it can train an inverse model from public text and read the
device's tokens back from shallow-cut activations (BiSR, arXiv 2409.00960; RevertLM, 2501.05965).
``tools/audit/`` measures how well; this module holds the defenses a job can switch on.

* **clip** (``clip``): every token's hidden vector is scaled down to L2 norm at most ``clip``;
  it bounds what one token can contribute and gives the noise a scale.
* **noise** (``noise``): Gaussian noise added to every coordinate after the clip, with standard
  deviation ``noise * clip / sqrt(C)`` (``noise / sqrt(C)`` without a clip), so that the noise
  *vector* of a token has an expected norm of about ``noise * clip``: ``noise`` is a noise-to-signal
  norm ratio, comparable across model widths. In the Gaussian mechanism's usual terms the noise
  multiplier per coordinate is ``noise / sqrt(C)``. This is a heuristic, not a differential privacy
  guarantee: nothing here accounts the privacy loss over the many steps and tokens a device sends,
  and the tokens of one sequence are not independent.
* **NoPeek** (``nopeek``): a training-time term ``nopeek * DCor(x, z)`` the device adds to its loss,
  the distance correlation between its raw inputs ``x`` (token ids, with the discrete metric) and
  the activations ``z`` it sends (Vepakomma et al., "NoPeek: Information leakage reduction to share
  activations in distributed deep learning", 2020). Chosen as the second defense because it needs
  no change to the protocol (only to the device's loss), it is the best-known decorrelation defense
  for split learning, and it can be measured honestly here: train with it, then attack the trained
  adapters. Its reach is limited in this system, and the audit shows by how much: only the LoRA
  adapters train, so the device can change its activations only within the adapters' low-rank
  subspaces, while the residual stream keeps carrying the frozen token embedding.

:func:`defend` applies clip then noise and is the identity when both are off; ``nopeek`` does not
change the activations (add :func:`nopeek_loss` to the loss instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from splitft.shared.errors import ConfigError

_EPS = 1e-12


@dataclass(frozen=True)
class DefenseSettings:
    """The defenses of a device's activations; the default is no defense."""

    noise: float = 0.0  # Gaussian noise; per-token noise norm ~ noise * clip (or ~ noise without a clip); 0 = off
    clip: float | None = None  # per-token L2 norm bound on the activations; None = off
    nopeek: float = 0.0  # weight of the NoPeek distance-correlation term in the device's loss; 0 = off
    # Weight of the distance term: the device's loss gains ``distance`` x the mean over tokens of
    # max(0, 1 - |u - u_base|), u = h / |h| the direction of a token's activation at the cut and u_base the public
    # base model's (its adapters off), which turns its activations at least 60 degrees away from the base's: with
    # private adapters, a server that completes the client segment from the public base no longer finds the
    # tokens, whether it compares activations or their directions. Costs a forward pass without gradients.
    distance: float = 0.0
    # The clip calibrated per cut: this quantile of the token norms of public text at the device's cut (base
    # weights), set by the coordinator in each assignment (``clip`` then carries the value); None = off.
    clip_quantile: float | None = None

    def __post_init__(self) -> None:
        if not _number(self.noise) or self.noise < 0:
            raise ConfigError(f"defense.noise must be a finite number >= 0, got {self.noise!r}")
        if self.clip is not None and (not _number(self.clip) or self.clip <= 0):
            raise ConfigError(f"defense.clip must be a finite number > 0 (or unset), got {self.clip!r}")
        if not _number(self.nopeek) or self.nopeek < 0:
            raise ConfigError(f"defense.nopeek must be a finite number >= 0, got {self.nopeek!r}")
        if not _number(self.distance) or self.distance < 0:
            raise ConfigError(f"defense.distance must be a finite number >= 0, got {self.distance!r}")
        if self.clip_quantile is not None:
            if not _number(self.clip_quantile) or not 0 < self.clip_quantile <= 1:
                raise ConfigError(f"defense.clip_quantile must be in (0, 1], got {self.clip_quantile!r}")
            if self.clip is not None:
                raise ConfigError("defense: give clip (a fixed bound) or clip_quantile (calibrated per cut), not both")

    @property
    def active(self) -> bool:
        """Whether :func:`defend` changes the activations."""
        return self.noise > 0 or self.clip is not None or self.clip_quantile is not None

    def calibrated(self, clip: float) -> DefenseSettings:
        """These settings with the per-cut clip resolved to ``clip`` (what a device is sent)."""
        return replace(self, clip=clip, clip_quantile=None)

    def noise_std(self, width: int) -> float:
        """Standard deviation of the noise on each of ``width`` coordinates."""
        return self.noise * (self.clip if self.clip is not None else 1.0) / math.sqrt(width)

    def describe(self) -> str:
        parts = []
        if self.clip is not None:
            parts.append(f"clip {self.clip:.3g}")
        if self.clip_quantile is not None:
            parts.append("clip median" if self.clip_quantile == 0.5 else f"clip q{self.clip_quantile:g}")
        if self.noise > 0:
            parts.append(f"noise {self.noise:g}")
        if self.nopeek > 0:
            parts.append(f"nopeek {self.nopeek:g}")
        if self.distance > 0:
            parts.append(f"distance {self.distance:g}")
        return ", ".join(parts) or "none"


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class PrivacyLevel:
    """What ``privacy = "..."`` in a job file stands for: a defense, and whether the client adapters below
    ``c_min`` are private (sealed with the fleet key, averaged by the devices: shared/wire/sealed.py)."""

    defense: DefenseSettings
    private_adapters: bool = False


#: ``privacy = "off" | "balanced" | "strict"`` in a job file, measured against the strongest server by
#: ``scripts/bench_trained_defenses.py`` on SmolLM2-135M at cut 2 (BENCHMARKS.md, "Defenses trained with the
#: model"): the adapters kept from the server, and the distance term at two weights: 0.5 (98% of the tokens
#: recovered instead of 100%, for +2.6% eval loss) and 2 (89%, +16%). Neither hides much: the only setting measured
#: under 10% is clip + noise 8, at a price no model pays (BENCHMARKS.md, "Privacy against the strongest attacker").
PRIVACY_LEVELS = {
    "off": PrivacyLevel(DefenseSettings()),
    "balanced": PrivacyLevel(DefenseSettings(distance=0.5), private_adapters=True),
    "strict": PrivacyLevel(DefenseSettings(distance=2.0), private_adapters=True),
}


def clip_tokens(hidden: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale every token vector of ``hidden`` (..., C) down to L2 norm at most ``clip`` (differentiable)."""
    norms = hidden.norm(dim=-1, keepdim=True).clamp_min(_EPS)  # (..., 1)
    return hidden * (clip / norms).clamp(max=1.0)


def defend(hidden: torch.Tensor, settings: DefenseSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """The activations ``hidden`` (B, T, C) as the device sends them: clipped per token, then noised.

    Autograd flows through the clip; the noise is additive, so the gradient w.r.t. ``hidden`` is
    that of the clip alone. ``generator`` (on ``hidden``'s device) draws the noise; None uses
    torch's global generator. With every defense off this returns ``hidden`` itself.
    """
    if settings.clip_quantile is not None:
        raise ValueError("defend needs the clip calibrated: DefenseSettings.calibrated(clip) first")
    if settings.clip is not None:
        hidden = clip_tokens(hidden, settings.clip)
    if settings.noise > 0:
        std = settings.noise_std(hidden.shape[-1])
        noise = torch.randn(hidden.shape, generator=generator, device=hidden.device, dtype=hidden.dtype)
        hidden = hidden + noise * std
    return hidden


def distance_loss(
    hidden: torch.Tensor, base: torch.Tensor, attention_mask: torch.Tensor, weight: float
) -> torch.Tensor:
    """``weight`` x the mean over real tokens of ``max(0, 1 - |u - u_base|)``, ``u`` the direction (unit vector) of
    a token's activation: the device's activations ``hidden`` (B, T, C) turned away from the base model's ``base``
    (no gradient) until a token's directions are at least 1 apart (60 degrees).

    On directions, not on the vectors: a term on ``|h - h_base| / |h_base|`` is met by scaling the activations
    up (the adapters learned to double their norm, at a small price since the server's next block normalises
    them), and a server that compares directions then finds the tokens anyway."""
    apart = (F.normalize(hidden.float(), dim=-1, eps=_EPS) - F.normalize(base.float(), dim=-1, eps=_EPS)).norm(dim=-1)
    mask = attention_mask.to(apart.dtype)
    return weight * ((1 - apart).clamp_min(0) * mask).sum() / mask.sum().clamp_min(1)


# --------------------------------------------------------------------------- NoPeek


def _centred(distances: torch.Tensor) -> torch.Tensor:
    """Double-centred (n, n) distance matrix."""
    return distances - distances.mean(0, keepdim=True) - distances.mean(1, keepdim=True) + distances.mean()


def distance_correlation(x_distances: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation (Székely et al., 2007) between samples with pairwise distances
    ``x_distances`` (n, n) and the samples ``z`` (n, q); in [0, 1], 0 iff independent (as n grows).

    Differentiable w.r.t. ``z``.
    """
    squared = (z * z).sum(-1)  # (n,)
    z_distances = (squared[:, None] + squared[None, :] - 2 * z @ z.T).clamp_min(_EPS).sqrt()  # (n, n)
    a, b = _centred(x_distances), _centred(z_distances)
    dcov_xz, dvar_x, dvar_z = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return (dcov_xz.clamp_min(0) / (dvar_x * dvar_z).sqrt().clamp_min(_EPS)).sqrt()


def nopeek_loss(
    input_ids: torch.Tensor,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    weight: float,
    max_tokens: int = 512,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``weight * DCor(tokens, activations)`` over the real tokens of a batch, for the device's loss.

    ``input_ids`` (B, T), ``hidden`` (B, T, C) the activations the device sends (before
    :func:`defend`), ``attention_mask`` (B, T). The inputs use the discrete metric (distance 1
    between different token ids, 0 between equal ones). The term is O(n^2) in the tokens, so at most
    ``max_tokens`` real tokens are drawn (with ``generator``, on the CPU) when the batch has more.
    """
    valid = attention_mask.reshape(-1).bool()
    ids = input_ids.reshape(-1)[valid]  # (n,)
    z = hidden.reshape(-1, hidden.shape[-1])[valid]  # (n, C)
    if ids.numel() > max_tokens:
        pick = torch.randperm(ids.numel(), generator=generator)[:max_tokens].to(ids.device)
        ids, z = ids[pick], z[pick]
    if ids.numel() < 2:
        return hidden.sum() * 0.0
    x_distances = (ids[:, None] != ids[None, :]).to(z.dtype)  # (n, n)
    return weight * distance_correlation(x_distances, z.float())
