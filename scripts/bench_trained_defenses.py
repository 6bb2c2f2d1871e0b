#!/usr/bin/env python3
"""Defenses trained with the model, against the strongest attacker, and what each costs after fine-tuning.

The frozen prices of ``bench_exact_attack.py`` are those of a model that never saw the noise; here LoRA is
fine-tuned through the split at ``--cut`` with the defense on (the same batches for every setting), then the
split is evaluated as deployed (GSM8K test, the defense on) and attacked by the best of the learned inverse and
the exact search (whitened against the noise, the whole vocabulary where the inverse's proposals fall short):

* none: the reference (eval loss of the same fine-tuning without a defense);
* clip + noise N (``--noises``): the clip at the median public token norm at the cut (what ``clip_quantile =
  0.5`` sends), Gaussian noise of N times it; the attacker knows the adapters and the clip;
* bottleneck w (``--bottlenecks``): the variational information bottleneck of tools/audit/bottleneck.py (the
  MID defense) with KL weight w, starting from noise ``--sigma`` x the typical coordinate; the attacker knows
  the adapters and the bottleneck's weights;
* private, and private + distance D (``--distances``): the client adapters kept from the server (private
  adapters: it completes the client segment from the public base and attacks with that, matching vectors and
  directions), alone and with the distance term that turns the device's activations away from the base's;
* private + distance D + clip + noise N (``--combined N``, D = ``--combined-distance``): the combination.

For each: eval loss, the bytes of a step's activations on the wire (fp16, zstd), the device's extra compute
against the client segment's forward; and, for private adapters, the bytes they add to every assignment.
``--only`` runs some settings and ``--keep`` takes the others' rows from an earlier run's results (each
setting is fine-tuned and attacked on its own, from the same seed: a row is the same run alone or with others).

    python scripts/bench_trained_defenses.py                          # SmolLM2-135M-Instruct
    python scripts/bench_trained_defenses.py --write BENCHMARKS.md --table tools/audit/audited.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
from bench_exact_attack import pct, resolve_model, say
from transformers.utils import logging as hf_logging

from splitft.bench.sections import cpu_name, write_section
from splitft.shared.job.data import collate, tokenize
from splitft.shared.job.records import load_records
from splitft.shared.model.calibration import public_clips
from splitft.shared.model.defense import DefenseSettings, defend
from splitft.shared.model.loading import hidden_size, load_config, model_fingerprint
from splitft.shared.model.lora import LoraSettings, lora_state
from splitft.shared.model.loss import padding_mask
from splitft.shared.model.split import Segment
from splitft.shared.model.tokenizer import GSM8K, load_tokenizer
from splitft.shared.wire.codec import compress, encode_tensor, pack
from splitft.shared.wire.sealed import SealedUpload, associated, average_sealed, seal
from splitft.tools.audit import (
    AttackSettings,
    Bottleneck,
    DefenseCase,
    audit_inversion,
    device_examples,
    evaluate_split,
    finetune_split,
)
from splitft.tools.audit.table import record_private, record_trained


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    defense: DefenseSettings
    knows_adapters: bool = True
    bottleneck: float | None = None  # the KL weight of a bottleneck; None = none


def settings_of(args: argparse.Namespace, clip: float) -> list[Setting]:
    rows = [Setting("none", DefenseSettings())]
    rows += [Setting(f"clip + noise {n:g}", DefenseSettings(clip=clip, noise=n)) for n in floats(args.noises)]
    rows += [Setting(f"bottleneck {w:g}", DefenseSettings(), bottleneck=w) for w in floats(args.bottlenecks)]
    rows += [Setting("private", DefenseSettings(), False)] if args.distances is not None else []
    rows += [
        Setting(f"private + distance {w:g}", DefenseSettings(distance=w), False) for w in floats(args.distances or "")
    ]
    d = args.combined_distance
    rows += [
        Setting(
            f"private + distance {d:g} + clip + noise {n:g}", DefenseSettings(clip=clip, noise=n, distance=d), False
        )
        for n in floats(args.combined)
    ]
    return rows


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def step_price(
    client: Segment, defense: DefenseSettings, neck: Bottleneck | None, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[float, float]:
    """(bytes per token of a step's activations on the wire, the device's extra compute / its client forward)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        began = time.perf_counter()
        hidden = client(ids, mask)
        forward_s = time.perf_counter() - began
        began = time.perf_counter()
        sent = defend(hidden, defense, gen)
        if neck is not None:
            sent = neck(sent, gen)[0]
        if defense.distance > 0:  # the base's activations, a second forward without the adapters
            with client.peft_model.disable_adapter():
                client(ids, mask)
        extra_s = time.perf_counter() - began
    wire = len(compress(pack(encode_tensor(sent * mask.unsqueeze(-1), "fp16"))))
    return wire / int(mask.sum()), extra_s / forward_s


def private_price(adapters: dict[str, torch.Tensor], devices: int) -> dict[str, float]:
    """What private adapters add: a device's sealed adapters (fp32), the relay of ``devices`` of them in every
    assignment (where the plain job sends one averaged copy in clear), and the device's opening and averaging."""
    key = bytes(32)
    clear = len(compress(pack({k: encode_tensor(v, "fp32") for k, v in adapters.items()})))
    blob = seal(key, adapters, associated("job", 1, "d0"), "fp32")
    uploads = [
        SealedUpload(f"d{i}", 1, 100.0, seal(key, adapters, associated("job", 1, f"d{i}"), "fp32"))
        for i in range(devices)
    ]
    ranks = {k.rsplit(".lora_", 1)[0]: int(v.shape[0]) for k, v in adapters.items() if ".lora_A." in k}
    began = time.perf_counter()
    average_sealed(key, "job", uploads, ranks, seed=0)
    return {
        "devices": devices, "clear_bytes": clear, "sealed_bytes": len(blob), "relay_bytes": devices * len(blob),
        "open_average_s": time.perf_counter() - began,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="'smollm2' (default), 'tiny-base', a preset, a model folder or .gguf")
    parser.add_argument("--out", type=Path, default=Path("bench-trained-defenses"))
    parser.add_argument("--cut", type=int, default=2)
    parser.add_argument("--noises", default="1,2")
    parser.add_argument("--bottlenecks", default="0.1,1")
    parser.add_argument("--sigma", type=float, default=0.5, help="the bottleneck's starting spread")
    parser.add_argument("--bottleneck-lr", type=float, default=0.1)
    parser.add_argument("--distances", default="0.5,2", help="private + distance weights ('' for private alone)")
    parser.add_argument("--combined", default="1", help="noise ratios of private + distance + clip + noise")
    parser.add_argument("--combined-distance", type=float, default=0.5)
    parser.add_argument("--only", help="comma-separated setting names to run (default: all)")
    parser.add_argument("--keep", type=Path, help="an earlier run's results: the rows of the settings not run now")
    parser.add_argument("--steps", type=int, default=30, help="fine-tuning steps of each setting")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--eval-problems", type=int, default=32)
    parser.add_argument("--exact-tokens", type=int, default=128)
    parser.add_argument("--proposals", type=int, default=64)
    parser.add_argument("--public-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--attack-steps", type=int, default=300)
    parser.add_argument("--devices", type=int, default=5, help="fleet size for the private adapters' relay")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", type=Path)
    parser.add_argument("--table", type=Path, help="record the noised settings in this JSON table (run reads it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model, label = resolve_model(args.model)
    attack = AttackSettings(
        public_tokens=args.public_tokens, eval_tokens=args.eval_tokens, steps=args.attack_steps,
        exact_tokens=args.exact_tokens, proposals=args.proposals,
    )  # fmt: skip
    tokenizer = load_tokenizer(model)
    pad = int(tokenizer.pad_token_id)
    train = device_examples(tokenizer, args.steps * args.batch * args.length, args.length, offset=2000)
    test = tokenize(load_records(GSM8K / "test.jsonl", limit=args.eval_problems), tokenizer, 256)
    ids, _, lengths = collate(test[:8], pad)
    mask = padding_mask(lengths, ids.shape[1])
    lora = LoraSettings(r=args.rank, r_cut=args.rank)
    clip = public_clips(model, (args.cut,), 0.5)[args.cut]
    width = hidden_size(load_config(model))
    settings = settings_of(args, clip)
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        settings = [s for s in settings if s.name in wanted]
        if not settings:
            raise SystemExit(f"--only names none of the settings: {', '.join(s.name for s in settings_of(args, clip))}")
    began = time.perf_counter()
    rows: list[dict[str, Any]] = []
    private: dict[str, float] | None = None
    for setting in settings:
        started = time.perf_counter()
        neck = (
            None
            if setting.bottleneck is None
            else Bottleneck(width, clip / math.sqrt(width), setting.bottleneck, args.sigma)
        )
        client, server = finetune_split(
            model, args.cut, setting.defense, train, steps=args.steps, batch_size=args.batch, lr=args.lr, lora=lora,
            progress=say, bottleneck=neck, bottleneck_lr=args.bottleneck_lr,
        )  # fmt: skip
        result = evaluate_split(client, server, setting.defense, test, pad, bottleneck=neck)
        adapters = lora_state(client.peft_model)
        bytes_per_token, compute = step_price(client, setting.defense, neck, ids, mask)
        case = DefenseCase(
            setting.name, setting.defense, adapters=adapters, knows_adapters=setting.knows_adapters, bottleneck=neck
        )
        (found,) = audit_inversion(model, [args.cut], [case], attack, say)
        if not setting.knows_adapters and private is None:
            private = private_price(adapters, args.devices)
        row = {
            "setting": setting.name, "knows_adapters": setting.knows_adapters, "noise": setting.defense.noise,
            "distance": setting.defense.distance, "bottleneck": setting.bottleneck, "eval_loss": result.loss,
            "eval_tokens": result.tokens, "bytes_per_token": bytes_per_token, "compute_overhead": compute,
            "information": None if neck is None else neck.information(client(ids, mask).detach()[mask.bool()]),
            **dataclasses.asdict(found), "best": found.best[0], "best_attacker": found.best[1],
            "seconds": time.perf_counter() - started,
        }  # fmt: skip
        rows.append(row)
        say(f"{setting.name}: eval loss {result.loss:.4f}, best recovery {found.best[0]:.1%} ({found.best[1]})")
    minutes = (time.perf_counter() - began) / 60
    kept: dict[str, Any] = {}
    if args.keep:  # the settings not run now, from an earlier run, in the settings' order
        kept = json.loads(args.keep.read_text())
        ran = {r["setting"]: r for r in rows}
        earlier = {r["setting"]: r for r in kept["rows"]}
        rows = [
            ran.get(s.name) or earlier[s.name] for s in settings_of(args, clip) if s.name in ran or s.name in earlier
        ]
        private = private or kept.get("private")
        minutes += kept["minutes"]
    results = {
        "model": label, "cut": args.cut, "clip": clip, "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows, "private": private, "attack": dataclasses.asdict(attack), "minutes": minutes,
        "date": date.today().isoformat(), "machine": cpu_name(), "threads": args.threads,
        "kept": [r["setting"] for r in rows if r["setting"] not in {x.name for x in settings}],
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trained-defenses.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    print(text)
    if args.table:
        record_trained(args.table, model_fingerprint(model), results)
        record_private(args.table, model_fingerprint(model), results)
    if args.write:
        command = (
            "python scripts/bench_trained_defenses.py" + (f" --model {args.model}" if args.model else "")
            + f" --cut {args.cut} --noises {args.noises} --bottlenecks {args.bottlenecks} --sigma {args.sigma}"
            f" --distances {args.distances} --combined {args.combined} --steps {args.steps}"
            f" --exact-tokens {args.exact_tokens}" + (f" --only '{args.only}' --keep EARLIER.json" if args.only else "")
        )  # fmt: skip
        write_section(args.write, "trained-defenses", section(command, results, text))


def table(results: dict[str, Any]) -> str:
    rows = results["rows"]
    ref = next((r["eval_loss"] for r in rows if r["setting"] == "none"), rows[0]["eval_loss"])
    lines = [
        f"| defense, fine-tuned with it at cut {results['cut']} | the attacker runs | learned inverse | exact search "
        "(tokens searched) | best | labels (next inputs) | eval loss | vs none | wire B/token | device compute |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        runs = "the device's adapters" if r["knows_adapters"] else "the public base"
        best = f"**{pct(r['best'])}**" + (" (by direction)" if r.get("exact_match") == "directions" else "")
        lines.append(
            f"| {r['setting']} | {runs} | {pct(r['recovery'])} | {pct(r['exact'])} ({r['exact_tokens']}) | {best} "
            f"| {pct(r['exact_labels'])} | {r['eval_loss']:.4f} | {r['eval_loss'] / ref - 1:+.1%} "
            f"| {r['bytes_per_token']:,.0f} | +{r['compute_overhead']:.1%} |"
        )
    private = results["private"]
    if private:
        lines += [
            "",
            f"Private adapters, at this cut and rank: a device's adapters are {private['clear_bytes'] / 1024:,.0f} KiB in "
            f"clear, {private['sealed_bytes'] / 1024:,.0f} KiB sealed; every assignment relays all "
            f"{private['devices']} devices' ({private['relay_bytes'] / 1024:,.0f} KiB, where the plain job sends one "
            f"averaged copy), and each device opens and averages them in {private['open_average_s']:.2f} s.",
        ]
    return "\n".join(lines)


def section(command: str, results: dict[str, Any], text: str) -> str:
    a = results["args"]
    return f"""## Defenses trained with the model, against the strongest attacker

Each defense is on while LoRA is fine-tuned through the split at cut {results["cut"]} ({a["steps"]} steps of
{a["batch"]} GSM8K train examples, T<={a["length"]}, AdamW lr {a["lr"]}, LoRA r={a["rank"]}, the same batches), so
its price is that of a model that has adapted to it; eval loss of the split as deployed (the defense on) on the
first {a["eval_problems"]} GSM8K test problems. The clip is the median public token norm at the cut
({results["clip"]:.1f}). Recovery is the best of the learned inverse and the exact search on the first device
tokens (as many as the table says; whitened by the noise's spread on each coordinate; the whole
vocabulary searched wherever the inverse's top {results["attack"]["proposals"]} hold nothing as near as the true
token would be). The bottleneck (MID) starts at spread {a["sigma"]} and learns at rate {a["bottleneck_lr"]}; its
attacker knows its weights. With private adapters the attacker completes the client segment from the public
base and keeps the better of matching vectors and matching directions. Device compute: the defense's extra
work against the client segment's forward.{kept_note(results)}

Regime: {results["model"]}; {results["machine"]}, {results["threads"]} threads, {results["date"]}; the whole run
took {results["minutes"]:.0f} minutes.

`{command} --write BENCHMARKS.md`

{text}
"""


def kept_note(results: dict[str, Any]) -> str:
    if not results["kept"]:
        return ""
    return (
        "\n\nThe rows " + ", ".join(results["kept"]) + " are from an earlier run of the same command (each setting "
        "runs on its own from the same seed; `--keep`); the others were run again with `--only`."
    )


if __name__ == "__main__":
    main()
