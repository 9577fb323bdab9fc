"""CPU tokens/s of greedy incremental decoding: offload-infer vs transformers, same model and prompts.

    python tools/bench_cpu_decode.py [--model qwen-1.5b] [--runs 3] [--new-tokens 32]

Both run fp32 on the CPU from the same GGUF (dequantized to fp32 by each), with the chat template,
batch 1, greedy; prints the median over runs of tokens/s for each prompt, and checks the two
generate the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain what a hash table is in two sentences.",
    "Write a bash one-liner that counts lines in all .py files.",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen-1.5b")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from offload_infer.engine import Engine
    from weights.load import load_model
    from weights.resolve import resolve

    r = resolve(args.model)
    ours = load_model(r, progress=False)
    path = r.files[0]
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    engine = Engine(ours.model, max_sequence_length=512)
    print(f"model {args.model}, CPU threads {args.threads}, {args.new_tokens} new tokens, median of {args.runs} runs")
    print(f"{'prompt':<50} {'offload-infer tok/s':>20} {'transformers tok/s':>20} {'same tokens':>12}")
    for p in PROMPTS:
        ids = ours.tokenizer.encode_prompt(p, chat=True)
        t_ours, t_hf = [], []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            out = [t for s in engine.generate(ids, args.new_tokens) for t in s]
            t_ours.append(len(out) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            with torch.no_grad():
                ref = hf.generate(torch.tensor([ids]), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
            t_hf.append(len(ref) / (time.perf_counter() - t0))
        print(f"{p[:48]:<50} {statistics.median(t_ours):>20.2f} {statistics.median(t_hf):>20.2f} "
              f"{str(out == ref):>12}")


if __name__ == "__main__":
    main()
