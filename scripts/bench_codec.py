#!/usr/bin/env python3
"""Codec benchmark: encode/decode throughput and bytes on the wire per token, per wire dtype.

The activations are real: the client segment of a preset run on GSM8K text (B x T tokens).
Throughput is given in MB/s *of fp16 data* (B*T*C*2 bytes per tensor), so the rows compare on one
scale. One thread (torch.set_num_threads(1)): a device has one core to spare for this.

    python scripts/bench_codec.py                       # print the table
    python scripts/bench_codec.py --write BENCHMARKS.md # and replace the codec section there
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from splitft.bench.sections import cpu_name, write_section
from splitft.shared.job.records import Pair, load_records
from splitft.shared.model.split import SegmentSpec, build_segment
from splitft.shared.model.tokenizer import GSM8K, load_tokenizer
from splitft.shared.wire.codec import FLOAT_WIRE_DTYPES, decode_tensor, encode_tensor, pack, unpack


def real_activations(preset: str, cut: int, batch: int, length: int) -> torch.Tensor:
    tokenizer = load_tokenizer(preset)
    ids: list[int] = []
    for record in load_records(GSM8K / "train.jsonl"):
        assert isinstance(record, Pair)
        ids += tokenizer(record.prompt + "\n" + record.completion + "\n").input_ids
        if len(ids) >= batch * length:
            break
    input_ids = torch.tensor(ids[: batch * length]).view(batch, length)
    client = build_segment(preset, SegmentSpec.client(cut))
    with torch.no_grad():
        return client(input_ids, torch.ones_like(input_ids))  # (B, T, C)


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(preset: str, cut: int, batch: int, length: int, level: int, repeats: int) -> list[dict[str, float | str]]:
    torch.set_num_threads(1)
    hidden = real_activations(preset, cut, batch, length)
    tokens = batch * length
    fp16_mb = hidden.numel() * 2 / 1e6
    fp32_bytes = hidden.numel() * 4
    rows: list[dict[str, float | str]] = []
    for wire in FLOAT_WIRE_DTYPES:
        payload = pack(encode_tensor(hidden, wire), level=level)
        encode_s = timed(lambda w=wire: pack(encode_tensor(hidden, w), level=level), repeats)
        decode_s = timed(lambda p=payload: decode_tensor(unpack(p)), repeats)
        out = decode_tensor(unpack(payload))
        rows.append(
            {
                "wire": wire,
                "encode_mb_s": fp16_mb / encode_s,
                "decode_mb_s": fp16_mb / decode_s,
                "bytes_per_token": len(payload) / tokens,
                "vs_fp32_raw": fp32_bytes / len(payload),
                "rel_error": float((out - hidden).norm() / hidden.norm()),
            }
        )
    return rows


def table(rows: list[dict[str, float | str]]) -> str:
    lines = [
        "| wire dtype | encode MB/s (fp16 data) | decode MB/s (fp16 data) | bytes/token on the wire | "
        "smaller than raw fp32 | relative error |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['wire']} | {r['encode_mb_s']:.0f} | {r['decode_mb_s']:.0f} | {r['bytes_per_token']:.1f} | "
            f"{r['vs_fp32_raw']:.2f}x | {r['rel_error']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--cut", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--level", type=int, default=1, help="zstd level used by pack()")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--write", type=Path, help="replace the codec section of this markdown file")
    args = parser.parse_args()

    rows = run(args.model, args.cut, args.batch, args.length, args.level, args.repeats)
    command = (
        f"python scripts/bench_codec.py --model {args.model} --cut {args.cut} --batch {args.batch} "
        f"--length {args.length} --level {args.level}"
    )
    text = table(rows)
    print(text)
    if args.write:
        write_section(
            args.write,
            "codec",
            f"## Tensor codec\n\n"
            f"Activations of `{args.model}` blocks 0..{args.cut - 1} on GSM8K text, B={args.batch}, "
            f"T={args.length}; msgpack + zstd level {args.level}; median of {args.repeats}; one thread; "
            f"{cpu_name()}, {date.today().isoformat()}.\n\n`{command} --write BENCHMARKS.md`\n\n{text}\n\n"
            "Throughput is in MB/s of the fp16 form of the tensor for every row, so rows compare directly; "
            "'smaller than raw fp32' divides the raw fp32 tensor by the compressed payload.",
        )


if __name__ == "__main__":
    main()
