"""Perplexity with compressed weights against fp32, on a fixed text kept in the repo (CPU).

    PYTHONPATH=. python tools/quality.py [--models demo,qwen-1.5b] [--codecs stored,int8-row,nf4,fp4]

``stored``: the checkpoint's own quantized matrices streamed as they are (``generate --offload`` on a
GGUF). Each codec is applied exactly as ``generate --offload --requantize`` (or ``--4bit/--8bit`` on an
unquantized checkpoint) applies it: every decoder-layer matrix is compressed into its streamed buffer and
decompressed per pass. The baseline
is fp32 (for GGUF files: their dequantized weights). Prints perplexity and the relative change.
Targets: int8 within +0.5%, NF4 within +5%.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

TEXT = Path(__file__).parent / "data" / "quality_text.txt"


def perplexity(model, ids: list[int], window: int) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[start : start + window + 1])
        if len(chunk) < 2:
            break
        logits = model.forward(chunk[:-1], torch.arange(len(chunk) - 1), model.new_cache(window + 1))
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum"))
        count += len(chunk) - 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="demo,qwen-1.5b")
    ap.add_argument("--codecs", default="stored,int8-row,nf4,fp4")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from offload_infer.offload import OffloadBuilder, make_plan
    from weights.load import load_model, read_config, read_stored_sizes
    from weights.resolve import resolve

    text = TEXT.read_text(encoding="utf-8")
    print(f"text: {TEXT.name}, {len(text)} characters")
    print(f"{'model':<16} {'weights':<10} {'tokens':>7} {'perplexity':>11} {'change':>8}")
    for name in args.models.split(","):
        r = resolve(name)
        base = load_model(r, progress=False)
        ids = base.tokenizer.encode(text)
        ref = perplexity(base.model, ids, args.window)
        print(f"{name:<16} {'fp32':<10} {len(ids):>7} {ref:>11.4f} {'':>8}", flush=True)
        del base
        config = read_config(r)
        for codec in args.codecs.split(","):
            if codec == "stored":  # the checkpoint's own quantized matrices, streamed as they are
                plan = make_plan(config, torch.float32, 1 << 40, None, args.block_size, stored=read_stored_sizes(r, config))
                builder = OffloadBuilder(plan.global_bytes + 2 * plan.packed_layer_bytes, None, verbose=False)
            else:  # re-quantized, as --requantize (or --4bit/--8bit on an unquantized checkpoint) does
                plan = make_plan(config, torch.float32, 1 << 40, codec, args.block_size)
                builder = OffloadBuilder(plan.global_bytes + 2 * plan.packed_layer_bytes, codec, args.block_size,
                                         verbose=False, requantize=True)
            q = load_model(r, layer_builder=builder, progress=False)
            ppl = perplexity(q.model, ids, args.window)
            label = codec if codec in ("int8-row", "stored") else f"{codec}/{args.block_size}"
            print(f"{name:<16} {label:<10} {len(ids):>7} {ppl:>11.4f} {100 * (ppl / ref - 1):>+7.2f}%", flush=True)
            del q


if __name__ == "__main__":
    main()
