#!/usr/bin/env python3
"""The privacy benchmark: how much of a device's text the server can read back, and what defenses cost.

On the study's pretrained base (a random-weight preset says little about real inversion):

(a) token recovery from the activations at every cut 1..L-1, no defense, base adapters;
(b) the same with the defenses on at a few cuts: a per-token clip at the median token norm (of
    public activations at that cut) alone and with Gaussian noise of relative norm 0.25 ... 8;
(c) what each defense costs: LoRA fine-tuning through the split (client -> defend -> server) at one
    cut, the same steps and batches for every setting (noise 1 / 2 / 4 with the clip, NoPeek at two
    weights: it acts through the trained adapters), eval perplexity on GSM8K test with the defense
    on, against no defense; every setting's trained adapters are attacked at that cut;
(d) label leakage of the U-shaped split for device tails k = 0, 1, 2.

    python scripts/pretrain_base.py --family gpt2            # the base, once (cached)
    python scripts/bench_privacy.py                          # ~20 minutes on 2 cores; prints the tables
    python scripts/bench_privacy.py --write BENCHMARKS.md    # and replace the privacy section there
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from splitft.bench.sections import cpu_name, write_section
from splitft.shared.job.data import tokenize
from splitft.shared.job.records import load_records
from splitft.shared.model.defense import DefenseSettings
from splitft.shared.model.loading import hidden_size, load_config, num_layers
from splitft.shared.model.lora import LoraSettings, lora_state
from splitft.shared.model.tokenizer import GSM8K, load_tokenizer
from splitft.tools import pretrain as pretrain_base
from splitft.tools.audit import (
    AttackSettings,
    AuditReport,
    CutResult,
    DefenseCase,
    audit_inversion,
    audit_labels,
    block_outputs,
    client_segment,
    device_examples,
    evaluate_split,
    finetune_split,
    markdown,
    plot_recovery,
    public_tokens,
)

NOISES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # (b): attacked at every defense cut
COST_NOISES = (1.0, 2.0, 4.0)  # (c): fine-tuned too (a fine-tuning step is ~2.5 s on 2 cores: few settings)
NOPEEKS = (0.5, 3.0)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def default_base() -> Path:
    settings, _ = pretrain_base.parse_args(["--family", "gpt2"])
    return pretrain_base.default_output(settings)


def median_norm(model: str, cut: int, settings: AttackSettings) -> float:
    """The median token norm of public activations at ``cut`` (base adapters): the clip a device would set."""
    public = public_tokens(load_tokenizer(model), settings.public_tokens, settings.seq_len)
    hidden = block_outputs(client_segment(model, cut), public, [cut])[cut]
    return float(hidden.norm(dim=-1).median())


def costs(model: str, args: argparse.Namespace, settings: AttackSettings, clip: float) -> list[dict[str, Any]]:
    """(c): fine-tune with each defense at ``args.ft_cut``; perplexity with the defense on; attack its adapters."""
    tokenizer = load_tokenizer(model)
    train = device_examples(tokenizer, args.ft_steps * args.ft_batch * args.ft_length, args.ft_length)
    test = tokenize(load_records(GSM8K / "test.jsonl", limit=args.eval_problems), tokenizer, args.ft_length)
    lora = LoraSettings(r=args.rank, r_cut=args.rank)
    defenses = [("none", DefenseSettings())]
    defenses += [(f"clip + noise {n:g}", DefenseSettings(noise=n, clip=clip)) for n in COST_NOISES]
    defenses += [(f"nopeek {w:g}", DefenseSettings(nopeek=w)) for w in NOPEEKS]
    rows = []
    for name, defense in defenses:
        start = time.perf_counter()
        client, server = finetune_split(
            model, args.ft_cut, defense, train, steps=args.ft_steps, batch_size=args.ft_batch, lr=args.ft_lr,
            lora=lora, seed=args.seed, progress=say,
        )  # fmt: skip
        result = evaluate_split(client, server, defense, test, int(tokenizer.pad_token_id))
        case = DefenseCase(f"{name} (fine-tuned)", defense, adapters=lora_state(client.peft_model))
        (attack,) = audit_inversion(model, [args.ft_cut], [case], settings, say)
        rows.append({
            "defense": name, "settings": dataclasses.asdict(defense), "eval_loss": result.loss,
            "eval_ppl": result.perplexity, "eval_acc": result.accuracy, "eval_tokens": result.tokens,
            "recovery": attack.recovery, "baseline": attack.baseline, "seconds": time.perf_counter() - start,
        })  # fmt: skip
        say(f"(c) {name}: eval ppl {result.perplexity:.2f}, recovery at cut {args.ft_cut} {attack.recovery:.1%}")
    return rows


def cost_table(rows: list[dict[str, Any]], cut: int) -> str:
    ref = rows[0]["eval_ppl"]
    lines = [
        f"| defense (fine-tuned at cut {cut}) | token recovery at cut {cut} | eval ppl | ppl vs none | next-token acc |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['defense']} | {r['recovery']:.1%} | {r['eval_ppl']:.2f} | {r['eval_ppl'] / ref - 1:+.1%} | "
            f"{r['eval_acc']:.3f} |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]]) -> str:
    ref = rows[0]["eval_ppl"]
    good = [r["defense"] for r in rows[1:] if r["recovery"] < 0.10 and r["eval_ppl"] / ref - 1 < 0.05]
    if good:
        return f"Settings with recovery under 10% at a perplexity cost under 5%: {', '.join(good)}."
    return "No setting measured here gets token recovery under 10% at a perplexity cost under 5%."


def plot_costs(rows: list[dict[str, Any]], cut: int, path: Path) -> None:
    """Each fine-tuned setting: token recovery at the cut against the perplexity cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = rows[0]["eval_ppl"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(100 * (r["eval_ppl"] / ref - 1), 100 * r["recovery"])
        ax.annotate(r["defense"], (100 * (r["eval_ppl"] / ref - 1), 100 * r["recovery"]), fontsize=7)
    ax.axhline(10, color="grey", ls=":")
    ax.axvline(5, color="grey", ls=":")
    ax.set(xlabel="eval perplexity vs no defense (%)", ylabel=f"token recovery at cut {cut} (%)", ylim=(0, 102))
    ax.set_title("What each defense buys and costs (fine-tuned adapters)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def findings(results: dict[str, Any]) -> str:
    """What the numbers say, read off them (nothing here is typed in by hand)."""
    plain = sorted((r for r in results["inversion"] if r["defense"] == "none"), key=lambda r: r["cut"])
    below = [r["cut"] for r in plain if r["recovery"] < 0.10]
    lines = [
        f"- Without a defense the server reads back {plain[0]['recovery']:.0%} of the device's tokens at cut 1, "
        f"{plain[len(plain) // 2]['recovery']:.0%} at cut {plain[len(plain) // 2]['cut']} and "
        f"{plain[-1]['recovery']:.0%} at cut {plain[-1]['cut']}; "
        + (f"recovery is under 10% from cut {below[0]} on." if below else "no cut brings it under 10%.")
    ]
    lines.append(
        f"- Only {plain[0]['coverage']:.0%} of the device's tokens occur anywhere in the attacker's "
        f"{results['settings']['public_tokens']:,} public tokens; recovery of the others relies on the embedding "
        "read-out alone, so a server with more public text (or text closer to the device's) recovers more: read "
        "these rates as lower bounds."
    )
    rows, ref = results["costs"], results["costs"][0]
    for r in rows[1:]:
        lines.append(
            f"- {r['defense']}: recovery {r['recovery']:.1%} (no defense, fine-tuned the same way: {ref['recovery']:.1%}), "
            f"perplexity {r['eval_ppl'] / ref['eval_ppl'] - 1:+.1%}."
        )
    labels = results["labels"]
    if labels:
        lines.append(
            "- U-split labels: from the returned gradient the server recovers "
            + ", ".join(f"{r['recovery']:.0%} with k={r['tail']}" for r in labels)
            + " of the device's labels (the model's own guess from the hidden state alone: "
            + ", ".join(f"{r['hidden_only']:.0%}" for r in labels)
            + "). Note that in a causal LM the labels are the next inputs: the hidden states at L-k of the following "
            "positions carry them too, so the tail protects labels at most as well as depth L-k protects inputs "
            "(row L-k of the first table)."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or preset (default: pretrain_base.py's gpt2 build)")
    parser.add_argument("--out", type=Path, default=Path("bench-privacy"))
    parser.add_argument("--public-tokens", type=int, default=32768)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each inverse model")
    parser.add_argument("--defense-cuts", default="1,2,6")
    parser.add_argument("--ft-cut", type=int, default=2)
    parser.add_argument("--ft-steps", type=int, default=200)
    parser.add_argument("--ft-batch", type=int, default=8)
    parser.add_argument("--ft-length", type=int, default=128)
    parser.add_argument("--ft-lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--eval-problems", type=int, default=100)
    parser.add_argument("--tails", default="0,1,2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, help="replace the privacy section of this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # the tokenizer's "longer than the model's maximum" notes: we truncate
    model = args.model or str(default_base())
    if args.model is None and not (Path(model) / "model.safetensors").is_file():
        sys.exit(f"no pretrained base at {model}: run `python scripts/pretrain_base.py --family gpt2` first")
    config = load_config(model)
    total = num_layers(config)
    settings = AttackSettings(
        public_tokens=args.public_tokens, eval_tokens=args.eval_tokens, steps=args.steps, seed=args.seed
    )
    defense_cuts = [int(c) for c in args.defense_cuts.split(",")]
    tails = [int(k) for k in args.tails.split(",")]
    began = time.perf_counter()

    say(f"(a) inversion at cuts 1..{total - 1}, no defense")
    plain = audit_inversion(model, list(range(1, total)), [DefenseCase("none")], settings, say)
    say(f"(b) defenses at cuts {defense_cuts}")
    cases = [DefenseCase("clip", DefenseSettings(), clip_quantile=0.5)]
    cases += [DefenseCase(f"clip + noise {n:g}", DefenseSettings(noise=n), clip_quantile=0.5) for n in NOISES]
    defended: list[CutResult] = audit_inversion(model, defense_cuts, cases, settings, say)
    clip = median_norm(model, args.ft_cut, settings)
    say(f"(c) fine-tuning at cut {args.ft_cut} with each defense (clip {clip:.3g} = median public token norm)")
    cost_rows = costs(model, args, settings, clip)
    say(f"(d) U-split label leakage, tails {tails}")
    labels = audit_labels(model, tails, settings, say)
    minutes = (time.perf_counter() - began) / 60

    report = AuditReport(model, total, hidden_size(config), int(config.vocab_size), settings, plain + defended, labels)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_recovery(report, args.out / "recovery.png")
    plot_costs(cost_rows, args.ft_cut, args.out / "costs.png")
    facts_file = Path(model) / pretrain_base.FACTS_FILE
    facts = json.loads(facts_file.read_text()) if facts_file.is_file() else {}
    results = {
        "model": model, "num_layers": total, "hidden_size": hidden_size(config), "base_facts": facts, "settings": dataclasses.asdict(settings), "args": vars(args) | {
            "out": str(args.out), "write": str(args.write)}, "clip_at_ft_cut": clip, "minutes": minutes,
        "inversion": [dataclasses.asdict(r) for r in plain + defended], "costs": cost_rows,
        "labels": [dataclasses.asdict(r) for r in labels], "date": date.today().isoformat(), "machine": cpu_name(),
    }  # fmt: skip
    (args.out / "privacy.json").write_text(json.dumps(results, indent=2) + "\n")

    text = "\n\n".join([markdown(report), cost_table(cost_rows, args.ft_cut), verdict(cost_rows), findings(results)])
    print(text)
    say(f"done in {minutes:.1f} min; results in {args.out}")
    if args.write:
        command = (
            "python scripts/bench_privacy.py "
            + (f"--model {args.model} " if args.model else "")
            + f"--public-tokens {args.public_tokens} --eval-tokens {args.eval_tokens} "
            f"--steps {args.steps} --defense-cuts {args.defense_cuts} --ft-cut {args.ft_cut} --ft-steps "
            f"{args.ft_steps} --ft-batch {args.ft_batch} --eval-problems {args.eval_problems} --tails {args.tails}"
        )
        write_section(args.write, "privacy", section(command, results, text))


def section(command: str, results: dict[str, Any], tables: str) -> str:
    facts, s, a = results["base_facts"], results["settings"], results["args"]
    base = (
        f"`scripts/pretrain_base.py`'s {facts.get('family', '?')} base ({facts.get('parameters', 0):,} parameters)"
        if facts
        else f"`{results['model']}`"
    )
    return f"""## Privacy: inverting the activations at the cut, and what defenses cost (learned inverse)

**Every figure in this section is the learned inverse's, a weaker attacker than the server has**: the exact
search over the vocabulary (the section "Privacy against the strongest attacker") recovers every token
at every cut it was run at, without a defense, on SmolLM2-135M. The tables stay for what they compare
(NoPeek against clip and noise, what each costs when fine-tuned through); read their recovery figures as
lower bounds.

The server as attacker: it knows the frozen base and the client adapters, runs the client segment on
public text (WikiText-2 + E2E, {s["public_tokens"]:,} tokens) and trains an inverse model (an MLP over
each position and one neighbour on each side, read out through the model's token embedding; {s["steps"]}
steps of {s["batch_size"]} positions) to the tokens; scored by top-1 recovery on {s["eval_tokens"]:,}
held-out device tokens (GSM8K train prompts and answers, padding excluded). "baseline" always guesses
the public text's most common token. Against a defense the attacker trains on defended public
activations (it knows the settings). Noise is relative: per-token noise norm ~ noise x clip, the clip
at the median token norm of public activations at that cut; it is a heuristic, not a DP guarantee.
Costs: LoRA r={a["rank"]} fine-tuning through the split at cut {a["ft_cut"]}, {a["ft_steps"]} steps of
{a["ft_batch"]} GSM8K train examples (T<={a["ft_length"]}, AdamW lr {a["ft_lr"]}), the same batches for
every setting, eval perplexity on the first {a["eval_problems"]} GSM8K test problems with the defense
on; each setting's trained client adapters are then attacked at that cut. Labels: the U split's device
holds the last k blocks, the norm and the head and returns the loss gradient at block L-k; the attacker
predicts the label from (hidden, gradient), against the model's own top-1 guess from the hidden state.

Regime: {base}, {results["num_layers"]} blocks, hidden {results["hidden_size"]};
{results["machine"]}, {a["threads"]} threads, {results["date"]}; the whole run took
{results["minutes"]:.0f} minutes.

`{command} --write BENCHMARKS.md`

{tables}
"""


if __name__ == "__main__":
    main()
