"""Memory per side of the split, by base dtype and cut, for real model shapes; the chunked head against the
whole-logits head; which device class holds which model.

    python scripts/bench_memory.py [--quick] [--write BENCHMARKS.md]

Models: SmolLM2-135M-Instruct (the main job's GGUF, converted once into the cache), and random-weight folders
of the Qwen2.5-0.5B and Llama-3.2-1B shapes (configs written here from their published dimensions, weights
drawn once and cached in ~/.cache/splitft/bench-models; bf16 on disk, as those checkpoints ship). Every
figure is one training step in a fresh process (B=4, T=256, every position a target, as a ``text`` job has):

* peak RSS (``VmHWM``, which includes about 400 MiB of Python, torch and transformers) of a two-part
  device at cuts 1, 2, 4, 8, of a U-split device at cuts 1, 2, 4, 8 with tail 0 and at cut 2 with tail 1, in
  fp32, bf16 and fp16, beside the memory the coordinator plans for it from the figures the agent measures
  (shared/model/memory.py); the U device at cut 2 also with the whole-logits head it had before (``--head whole``);
* the head alone at each model's vocabulary: its peak memory above the inputs, and its time (best of 3),
  chunked against whole, fp32 and bf16, side by side in one process;
* each firmware profile, in its own dtype: the deepest two-part cut and the most U-split blocks that its
  ``usable_mb`` holds for each model, planned from the agent's measured figures.

Without a GPU the server's bf16 step time against fp32 is not measured (it is reported as such).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
B, T = 4, 256
DTYPES = ("fp32", "bf16", "fp16")

#: The published dimensions of the two larger shapes (their config.json files), weights random.
SHAPES: dict[str, dict[str, Any]] = {
    "Qwen2.5-0.5B-shape": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643,
    },
    "Llama-3.2-1B-shape": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "hidden_act": "silu", "head_dim": 64, "bos_token_id": 128000, "eos_token_id": 128001,
    },
}  # fmt: skip


def cache() -> Path:
    return Path(os.environ.get("SPLITFT_CACHE", Path.home() / ".cache" / "splitft"))


def shape_folder(name: str) -> str:
    """A random-weight folder of a published shape, made once (bf16 safetensors, a config, no tokenizer)."""
    folder = cache() / "bench-models" / name
    if (folder / "config.json").exists():
        return str(folder)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    print(f"bench_memory: drawing random weights for {name} (once) ...", flush=True)
    config = AutoConfig.for_model(**SHAPES[name])
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    staging = folder.with_name(folder.name + ".partial")
    model.save_pretrained(staging)
    staging.rename(folder)
    return str(folder)


# --------------------------------------------------------------------------- one step in a fresh process


def step(model: str, side: str, cut: int, tail: int, dtype: str, head: str) -> dict[str, Any]:
    """Run in a child: one training step of one side, its peak RSS and the memory planned for it."""

    import torch
    import torch.nn.functional as F

    from splitft.agent.profile import measure_memory, peak_rss_mb, runtime_mb
    from splitft.shared.model.loading import load_config, num_layers
    from splitft.shared.model.loss import TargetLoss
    from splitft.shared.model.precision import DTYPES as TORCH_DTYPES
    from splitft.shared.model.split import SegmentSpec, build_segment

    torch.manual_seed(0)
    runtime = runtime_mb()
    layers = num_layers(load_config(model))
    dt = TORCH_DTYPES[dtype]
    spec = SegmentSpec.u_device(cut, tail, layers) if side == "u" else SegmentSpec.client(cut)
    segment = build_segment(model, spec, dtype=dt)
    optimizer = torch.optim.AdamW(segment.lora_parameters().values(), lr=1e-4)
    vocab, hidden = int(segment.config.vocab_size), int(segment.config.hidden_size)
    ids = torch.randint(0, vocab, (B, T))
    mask = torch.ones_like(ids)
    started = time.perf_counter()
    bottom = segment(ids, mask)  # (B, T, C) at the cut
    sent = bottom.detach().float()  # what goes on the wire, and the gradient that comes back
    if side == "u":
        top = torch.randn(B, T, hidden).requires_grad_()  # the server's output, entering the tail
        labels = ids.clone()
        if head == "whole":  # the head as it was: the (N, V) logits of every target at once
            hidden_top = segment(top, mask, start=layers - tail, with_head=False)
            picked = labels[:, 1:] != -100
            logits = segment.head(hidden_top[:, :-1][picked])
            wanted = labels[:, 1:][picked]
            result = TargetLoss(F.cross_entropy(logits.float(), wanted, reduction="sum"), int(wanted.numel()), 0)
        else:
            result = segment.target_loss(top, mask, labels, layers - tail)
        (result.loss_sum / result.tokens).backward()
    bottom.backward(torch.randn_like(sent).to(bottom.dtype) * 1e-3)
    optimizer.step()
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    del segment, optimizer, bottom
    figures = measure_memory(model, B, T, usable=0, runtime=runtime, dtype=dt)
    return {"peak_mb": peak, "figures": figures.to_profile(), "runtime_mb": runtime, "step_s": seconds}


def planned_mb(result: dict[str, Any], blocks: int, head: bool) -> float:
    """What the coordinator plans for a part from the figures its agent measured (shared/model/memory.py)."""
    from splitft.shared.model.memory import MemoryFigures

    figures = MemoryFigures.from_profile(result["figures"])
    assert figures is not None
    return figures.need_mb(blocks, head)


def head_alone(model: str) -> dict[str, Any]:
    """Run in a child: the time of the head and loss of N = B x (T-1) targets, chunked and whole, fp32 and bf16."""
    import torch
    import torch.nn.functional as F

    from splitft.shared.model.loading import load_config
    from splitft.shared.model.loss import linear_cross_entropy

    config = load_config(model)
    vocab, hidden = int(config.vocab_size), int(config.hidden_size)
    out: dict[str, Any] = {"vocab": vocab, "hidden": hidden}
    n = B * (T - 1)
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        head = torch.nn.Linear(hidden, vocab, bias=False, dtype=dtype).requires_grad_(False)
        targets = torch.randint(0, vocab, (n,))
        for kind in ("whole", "chunked", "whole", "chunked"):  # the first of each warms up
            x = torch.randn(n, hidden, dtype=dtype).requires_grad_()
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                if kind == "whole":
                    loss = F.cross_entropy(head(x).float(), targets, reduction="sum")
                else:
                    loss, _ = linear_cross_entropy(x, head, targets)
                loss.backward()
                times.append(time.perf_counter() - t0)
                x.grad = None
            out[f"{dtype_name}_{kind}_s"] = min(times)
    return out


def head_peak(model: str, dtype_name: str, kind: str) -> dict[str, Any]:
    """Run in a child: one head's peak memory above what the process held before it ran."""

    import psutil
    import torch
    import torch.nn.functional as F

    from splitft.agent.profile import peak_rss_mb
    from splitft.shared.model.loading import load_config
    from splitft.shared.model.loss import linear_cross_entropy
    from splitft.shared.model.precision import DTYPES as TORCH_DTYPES

    config = load_config(model)
    vocab, hidden = int(config.vocab_size), int(config.hidden_size)
    dtype = TORCH_DTYPES[dtype_name]
    n = B * (T - 1)
    head = torch.nn.Linear(hidden, vocab, bias=False, dtype=dtype).requires_grad_(False)
    targets = torch.randint(0, vocab, (n,))
    x = torch.randn(n, hidden, dtype=dtype).requires_grad_()
    # The baseline: the weights and the inputs are held (ru_maxrss only grows, hence a process per head).
    before = max(psutil.Process().memory_info().rss / 2**20, peak_rss_mb())
    if kind == "whole":
        loss = F.cross_entropy(head(x).float(), targets, reduction="sum")
    else:
        loss, _ = linear_cross_entropy(x, head, targets)
    loss.backward()
    return {"peak_above_mb": peak_rss_mb() - before}


def child(fn: str, **kwargs: Any) -> dict[str, Any]:
    """Run function ``fn`` of this script in a fresh Python process (peak RSS is per process); its JSON answer."""
    code = (
        "import json, sys; sys.path.insert(0, {!r}); import bench_memory as b; "
        "print('RESULT' + json.dumps(getattr(b, {!r})(**json.loads(sys.argv[1]))))"
    ).format(str(ROOT / "scripts"), fn)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, env=env, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": " / ".join(tail) or f"exit {done.returncode}"}
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT") :])
    return result


# --------------------------------------------------------------------------- the report


def fits_table(models: dict[str, str]) -> list[dict[str, Any]]:
    """Each firmware profile, in its own dtype: what its usable memory holds of each model (planned)."""
    from splitft.agent.profile import measure_memory
    from splitft.shared.model.loading import load_config, num_layers
    from splitft.shared.model.memory import SHARED_PROCESS_RUNTIME_MB
    from splitft.shared.model.precision import DTYPES as TORCH_DTYPES
    from splitft.shared.profiles import list_profiles, load_profile

    rows = []
    figures: dict[tuple[str, str], Any] = {}
    for name in list_profiles():
        profile = load_profile(name)
        for label, folder in models.items():
            key = (label, profile.dtype)
            if key not in figures:
                figures[key] = measure_memory(
                    folder, B, T, usable=0, runtime=SHARED_PROCESS_RUNTIME_MB, dtype=TORCH_DTYPES[profile.dtype]
                )
            f = figures[key]
            usable = dataclasses.replace(f, usable_mb=float(profile.usable_mb))
            layers = num_layers(load_config(folder))
            rows.append({
                "profile": name, "dtype": profile.dtype, "usable_mb": profile.usable_mb, "model": label,
                "two_part": min(usable.blocks_that_fit(head=False), layers - 1),
                "u_blocks": min(usable.blocks_that_fit(head=True), layers - 1),
                "need_c1_mb": usable.need_mb(1, head=False), "need_u1_mb": usable.need_mb(1, head=True),
            })  # fmt: skip
    return rows


def report(results: dict[str, Any], command: str) -> str:
    lines = [
        "## Memory: base dtypes, the chunked head, what fits each device",
        "",
        f"`{command}` (this host: 2 cores, no GPU; one training step per process, B={B}, T={T}, every position a "
        "target; peak RSS includes about 400 MiB of Python, torch and transformers; *planned* is what the "
        "coordinator plans for that part from the figures the agent measures at join, shared/model/memory.py, with its "
        "10% headroom; on the whole-head rows it is the chunked head's plan). Bases: SmolLM2-135M-Instruct (the main job's GGUF), and random weights in the shapes of "
        "Qwen2.5-0.5B and Llama-3.2-1B (their published configs; memory does not depend on the weights' values).",
        "",
        "| model | side | cut | tail | head | fp32 peak / planned MiB | bf16 | fp16 |",
        "|---|---|---:|---:|---|---|---|---|",
    ]
    for row in results["steps"]:
        cells = []
        for dtype in DTYPES:
            r = row.get(dtype) or {}
            if "peak_mb" in r:
                cells.append(
                    f"{r['peak_mb']:,.0f} / {planned_mb(r, row['cut'] + row['tail'], row['side'] == 'u'):,.0f}"
                )
            else:
                cells.append(r.get("error", "-")[:60])
        side = "U device" if row["side"] == "u" else "two-part device"
        tail = row["tail"] if row["side"] == "u" else "-"
        head = row["head"] if row["side"] == "u" else "-"
        lines.append(f"| {row['model']} | {side} | {row['cut']} | {tail} | {head} | {' | '.join(cells)} |")
    lines += [
        "",
        "**The head alone** (N = 1,020 targets, every one a vocabulary row; peak memory above the inputs in a "
        "process of its own; time: best of 3, forward and backward, side by side in one process):",
        "",
        "| model | vocabulary | dtype | whole: peak MiB, s | chunked: peak MiB, s | memory | time |",
        "|---|---:|---|---|---|---:|---:|",
    ]
    for label, h in results["heads"].items():
        for dtype in ("fp32", "bf16"):
            whole, chunked = h.get(f"peak_{dtype}_whole", {}), h.get(f"peak_{dtype}_chunked", {})
            if "peak_above_mb" not in whole or f"{dtype}_whole_s" not in h:
                lines.append(
                    f"| {label} | - | {dtype} | failed: {h.get('error', whole.get('error', '?'))[:80]} | | | |"
                )
                continue
            w, c = whole["peak_above_mb"], chunked["peak_above_mb"]
            ws, cs = h[f"{dtype}_whole_s"], h[f"{dtype}_chunked_s"]
            lines.append(
                f"| {label} | {h['vocab']:,} | {dtype} | {w:,.0f}, {ws:.3f} | {c:,.0f}, {cs:.3f} | "
                f"{c / w:.2f}x | {cs / ws:.2f}x |"
            )
    lines += [
        "",
        "**What each device class holds** (planned from the measured figures, in the class's own dtype, at "
        f"B={B}, T={T}, with a 450 MiB runtime: the deepest two-part cut, the most blocks a U-split device "
        "runs with the head; 0: not even one, and the agent is refused at join):",
        "",
        "| profile | dtype | usable MiB | model | two-part cut | U-split blocks | needs at cut 1 (two-part / U) |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for r in results["fits"]:
        lines.append(
            f"| {r['profile']} | {r['dtype']} | {r['usable_mb']:,} | {r['model']} | {r['two_part']} | "
            f"{r['u_blocks']} | {r['need_c1_mb']:,.0f} / {r['need_u1_mb']:,.0f} |"
        )
    lines += ["", results["gpu"], ""]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    start = text.find("## Memory: base dtypes")
    if start >= 0:
        end = text.find("\n## ", start + 3)
        text = text[:start] + section.rstrip() + "\n" + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2 and the Qwen2.5-0.5B shape at cut 2 only")
    parser.add_argument("--write", type=Path, help="put the report in this Markdown file (its Memory section)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "memory.json", help="the raw results")
    args = parser.parse_args()
    from splitft.bench.sections import smollm2

    models = {"SmolLM2-135M-Instruct": smollm2(), "Qwen2.5-0.5B-shape": shape_folder("Qwen2.5-0.5B-shape")}
    if not args.quick:
        models["Llama-3.2-1B-shape"] = shape_folder("Llama-3.2-1B-shape")
    configs = [("client", c, 0, "chunked") for c in (1, 2, 4, 8)]
    configs += [("u", c, 0, "chunked") for c in (1, 2, 4, 8)] + [("u", 2, 1, "chunked"), ("u", 2, 0, "whole")]
    if args.quick:
        configs = [("client", 2, 0, "chunked"), ("u", 2, 0, "chunked"), ("u", 2, 0, "whole")]
    results: dict[str, Any] = {"steps": [], "heads": {}, "fits": []}
    total, done = len(models) * len(configs) * len(DTYPES), 0
    started = time.monotonic()
    for label, folder in models.items():
        for side, cut, tail, head in configs:
            row: dict[str, Any] = {"model": label, "side": side, "cut": cut, "tail": tail, "head": head}
            for dtype in DTYPES:
                row[dtype] = child("step", model=folder, side=side, cut=cut, tail=tail, dtype=dtype, head=head)
                done += 1
                r = row[dtype]
                figure = (
                    f"{r['peak_mb']:,.0f} MiB peak, {planned_mb(r, cut + tail, side == 'u'):,.0f} planned"
                    if "peak_mb" in r
                    else r
                )
                print(
                    f"[{done}/{total}, {time.monotonic() - started:.0f} s] {label} {side} cut {cut} tail {tail} "
                    f"{head} {dtype}: {figure}",
                    flush=True,
                )
            results["steps"].append(row)
        heads = child("head_alone", model=folder)
        for dtype in ("fp32", "bf16"):
            for kind in ("whole", "chunked"):
                heads[f"peak_{dtype}_{kind}"] = child("head_peak", model=folder, dtype_name=dtype, kind=kind)
        results["heads"][label] = heads
        print(f"{label} head: {json.dumps(heads)}", flush=True)
    results["fits"] = fits_table(models)
    results["gpu"] = (
        "No CUDA device here: the server segment's bf16 step time and memory against fp32 (SmolLM2, 16 devices' "
        "batches) are not measured in this run."
    )
    command = "python scripts/bench_memory.py" + (" --quick" if args.quick else "")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    section = report(results, command)
    print(section)
    if args.write:
        write_section(args.write, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
