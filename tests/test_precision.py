"""Base dtypes and the chunked head: fp32 stays exact, bf16 and fp16 stay within stated tolerances."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from splitft.shared.errors import ConfigError
from splitft.shared.model.loading import load_config, num_layers
from splitft.shared.model.loss import evaluate_lm, labels_from, linear_cross_entropy, logits_loss
from splitft.shared.model.precision import torch_dtype
from splitft.shared.model.split import SegmentSpec, build_segment, load_base_model

# bf16 keeps 8 bits of mantissa, fp16 11: relative error of a step's mean loss and of its LoRA gradients
# (as a vector) against fp32, on the tiny presets, with every LoRA weight non-zero.
TOLERANCE = {torch.bfloat16: (2e-3, 5e-2), torch.float16: (2e-4, 1e-2)}


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_head_equals_the_whole_logits(bias: bool) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(48, 700, bias=bias).requires_grad_(False)
    x = torch.randn(301, 48, requires_grad=True)
    targets = torch.randint(0, 700, (301,))
    logits = head(x)
    ref = F.cross_entropy(logits.float(), targets, reduction="sum")
    ref.backward()
    assert x.grad is not None
    want_grad, x.grad = x.grad.clone(), None
    loss, correct = linear_cross_entropy(x, head, targets, rows=37)  # 9 chunks, the last one short
    loss.backward()
    assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-6), (float(loss), float(ref))
    assert torch.allclose(x.grad, want_grad, rtol=1e-6, atol=1e-6)
    assert correct == int((logits.argmax(-1) == targets).sum())
    with torch.no_grad():  # evaluation: no gradient computed or kept
        again, _ = linear_cross_entropy(x, head, targets, rows=37)
    assert not again.requires_grad and torch.allclose(again, ref, rtol=1e-6)


def test_chunked_head_refuses_a_trainable_head() -> None:
    head = torch.nn.Linear(8, 10)
    with pytest.raises(ValueError, match="freeze"):
        linear_cross_entropy(torch.randn(3, 8), head, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_segment_loss_and_evaluation_equal_the_full_logits(model: str) -> None:
    layers = num_layers(load_config(model))
    segment = build_segment(model, SegmentSpec.whole(layers), lora_seed=1)
    ids = torch.randint(0, 1000, (3, 40))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    labels = labels_from(ids, mask)
    labels[:, :10] = -100  # a prompt
    chunked = segment.target_loss(ids, mask, labels)
    full = logits_loss(segment(ids, mask), labels)
    assert chunked.tokens == full.tokens and chunked.correct == full.correct
    assert torch.allclose(chunked.loss_sum, full.loss_sum, rtol=1e-6)
    batches = [(ids, labels, mask.sum(1))]
    a = evaluate_lm(segment.target_loss, batches)
    b = evaluate_lm(lambda i, m, y: logits_loss(segment(i, m), y), batches)
    assert a.tokens == b.tokens and a.accuracy == b.accuracy and abs(a.loss - b.loss) < 1e-6


def _loss_and_grads(model: str, dtype: torch.dtype) -> tuple[float, torch.Tensor, set[torch.dtype], set[torch.dtype]]:
    layers = num_layers(load_config(model))
    segment = build_segment(model, SegmentSpec.whole(layers), lora_seed=3, dtype=dtype)
    gen = torch.Generator().manual_seed(5)
    for p in segment.lora_parameters().values():  # LoRA B starts at zero: make every adapter matter
        p.data = torch.randn(p.shape, generator=gen) * 0.02
    ids = torch.randint(0, 1000, (2, 48), generator=gen)
    mask = torch.ones_like(ids)
    result = segment.target_loss(ids, mask, labels_from(ids, mask))
    (result.loss_sum / result.tokens).backward()
    lora = segment.lora_parameters()
    grads = torch.cat([p.grad.flatten() for p in lora.values() if p.grad is not None])
    frozen = {p.dtype for p in segment.parameters() if not p.requires_grad}
    return float(result.loss_sum.detach()) / result.tokens, grads, {p.dtype for p in lora.values()}, frozen


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bases_stay_close_to_fp32(model: str, dtype: torch.dtype) -> None:
    loss32, grad32, _, _ = _loss_and_grads(model, torch.float32)
    loss, grad, lora_dtypes, frozen_dtypes = _loss_and_grads(model, dtype)
    assert lora_dtypes == {torch.float32} and frozen_dtypes == {dtype}  # adapters fp32, the base in dtype
    loss_tol, grad_tol = TOLERANCE[dtype]
    assert abs(loss - loss32) / loss32 < loss_tol, (loss, loss32)
    assert float((grad - grad32).norm() / grad32.norm()) < grad_tol


def test_a_folder_loads_straight_to_the_asked_dtype(tmp_path: Path) -> None:
    load_base_model("tiny-llama").save_pretrained(tmp_path / "model")  # an fp32 checkpoint
    segment = build_segment(tmp_path / "model", SegmentSpec.client(2), dtype=torch.float16)
    model = segment.hf_model
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float16}
    # Buffers that are not weights (the rotary frequencies) stay fp32, as Hugging Face keeps them.
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if "inv_freq" in n)
    assert any("inv_freq" in n for n, _ in model.named_buffers())
    ids = torch.randint(0, 1000, (2, 16))
    assert segment(ids, torch.ones_like(ids)).dtype == torch.float16


def test_unknown_dtypes_are_refused() -> None:
    with pytest.raises(ConfigError, match="base_dtype must be one of fp32, bf16, fp16"):
        torch_dtype("fp8")
