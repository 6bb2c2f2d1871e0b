"""The coordinator's model: one whole PEFT model that is the server segment for every device,
the global adapters, the evaluator and the exporter.

How one server serves devices cut at different layers: the coordinator holds the whole model
(embeddings and all blocks; it is the GPU host) with one LoRA copy per block. A device cut at
``c`` sends the activations entering block ``c``; the server runs blocks ``c..L-1`` and the head on
them (``Segment.forward(..., start=c)``) and accumulates the LoRA gradients. The server takes **one optimiser step per global step**, after the activations of every
device for that step are in: so its update does not depend on the order the devices arrive in.

Normalisation, so that federated split SGD equals centralised SGD on the union batch:

* a device's loss is the mean over its own target tokens ``N_i``; the server sends it
  ``d(sum CE_i)/dh / N_i``;
* the server's copy of block ``j`` trained on the tokens of the devices cut at or below ``j``; its
  gradient is the sum over those devices divided by their tokens ``N_j = sum_{c_i <= j} N_i`` (a
  mean over the data it saw, like a device's);
* at aggregation, block ``j`` is averaged over its holders weighted by tokens: the devices cut above
  ``j`` (weight ``N_i``) and the server (weight ``N_j``).

One path, merged passes: :meth:`ServerModel.train_batch` (two-part) takes the batches of a step that are in
(one arrival, or with ``server_batching`` every device's), pads them to the longest and runs them ordered by
cut: the devices cut shallowest go first, and the others join the merged batch at their own cut ("run to the
deepest cut, then merge"). The head and the loss are computed device by device (they act per token: merging
gains nothing there), then one backward pass runs through the merged blocks. In the U split,
:meth:`ServerModel.forward_batch` does the same up to each device's tail, where its rows leave the merged
batch, and :meth:`ServerModel.backward_batch` takes the tail gradients in one backward pass. Merged, the
results equal those of passes of one to floating-point rounding (tests/test_batching.py);
``server_max_batch_tokens`` bounds one pass.

The U split (``split = "u"``): a device cut at ``c`` with a tail of ``k`` blocks holds blocks
``0..c-1`` and ``L-k..L-1`` and the head; the server runs ``c..L-k-1``, sends the activations at ``L-k``
down, takes the device's gradient there and finishes its backward pass. The server never sees a label, so nor a target count:
a device's weight ``N_i`` is the real tokens of its rows (the lengths that travel as the attention
mask), and the device's gradient (of its mean loss) is scaled by it. The same aggregation rules then
make federated U-split SGD equal centralised SGD on the union objective ``sum_i N_i L_i / sum_i N_i``,
``L_i`` a device's mean loss over its own targets.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from splitft.coordinator.controller import ServerEstimate
from splitft.coordinator.layout import global_ranks
from splitft.shared.job.config import JobConfig
from splitft.shared.model.aggregation import Contribution, aggregate, convert_state, module_key
from splitft.shared.model.loading import is_preset, load_config, num_layers
from splitft.shared.model.lora import block_of, load_lora_state, lora_state
from splitft.shared.model.loss import IGNORE_INDEX, EvalResult, evaluate_lm
from splitft.shared.model.precision import torch_dtype
from splitft.shared.model.split import Segment, SegmentSpec, build_segment
from splitft.shared.wire.messages import Activations

log = logging.getLogger(__name__)


#: sums a step's flat gradient tensor and its counts over every coordinator worker, in place
Reduce = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass
class MiddleStep:
    """U split: the server's forward pass for one device batch, kept until the device's tail gradient comes."""

    cut: int
    tail_start: int
    hidden: torch.Tensor  # (B, T, C) the device's activations at the cut, requiring grad
    top: torch.Tensor  # (B, T, C) the activations entering the device's tail, with their graph
    tokens: int  # the batch's real tokens: its weight
    merged: int = -1  # server_batching: the merged pass it was in (its graph is shared with that pass's others)


@dataclass(frozen=True)
class BatchItem:
    """One device's batch of a step, for :meth:`ServerModel.train_batch`."""

    agent: str
    cut: int
    act: Activations
    tail_start: int = 0  # U split: the block its tail starts at (the server's blocks end there); 0: two-part


def _passes(items: Sequence[BatchItem], max_tokens: int) -> list[list[BatchItem]]:
    """Consecutive runs of ``items`` whose rows x longest length stay within ``max_tokens`` (one item at least)."""
    passes: list[list[BatchItem]] = []
    rows = width = 0
    for item in items:
        b, t = item.act.hidden.shape[:2]
        if passes and (max_tokens <= 0 or (rows + b) * max(width, t) <= max_tokens):
            passes[-1].append(item)
            rows, width = rows + b, max(width, t)
        else:
            passes.append([item])
            rows, width = b, t
    return passes


@dataclass(frozen=True)
class StepResult:
    grad: torch.Tensor  # (B, T, C): d(mean loss of this batch) / d(activations), on the CPU
    loss: float  # mean cross-entropy over the batch's target tokens
    tokens: int  # target tokens in the batch
    accuracy: float  # next-token accuracy over the batch's target tokens


class ServerModel:
    """The whole model with the global adapters; the server segment of every device."""

    def __init__(self, job: JobConfig, cuts: Sequence[int | Sequence[int]], device: str | torch.device = "cpu") -> None:
        self.job = job
        self.device = torch.device(device)
        config = load_config(job.model, job.attn_implementation)
        self.num_layers = num_layers(config)
        self.hidden_size = int(config.hidden_size)
        self.vocab_size = int(config.vocab_size)
        self.ranks = global_ranks(self.num_layers, cuts, job.lora)
        self.segment: Segment = build_segment(
            job.model,
            SegmentSpec.whole(self.num_layers),
            lora=job.lora,
            ranks=self.ranks,
            lora_seed=job.seed,
            device=self.device,
            dtype=torch_dtype(job.base_dtype),
            attn_implementation=job.attn_implementation,
        )
        self.params = self.segment.lora_parameters()
        self.optimizer = job.optimizer.build(self.params.values())
        self._blocks = {name: block_of(name) for name in self.params}
        self._step_tokens: Counter[int] = Counter()  # block -> tokens it served this step
        # agent -> its LoRA gradients this step, summed in agent order at the step's end: the step does not
        # depend on the order the devices' batches arrived in (floating-point sums are not associative)
        self._step_grads: dict[str, dict[str, torch.Tensor]] = {}
        self.round_tokens: Counter[int] = Counter()  # block -> tokens it served this round
        self.passes: Counter[str] = (
            Counter()
        )  # the steps' merged passes so far ("passes") and their batches ("devices")

    # ------------------------------------------------------------------ adapters

    def module_ranks(self) -> dict[str, int]:
        return {module_key(n): self.ranks[self._blocks[n]] for n in self.params if ".lora_A." in n}

    def client_state(self, ranks: Mapping[int, int]) -> dict[str, torch.Tensor]:
        """The global adapters of the blocks a device holds (the keys of ``ranks``), at the device's ranks."""
        state = {n: t for n, t in lora_state(self.segment.peft_model).items() if self._blocks[n] in ranks}
        wanted = {module_key(n): ranks[self._blocks[n]] for n in state if ".lora_A." in n}
        return {n: t.cpu() for n, t in convert_state(state, wanted, seed=self.job.seed).items()}

    def aggregate(self, uploads: Sequence[tuple[float, Mapping[str, torch.Tensor]]]) -> None:
        """Token-weighted average of every block over its holders: the devices and the server's copy.

        ``uploads`` holds (tokens, client adapters) per device that finished the round.
        """
        contributions = [Contribution(weight, state) for weight, state in uploads if weight > 0]
        server_state = lora_state(self.segment.peft_model)
        for block, tokens in sorted(self.round_tokens.items()):
            held = {n: t for n, t in server_state.items() if self._blocks[n] == block}
            contributions.append(Contribution(float(tokens), held))
        if contributions:
            merged = aggregate(contributions, self.module_ranks(), seed=self.job.seed)
            load_lora_state(self.segment.peft_model, {n: t.to(self.device) for n, t in merged.items()}, strict=False)
        self.round_tokens.clear()

    # ------------------------------------------------------------------ training

    def _stash(self, agent: str) -> None:
        """Move the gradients of the backward pass just done into ``agent``'s share of the step."""
        grads = self._step_grads.setdefault(agent, {})
        for name, p in self.params.items():
            if p.grad is not None:
                grads[name] = grads[name] + p.grad if name in grads else p.grad
                p.grad = None

    def train_on(self, cut: int, act: Activations, agent: str = "") -> StepResult:
        """Forward and backward one device's batch from block ``cut`` (a merged pass of one); its gradients join
        ``agent``'s share of the step."""
        return self._train_merged([BatchItem(agent, cut, act)])[agent]

    def train_batch(self, items: Sequence[BatchItem], max_tokens: int = 0) -> dict[str, StepResult]:
        """Two-part: several devices' batches of one step in as few forward/backward passes as they fit in,
        each device's result as a pass of its own would give it (to floating-point rounding).

        The batches are padded to the longest (right padding, masked: a row's real positions see the same
        keys and positions as alone) and ordered by cut. The devices cut shallowest run alone up to the
        next cut, where the next devices' batches join them, and so on: every block runs once on every
        row that passes through it. ``max_tokens`` (rows x padded length, 0: no bound) caps one pass; the
        devices beyond it go in another. One pass's LoRA gradients are one share of the step, stashed
        under the names of its devices (so the step is the same whatever order they arrived in).
        """
        results: dict[str, StepResult] = {}
        for chunk in _passes(sorted(items, key=lambda i: (i.cut, i.agent)), max_tokens):
            self.passes.update(passes=1, devices=len(chunk))
            results.update(self._train_merged(chunk))
        return results

    def _train_merged(self, items: Sequence[BatchItem]) -> dict[str, StepResult]:
        """One merged pass of ``items``, given in the order of their cuts (their rows' order in the batch)."""
        self.segment.train()
        leaves, padded, masks, width = self._padded(items)
        labels = []
        for item in items:
            if item.act.labels is None:
                raise ValueError("a two-part step needs the batch's labels")
            pad = width - item.act.hidden.shape[1]
            labels.append(torch.nn.functional.pad(item.act.labels, (0, pad), value=IGNORE_INDEX).to(self.device))
        cuts = sorted({item.cut for item in items})
        hidden: torch.Tensor | None = None
        joined = 0  # items in the merged batch so far
        for k, cut in enumerate(cuts):
            group = [i for i, item in enumerate(items) if item.cut == cut]
            hidden = torch.cat(([hidden] if hidden is not None else []) + [padded[i] for i in group])
            joined += len(group)
            stop = cuts[k + 1] if k + 1 < len(cuts) else self.num_layers
            mask = torch.cat(masks[:joined])
            hidden = self.segment(hidden, mask, start=cut, stop=stop, with_head=False)  # (R, T, C)
        assert hidden is not None
        # The head and the loss device by device, on the merged blocks' output cut off from their graph: the
        # head is per token (merging gains nothing there), and one device's logits (targets x vocabulary)
        # are freed before the next's are made. Then one backward pass through the merged blocks.
        top = hidden.detach().requires_grad_()  # (R, T, C)
        heads = []
        first = 0
        for target_rows in labels:
            rows = slice(first, first + target_rows.shape[0])
            first = rows.stop
            head = self.segment.head_loss(top[rows], target_rows)
            head.loss_sum.backward()  # into top.grad (a zero loss without targets: zeros)
            heads.append(head)
        assert top.grad is not None
        hidden.backward(top.grad)
        self._stash(",".join(item.agent for item in items))
        results = {}
        for item, leaf, head in zip(items, leaves, heads, strict=True):
            tokens = head.tokens
            for block in range(item.cut, self.num_layers):
                self._step_tokens[block] += tokens
            assert leaf.grad is not None
            loss = float(head.loss_sum.detach())
            results[item.agent] = StepResult(
                (leaf.grad / max(tokens, 1)).cpu(), loss / max(tokens, 1), tokens, head.correct / max(tokens, 1)
            )
        return results

    def _padded(
        self, items: Sequence[BatchItem]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], int]:
        """A merged pass's inputs: each batch's activations as a leaf of our own (B_i, T_i, C), the same padded
        on the right to the longest (B_i, T, C), its attention mask so padded (B_i, T), and T."""
        width = max(item.act.hidden.shape[1] for item in items)
        leaves = [item.act.hidden.detach().to(self.device).requires_grad_() for item in items]
        padded = [torch.nn.functional.pad(h, (0, 0, 0, width - h.shape[1])) for h in leaves]
        masks = [
            torch.nn.functional.pad(item.act.attention_mask, (0, width - item.act.hidden.shape[1])).to(self.device)
            for item in items
        ]
        return leaves, padded, masks, width

    def forward_middle(self, cut: int, tail_start: int, act: Activations, agent: str = "") -> MiddleStep:
        """U split: run one device's batch through blocks ``cut..tail_start-1`` (a merged pass of one); the graph is
        kept for :meth:`backward_middle`."""
        return self._forward_merged([BatchItem(agent, cut, act, tail_start)], 0)[agent]

    def backward_middle(self, step: MiddleStep, tail_grad: torch.Tensor, agent: str = "") -> torch.Tensor:
        """U split: the device's d(mean loss)/d(top) in, d(mean loss)/d(activations at the cut) out (see
        :meth:`backward_batch`)."""
        return self.backward_batch({agent: step}, {agent: tail_grad})[agent]

    def forward_batch(self, items: Sequence[BatchItem], max_tokens: int = 0) -> dict[str, MiddleStep]:
        """U split: several devices' batches of one step through the server's blocks in as few passes as fit,
        each device's :class:`MiddleStep` as a pass of its own would give it (to floating-point rounding).

        As :meth:`train_batch`: padded to the longest, ordered by cut; a device's rows join the merged batch
        at its cut and leave it where its tail starts. The graphs are kept for :meth:`backward_batch`."""
        steps: dict[str, MiddleStep] = {}
        ordered = sorted(items, key=lambda i: (i.cut, i.tail_start, i.agent))
        for index, chunk in enumerate(_passes(ordered, max_tokens)):
            self.passes.update(passes=1, devices=len(chunk))
            steps.update(self._forward_merged(chunk, index))
        return steps

    def _forward_merged(self, items: Sequence[BatchItem], index: int) -> dict[str, MiddleStep]:
        self.segment.train()
        leaves, padded, masks, _ = self._padded(items)
        bounds = sorted({item.cut for item in items} | {item.tail_start for item in items})
        steps: dict[str, MiddleStep] = {}
        rows: list[int] = []  # the items in the merged batch, in the order of its rows
        hidden: torch.Tensor | None = None

        def leave(at: int) -> None:  # the rows of the devices whose tail starts at ``at`` leave the batch
            nonlocal hidden, rows
            assert hidden is not None
            kept, parts, first = [], [], 0
            for i in rows:
                item, b = items[i], items[i].act.hidden.shape[0]
                part = hidden[first : first + b]  # (B_i, T, C)
                first += b
                if item.tail_start == at:
                    top = part[:, : item.act.hidden.shape[1]]  # (B_i, T_i, C)
                    tokens = int(item.act.lengths.sum())
                    steps[item.agent] = MiddleStep(item.cut, item.tail_start, leaves[i], top, tokens, index)
                else:
                    kept.append(i)
                    parts.append(part)
            rows, hidden = kept, torch.cat(parts) if parts else None

        for k, start in enumerate(bounds[:-1]):
            if hidden is not None:
                leave(start)
            joining = [i for i, item in enumerate(items) if item.cut == start]
            if hidden is None and not joining:
                continue  # no device between these bounds (the ones before left, the next join later)
            hidden = torch.cat(([hidden] if hidden is not None else []) + [padded[i] for i in joining])
            rows += joining
            mask = torch.cat([masks[i] for i in rows])
            hidden = self.segment(hidden, mask, start=start, stop=bounds[k + 1], with_head=False)  # (R, T, C)
        leave(bounds[-1])
        return steps

    def backward_batch(
        self, steps: Mapping[str, MiddleStep], tail_grads: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """U split: the backward passes of :meth:`forward_batch`'s passes, one each, from the tail gradients of the
        devices in ``tail_grads`` (a device without one, dropped since, adds nothing); each device's gradient at
        its cut. The server's LoRA gradients accumulate ``tokens x`` the device's, so that :meth:`finish_step`'s
        division by the step's tokens makes them the token-weighted mean over devices."""
        passes: dict[int, list[str]] = {}
        for name in sorted(tail_grads):
            passes.setdefault(steps[name].merged, []).append(name)
        grads: dict[str, torch.Tensor] = {}
        for _, names in sorted(passes.items()):
            tops = [steps[n].top for n in names]
            torch.autograd.backward(tops, [tail_grads[n].to(steps[n].top) * steps[n].tokens for n in names])
            self._stash(",".join(names))
            for name in names:
                step = steps[name]
                for block in range(step.cut, step.tail_start):
                    self._step_tokens[block] += step.tokens
                assert step.hidden.grad is not None
                grads[name] = (step.hidden.grad / max(step.tokens, 1)).cpu()
        return grads

    def calibrate(self, batch: int, length: int, c_min: int) -> ServerEstimate:
        """Time one device batch from the shallowest and from the deepest cut: per-block and head cost.

        The gradients are thrown away; the adapters do not change.
        """
        times = {}
        gen = torch.Generator().manual_seed(0)
        deepest = self.num_layers - 1
        for cut in (c_min, deepest, c_min, deepest):  # the first pass of each warms up
            hidden = torch.randn(batch, length, self.hidden_size, generator=gen)
            labels = torch.randint(0, self.vocab_size, (batch, length), generator=gen)
            start = time.perf_counter()
            self.train_on(cut, Activations(hidden, labels, torch.full((batch,), length), {}))
            times[cut] = time.perf_counter() - start
        self.discard_step()
        block = max((times[c_min] - times[deepest]) / max(deepest - c_min, 1), 1e-6)
        return ServerEstimate(block_s=block, head_s=max(times[deepest] - block, 0.0))

    def finish_step(self, reduce: Reduce | None = None) -> None:
        """One optimiser step of the server's copy, each block's gradient a mean over its tokens; the devices'
        shares are summed in the order of their names, whatever order they arrived in.

        ``reduce`` (several coordinator workers, :mod:`~splitft.coordinator.workers`): sums, in place and over
        every worker, the step's gradients (one flat tensor of every LoRA weight's, zeros where it has none)
        and counts (the tokens of every block, then one per weight that has a gradient); every worker then
        takes the same step."""
        with torch.no_grad():
            totals = self._step_totals()
            if reduce is not None:
                totals = self._reduce(totals, reduce)
            for name, p in self.params.items():
                total = totals[name]
                if total is None:
                    continue
                tokens = self._step_tokens.get(self._blocks[name], 0)
                if tokens > 0:
                    total /= tokens
                p.grad = total
        self._step_grads.clear()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.round_tokens.update(self._step_tokens)
        self._step_tokens.clear()

    def _reduce(self, totals: dict[str, torch.Tensor | None], reduce: Reduce) -> dict[str, torch.Tensor | None]:
        """The step's gradients and block tokens summed over the workers (see :meth:`finish_step`)."""
        names = list(self.params)
        flat = torch.cat(
            [(t if (t := totals[n]) is not None else torch.zeros_like(self.params[n])).reshape(-1) for n in names]
        )
        counts = torch.tensor(
            [self._step_tokens.get(b, 0) for b in range(self.num_layers)] + [int(totals[n] is not None) for n in names],
            dtype=torch.int64,
        )
        reduce(flat, counts)
        tokens, present = counts[: self.num_layers].tolist(), counts[self.num_layers :].tolist()
        self._step_tokens = Counter({b: t for b, t in enumerate(tokens) if t})
        reduced: dict[str, torch.Tensor | None] = {}
        first = 0
        for name, has in zip(names, present, strict=True):
            p = self.params[name]
            reduced[name] = flat[first : first + p.numel()].view_as(p) if has else None
            first += p.numel()
        return reduced

    def _step_totals(self) -> dict[str, torch.Tensor | None]:
        """Every LoRA weight's gradient summed over the step's shares in the order of their names (None: no
        share has one). The first share's tensor is summed into, not copied (it was moved out of p.grad)."""
        shares = [grads for _, grads in sorted(self._step_grads.items())]
        totals: dict[str, torch.Tensor | None] = {}
        for name in self.params:
            parts = [grads[name] for grads in shares if name in grads]
            if not parts:
                totals[name] = None
                continue
            total = parts[0]
            for part in parts[1:]:
                total += part
            totals[name] = total
        return totals

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A copy of the global adapters and the optimiser state, to roll a failed round back to."""
        adapters = {n: t.detach().clone() for n, t in lora_state(self.segment.peft_model).items()}
        return adapters, copy.deepcopy(self.optimizer.state_dict())

    def restore(self, snapshot: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> None:
        adapters, optimizer = snapshot
        self.discard_step()
        self.round_tokens.clear()
        load_lora_state(self.segment.peft_model, adapters)
        self.optimizer.load_state_dict(copy.deepcopy(optimizer))

    def discard_step(self) -> None:
        """Drop the gradients of an unfinished step (e.g. the coordinator is stopping)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._step_tokens.clear()
        self._step_grads.clear()

    # ------------------------------------------------------------------ evaluation and export

    def evaluate(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> EvalResult:
        """Loss, perplexity and next-token accuracy of the whole model with the global adapters."""
        self.segment.eval()
        return evaluate_lm(self.segment.target_loss, batches, self.device)

    def export(self, folder: Path) -> Path:
        """Write a standard PEFT adapter folder (``PeftModel.from_pretrained(base, folder)`` loads it)."""
        peft_model = self.segment.peft_model
        # A folder by its absolute path, so that AutoPeftModelForCausalLM finds it from any directory; a preset
        # by its name.
        model = self.job.model
        base = model if is_preset(model) else str(Path(model).resolve())
        peft_model.peft_config["default"].base_model_name_or_path = base
        # save_embedding_layers=False: PEFT would otherwise look the base model up on the hub.
        peft_model.save_pretrained(str(folder), save_embedding_layers=False)
        log.info("exported the adapter to %s", folder)
        return folder
