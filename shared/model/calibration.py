"""The clip of the activations at the cut, calibrated per cut on public text.

A clip bounds every token's hidden vector and gives the noise its scale (``defense.py``); a good bound
depends on the model and on the depth of the cut. With ``clip_quantile`` set, the coordinator computes it
for each cut an assignment uses: that quantile of the token norms of public text (the vendored
WikiText-2 and E2E text, the same for every job) at the cut, with the base weights, and sends the value
in the assignment's defense settings. The value is known to the server, as the job's settings are: what
the defense hides is in the noise, not in the clip.
"""

from __future__ import annotations

import functools
import gzip
import math
from pathlib import Path
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from splitft.shared.model.split import SegmentSpec, build_segment
from splitft.shared.model.tokenizer import DATASETS, load_tokenizer

PUBLIC_TEXTS = (DATASETS / "wikitext-2" / "test.txt.gz", DATASETS / "e2e" / "valid.txt.gz")
#: public tokens the clip is calibrated on
CALIBRATION_TOKENS = 4096


def public_text_ids(tokenizer: PreTrainedTokenizerBase, tokens: int, seq_len: int) -> torch.Tensor:
    """About ``tokens`` tokens of public text in windows of ``seq_len`` (N, seq_len): half WikiText-2, half E2E."""
    eos = int(tokenizer.eos_token_id)
    windows = []
    for path in PUBLIC_TEXTS:
        want = math.ceil(tokens / len(PUBLIC_TEXTS) / seq_len) * seq_len
        stream: list[int] = []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                text = line.split("||", 1)[-1].strip()  # E2E lines are "meaning representation||text"
                if text and not text.startswith("="):  # WikiText headings are "= = Title = ="
                    stream += [*tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], eos]
                if len(stream) >= want:
                    break
        windows.append(torch.tensor(stream[:want], dtype=torch.int64).view(-1, seq_len))
    return torch.cat(windows)


@functools.lru_cache(maxsize=16)
def public_clips(source: str | Path, cuts: tuple[int, ...], quantile: float) -> dict[int, float]:
    """The ``quantile`` of the token norms at each cut of ``cuts`` (the client segment's output, base weights)
    over :data:`CALIBRATION_TOKENS` tokens of public text, in one pass; the same figures on every machine."""
    ids = public_text_ids(load_tokenizer(source), CALIBRATION_TOKENS, 64)
    segment = build_segment(source, SegmentSpec.client(max(cuts)))
    segment.eval()
    layers = cast(nn.ModuleList, segment.hf_model.get_submodule(segment.family.layers))
    norms: dict[int, list[torch.Tensor]] = {c: [] for c in cuts}
    hooks = [
        layers[c - 1].register_forward_hook(
            lambda _m, _i, out, c=c: norms[c].append(out.float().norm(dim=-1).flatten())
        )
        for c in cuts
    ]
    try:
        with torch.no_grad():
            for start in range(0, len(ids), 16):
                batch = ids[start : start + 16]
                segment(batch, torch.ones_like(batch))
    finally:
        for hook in hooks:
            hook.remove()
    return {c: float(torch.quantile(torch.cat(norms[c]), quantile)) for c in cuts}
