"""A variational information bottleneck at the cut (the MID defense), measured by the audit.

MID (Zou et al., "Mutual Information Regularization for Vertical Federated Learning", 2023; the defense of
VFLAIR-LLM) puts a variational information bottleneck between the device's last block and the wire: an
encoder maps the activation to the mean and spread of a Gaussian, a sample of it is decoded and sent, and the
device's loss gains ``weight`` x KL(N(mu, sigma) || N(0, 1)), an upper bound of the information the sample
carries about the activation. The randomness is drawn on the device, so the server cannot know it, and
training puts it where the task needs the activations least.

This one is diagonal, per coordinate c of the hidden vector (VFLAIR's are small MLPs):

    u = h / scale            the activation, in units of public text's per-coordinate RMS at the cut
    z = gate * u + sigma * e  e ~ N(0, 1), drawn afresh for every token
    sent = scale * gain * z

``gate``, ``log_sigma`` and ``gain`` (3 C numbers) train with the device's adapters. With the decoder's free
gain the KL term is, at its optimum, the Gaussian channel's information 0.5 log(1 + (gate u / sigma)^2) per
coordinate, so ``weight`` prices information, not scale. Its weights travel like the adapters': a server that
knows them (the plain job) whitens what it receives, ``(sent / (scale gain) - gate u) / sigma``, which makes the
nearest candidate the most likely one (:class:`~splitft.tools.audit.exact.Channel`).

It lives in the audit, not in the job settings: trained with the model at cut 2 of SmolLM2-135M, it put its
noise where the task needs the activations least, yet the coordinates it kept clear still told the tokens apart:
the exact search that knows its weights recovered 99-100% of them at every KL weight measured (BENCHMARKS.md, "Defenses
trained with the model"), so agents do not run it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from splitft.tools.audit.exact import Channel


class Bottleneck(nn.Module):
    """The diagonal Gaussian bottleneck of the activations at one cut, for a hidden size ``width``.

    ``scale``: the per-coordinate RMS of public activations at the cut (the median token norm / sqrt(width));
    ``weight``: the KL term's weight in the device's loss; ``sigma``: the spread it starts from (the gate and
    the gain start at 1, so it starts as the identity plus noise of ``sigma`` x the typical coordinate).
    """

    def __init__(self, width: int, scale: float, weight: float, sigma: float = 0.1) -> None:
        super().__init__()
        if not scale > 0 or not weight >= 0 or not sigma > 0:
            raise ValueError(f"bottleneck: scale and sigma must be > 0 and weight >= 0, got {scale}, {sigma}, {weight}")
        self.scale, self.weight = float(scale), float(weight)
        self.gate = nn.Parameter(torch.ones(width))
        self.log_sigma = nn.Parameter(torch.full((width,), math.log(sigma)))
        self.gain = nn.Parameter(torch.ones(width))

    def forward(
        self, hidden: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the device sends (B, T, C), the KL of every token (B, T), nats per coordinate)."""
        mu = hidden.float() / self.scale * self.gate
        sigma = self.log_sigma.exp()
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        sent = self.scale * self.gain * (mu + sigma * noise)
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - 1 - 2 * self.log_sigma).mean(-1)
        return sent.to(hidden.dtype), kl

    def loss(self, kl: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``weight`` x the mean KL over the real tokens."""
        mask = attention_mask.to(kl.dtype)
        return self.weight * (kl * mask).sum() / mask.sum().clamp_min(1)

    @torch.no_grad()
    def channel(self, clip: float | None) -> Channel:
        """What the server computes for a candidate activation (after the device's ``clip``), and the noise on it."""
        return Channel(
            clip, (self.gain * self.gate).detach().cpu(), (self.scale * self.gain * self.log_sigma.exp()).abs().cpu()
        )

    @torch.no_grad()
    def information(self, hidden: torch.Tensor) -> float:
        """The Gaussian channel's information about ``hidden`` (n, C), nats per token: sum_c 0.5 log(1 + snr_c^2)."""
        snr = hidden.float() / self.scale * self.gate / self.log_sigma.exp()
        return float((0.5 * torch.log1p(snr.pow(2))).sum(-1).mean())
