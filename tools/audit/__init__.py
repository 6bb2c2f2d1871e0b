"""The privacy audit: how much of a device's text the server can read back from what it receives.

The attacker is the server itself. It knows the frozen base model (public) and the client's LoRA
adapters (it aggregates them), so it can run the client segment on PUBLIC text (the vendored
WikiText-2 and E2E text) and train an inverse model from the activations at the cut to the tokens.
The audit reports that model's top-1 token recovery on held-out device-like data it never trained
on (GSM8K training prompts and answers), padding excluded, next to a frequency baseline (always
guessing the public text's most common token).

The inverse model (:class:`Inverter`) is an MLP over the activations of a token and ``window``
neighbours on each side, standardised, whose output is read out through the model's own token
embedding (the attacker knows it): logits = MLP(features) @ E^T + b, over the whole vocabulary, so
tokens absent from the public text can still be recovered. Against a defended device the attacker
trains on defended public activations (an adaptive attacker who knows the job's defense settings),
with fresh noise every batch.

The label audit covers the U-shaped split's top cut: the device holds the last ``k`` blocks, the
final norm and the head, receives the hidden states at ``L - k`` and sends back the gradient of its
loss w.r.t. them. The attacker trains on (hidden, gradient) pairs of public text to predict the
label (the next token) and is scored on the device's targets (GSM8K answers), next to an attacker
that sees the hidden state alone: it runs the tail itself (it knows its weights) and takes the
model's own top-1 next-token guess.

The stronger attacker is the exact search (:mod:`.exact`): the server runs the client segment on every
candidate for the next token after those it has recovered and keeps the nearest to what it received, the
distances whitened by the noise it knows the spread of; where the client adapters are private it runs the
public base instead, and matches directions as well as vectors (its copy may be off by a scale). Every
figure the audit reports is the best of the attackers, named.

Everything is seeded: the same settings give the same numbers on the same machine and thread count.

Modules: :mod:`.attack` (the attacker: settings, data, activations, the inverse model), :mod:`.exact` (the
exact search), :mod:`.measure` (the audits and their results), :mod:`.bottleneck` (the information bottleneck
measured as a defense), :mod:`.report` (audit.md, audit.json, audit.png), :mod:`.table` (the audited figures
``run`` prints), :mod:`.cli` (the ``splitft-coordinator audit`` command).
"""

from splitft.shared.model.calibration import PUBLIC_TEXTS
from splitft.tools.audit.attack import (
    DEVICE_DATA,
    AttackSettings,
    DefenseCase,
    Inverter,
    Progress,
    TokenBatch,
    adapter_ranks,
    attack_tokens,
    block_outputs,
    client_segment,
    device_examples,
    device_tokens,
    on_the_wire,
    public_tokens,
    recovery,
    train_attack,
)
from splitft.tools.audit.bottleneck import Bottleneck
from splitft.tools.audit.exact import Channel, SearchOutcome, exact_search, search_sequences
from splitft.tools.audit.measure import (
    AuditReport,
    CutResult,
    LabelResult,
    audit_inversion,
    audit_labels,
    evaluate_split,
    finetune_split,
    parse_cuts,
    run_audit,
)
from splitft.tools.audit.report import markdown, plot_recovery, write_report

__all__ = [
    "DEVICE_DATA", "PUBLIC_TEXTS", "AttackSettings", "AuditReport", "Bottleneck", "Channel", "CutResult", "DefenseCase", "Inverter",
    "LabelResult", "Progress", "SearchOutcome", "TokenBatch", "adapter_ranks", "attack_tokens", "audit_inversion",
    "audit_labels", "block_outputs", "client_segment", "device_examples", "device_tokens", "evaluate_split",
    "exact_search", "finetune_split", "markdown", "on_the_wire", "parse_cuts", "plot_recovery", "public_tokens",
    "recovery", "run_audit", "search_sequences", "train_attack", "write_report",
]  # fmt: skip
