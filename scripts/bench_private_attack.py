#!/usr/bin/env python3
"""Private adapters against the strongest attacker: what keeping the client adapters from the server buys.

With ``private_adapters`` the server never sees the adapters of the blocks below ``c_min``; its best move is
to complete the client segment from the public base and attack with that (the learned inverse trained on the
base's activations, the exact search run with the base). At ``--cut`` (= ``c_min``: every client block
private), LoRA is fine-tuned through the split for each setting (the same batches): adapters known to the
server (the plain job), private without the distance term, and private with the distance term at each
``--distances`` weight (it keeps the device's activations at least their norm away from the base's). Each
setting's eval loss (the split as deployed, GSM8K test) and the recovery by the attacker it faces.

    python scripts/bench_private_attack.py                           # SmolLM2-135M-Instruct
    python scripts/bench_private_attack.py --write BENCHMARKS.md
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
from bench_exact_attack import pct, resolve_model, say
from transformers.utils import logging as hf_logging

from splitft.bench.sections import cpu_name, write_section
from splitft.shared.job.data import tokenize
from splitft.shared.job.records import load_records
from splitft.shared.model.defense import DefenseSettings
from splitft.shared.model.loading import model_fingerprint
from splitft.shared.model.lora import LoraSettings, lora_state
from splitft.shared.model.tokenizer import GSM8K, load_tokenizer
from splitft.tools.audit import (
    AttackSettings,
    DefenseCase,
    audit_inversion,
    device_examples,
    evaluate_split,
    finetune_split,
)
from splitft.tools.audit.table import record_private


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="'smollm2' (default), 'tiny-base', a preset, a model folder or .gguf")
    parser.add_argument("--out", type=Path, default=Path("bench-private-attack"))
    parser.add_argument("--cut", type=int, default=2)
    parser.add_argument("--distances", default="0.5,2")
    parser.add_argument("--steps", type=int, default=30, help="fine-tuning steps of each setting")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--eval-problems", type=int, default=32)
    parser.add_argument("--exact-tokens", type=int, default=48)
    parser.add_argument("--proposals", type=int, default=64)
    parser.add_argument("--public-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--attack-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", type=Path)
    parser.add_argument("--table", type=Path, help="record the figures in this JSON table (run reads it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model, label = resolve_model(args.model)
    settings = AttackSettings(
        public_tokens=args.public_tokens, eval_tokens=args.eval_tokens, steps=args.attack_steps,
        exact_tokens=args.exact_tokens, proposals=args.proposals,
    )  # fmt: skip
    tokenizer = load_tokenizer(model)
    train = device_examples(tokenizer, args.steps * args.batch * args.length, args.length, offset=2000)
    test = tokenize(load_records(GSM8K / "test.jsonl", limit=args.eval_problems), tokenizer, 256)
    lora = LoraSettings(r=args.rank, r_cut=args.rank)
    settings_list = [("adapters known (plain)", 0.0, True), ("private", 0.0, False)]
    settings_list += [(f"private + distance {w:g}", w, False) for w in (float(x) for x in args.distances.split(","))]
    began = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name, weight, knows in settings_list:
        started = time.perf_counter()
        defense = DefenseSettings(distance=weight)
        client, server = finetune_split(
            model, args.cut, defense, train, steps=args.steps, batch_size=args.batch, lr=args.lr, lora=lora,
            progress=say,
        )  # fmt: skip
        result = evaluate_split(client, server, defense, test, int(tokenizer.pad_token_id))
        adapters = lora_state(client.peft_model)
        (attack,) = audit_inversion(
            model, [args.cut], [DefenseCase(name, adapters=adapters, knows_adapters=knows)], settings, say
        )
        row = {
            "setting": name, "distance": weight, "knows_adapters": knows, "eval_loss": result.loss,
            "eval_tokens": result.tokens, **dataclasses.asdict(attack), "best": attack.best[0],
            "best_attacker": attack.best[1], "seconds": time.perf_counter() - started,
        }  # fmt: skip
        rows.append(row)
        say(f"{name}: eval loss {result.loss:.4f}, best recovery {attack.best[0]:.1%} ({attack.best[1]})")
    results = {
        "model": label, "cut": args.cut, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
        "settings": dataclasses.asdict(settings), "minutes": (time.perf_counter() - began) / 60,
        "date": date.today().isoformat(), "machine": cpu_name(), "threads": args.threads,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "private-attack.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    print(text)
    if args.table:
        record_private(args.table, model_fingerprint(model), results)
    if args.write:
        command = (
            "python scripts/bench_private_attack.py" + (f" --model {args.model}" if args.model else "")
            + f" --cut {args.cut} --distances {args.distances} --steps {args.steps} --batch {args.batch}"
            f" --length {args.length} --eval-problems {args.eval_problems} --exact-tokens {args.exact_tokens}"
        )  # fmt: skip
        write_section(args.write, "private-attack", section(command, results, text))


def table(results: dict[str, Any]) -> str:
    rows = results["rows"]
    ref = rows[0]["eval_loss"]
    lines = [
        f"| setting (fine-tuned at cut {results['cut']}) | the attacker runs | learned inverse | exact search | best "
        "| labels (next inputs) | eval loss | vs adapters known |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        runs = "the device's adapters" if r["knows_adapters"] else "the public base (model completion)"
        lines.append(
            f"| {r['setting']} | {runs} | {pct(r['recovery'])} | {pct(r['exact'])} | **{pct(r['best'])}** "
            f"| {pct(r['exact_labels'])} | {r['eval_loss']:.4f} | {r['eval_loss'] / ref - 1:+.1%} |"
        )
    return "\n".join(lines)


def section(command: str, results: dict[str, Any], text: str) -> str:
    a = results["args"]
    return f"""## Private adapters: the server completes the client segment from the public base

With `private_adapters = true` the client blocks' adapters below `c_min` travel sealed with the fleet key and
the devices average them: the server never has them. Its best move is model completion: the learned inverse
trained on the public base's activations and the exact search run with the public base. Each setting is
fine-tuned through the split at cut {results["cut"]} (every client block private), {a["steps"]} steps of
{a["batch"]} GSM8K train examples (T<={a["length"]}, AdamW lr {a["lr"]}, LoRA r={a["rank"]}), the same batches;
eval loss of the split on the first {a["eval_problems"]} GSM8K test problems. The distance term keeps each
token's activations at the cut at least their own norm away from the base's.

Regime: {results["model"]}; {results["machine"]}, {results["threads"]} threads, {results["date"]}; the whole run
took {results["minutes"]:.0f} minutes.

`{command} --write BENCHMARKS.md`

{text}
"""


if __name__ == "__main__":
    main()
