"""Tokens accepted per LLM pass with the real Qwen2.5-Coder pair (1.5B LLM, 0.5B SSM) on the CPU.

    python tools/bench_tree_acceptance.py [--prompts 20] [--new-tokens 32] [--budgets 1,16,64,256]

For every prompt (code and prose, chat template, greedy, fp32) it first decodes incrementally, then
with each tree builder, checks the output is identical, and prints the mean tokens per LLM pass
(prefill excluded; each pass yields its accepted tokens plus the LLM's own next token).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Write a Python function that reverses a linked list.",
    "Implement binary search in Python.",
    "Write a bash script that backs up a directory to a tar.gz file with the date in its name.",
    "Write a SQL query that returns the ten customers with the highest total order value.",
    "Write a JavaScript function that debounces another function.",
    "Write a Python class for a stack with push, pop and peek.",
    "Write a C function that computes the length of a string.",
    "Write a Python script that counts word frequencies in a text file.",
    "Write a Rust function that returns the largest element of a slice.",
    "Explain what a hash table is.",
    "Explain the difference between a process and a thread.",
    "What is recursion? Give a short explanation.",
    "Explain why the sky is blue in a few sentences.",
    "Write a short story about a robot who learns to paint.",
    "Give three tips for writing readable code.",
    "Summarise the plot of Romeo and Juliet in a paragraph.",
    "Explain what Big-O notation means.",
    "Describe how a compiler differs from an interpreter.",
    "Write a haiku about autumn leaves.",
    "What are the benefits of unit testing?",
    "Explain how HTTPS keeps data private.",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm", default="qwen-1.5b")
    ap.add_argument("--ssm", default="qwen-0.5b")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--budgets", default="1,16,64,256")
    ap.add_argument("--auto", action="store_true", help="also run --tree-budget auto (capped at the largest budget)")
    ap.add_argument("--skip-fixed", action="store_true", help="run only --auto and --expansion, not each budget")
    ap.add_argument("--json", default=None)
    ap.add_argument("--max-depth", type=int, default=12)
    ap.add_argument("--expansion", default="1,1,3,1,1,1,1,1")
    args = ap.parse_args()

    from offload_infer.engine import Engine, GenerationStats
    from offload_infer.speculate import TreeConfig, shared_vocab_size
    from weights.load import load_model
    from weights.resolve import resolve

    llm, ssm = load_model(resolve(args.llm)), load_model(resolve(args.ssm))
    vocab = shared_vocab_size(llm.tokenizer.token_strings(), ssm.tokenizer.token_strings(), llm.model.vocab_size,
                              ssm.model.vocab_size, args.ssm)
    configs = {} if args.skip_fixed else {f"budget {b}": TreeConfig(budget=int(b), max_depth=args.max_depth)
                                          for b in args.budgets.split(",")}
    if args.auto:
        configs["budget auto"] = TreeConfig(budget=max(int(b) for b in args.budgets.split(",")), auto=True,
                                            max_depth=args.max_depth)
    if args.expansion:
        configs[f"expansion {args.expansion}"] = TreeConfig(expansion=tuple(int(x) for x in args.expansion.split(",")))
    prompts = [llm.tokenizer.encode_prompt(p, chat=True) for p in PROMPTS[: args.prompts]]
    eos = llm.tokenizer.eos_ids

    base = Engine(llm.model, max_sequence_length=512, eos_ids=eos)
    t0 = time.perf_counter()
    refs = [[t for s in base.generate(p, args.new_tokens) for t in s] for p in prompts]
    inc_s = time.perf_counter() - t0
    print(f"incremental: {sum(map(len, refs))} tokens in {inc_s:.0f} s ({sum(map(len, refs)) / inc_s:.2f} tokens/s)",
          flush=True)
    results = {"incremental": {"tokens": sum(map(len, refs)), "seconds": inc_s}, "trees": {}}
    print(f"{'tree':<28} {'tokens/pass':>12} {'median/prompt':>14} {'mean tree':>10} {'SSM calls':>10} "
          f"{'identical':>10} {'time s':>8} {'tok/s':>7}")
    for name, cfg in configs.items():
        engine = Engine(llm.model, [ssm.model], cfg, max_sequence_length=512, eos_ids=eos, valid_vocab=vocab)
        produced, passes, per_prompt, sizes, same, calls, budgets = 0, 0, [], [], True, [], []
        t0 = time.perf_counter()
        for p, ref in zip(prompts, refs):
            st = GenerationStats()
            out = [t for s in engine.generate(p, args.new_tokens, stats=st) for t in s]
            same &= out == ref
            produced += sum(st.tokens_per_pass)
            passes += len(st.tokens_per_pass)
            per_prompt.append(sum(st.tokens_per_pass) / max(1, len(st.tokens_per_pass)))
            sizes += st.tree_sizes
            calls += st.ssm_calls
            budgets += st.budgets
        wall = time.perf_counter() - t0
        print(f"{name:<28} {produced / passes:>12.2f} {statistics.median(per_prompt):>14.2f} "
              f"{sum(sizes) / len(sizes):>10.1f} {sum(calls) / len(calls):>10.1f} {str(same):>10} {wall:>8.0f} "
              f"{produced / wall:>7.2f}", flush=True)
        results["trees"][name] = {"tokens_per_pass": produced / passes, "median_per_prompt": statistics.median(per_prompt),
                                  "tree_size_mean": sum(sizes) / len(sizes), "ssm_calls_mean": sum(calls) / len(calls),
                                  "identical": same, "seconds": wall, "tokens": produced, "passes": passes,
                                  "budget_choices": {str(b): budgets.count(b) for b in sorted(set(budgets))}}
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
