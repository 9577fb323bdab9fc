"""Tokens per LLM pass (and tokens/s) by prompt category, with the real Qwen2.5-Coder pair: trees shaped by
learned acceptance against the trees of before (ranked by the SSM's probabilities, every candidate of the
best ``budget`` expanded, depth 16) and against transformers' assisted generation (a chain whose length
grows while it is accepted).

    PYTHONPATH=. python tools/bench_tree_shapes.py [--device cpu|cuda] [--offload --reserve 1.2G] \
        [--budgets 16,64,256] [--before 16,64] [--auto] [--peer] [--new 64] [--repeat N] [--phases] [--json out.json]

Categories (held out: none of these prompts was used to tune anything): 8 code tasks in chat whose
answers copy a given signature and docstring, 8 raw code completions (no chat template), 16 chat
questions. Greedy; every output is compared with incremental decoding. Tokens per pass = tokens generated
after the first / LLM passes after the first, pooled over a category's prompts (the first pass reads the
prompt). The peer's passes are counted with a forward hook on its LLM. fp32 on the CPU, fp16 on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

CODE_CHAT = [
    'Complete this function:\n```python\ndef merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:\n'
    '    """Merge overlapping closed intervals and return them sorted by start."""\n```',
    'Implement this function:\n```python\ndef is_anagram(a: str, b: str) -> bool:\n'
    '    """Return True if a and b contain the same letters, ignoring case and spaces."""\n```',
    'Write the body of this function:\n```python\ndef chunked(items: list, size: int) -> list[list]:\n'
    '    """Split items into consecutive lists of at most size elements."""\n```',
    'Complete:\n```python\ndef flatten(nested: list) -> list:\n'
    '    """Flatten arbitrarily nested lists into one flat list, keeping order."""\n```',
    'Implement:\n```python\ndef count_vowels(text: str) -> int:\n    """Count the vowels (a, e, i, o, u) in text, '
    'case-insensitively."""\n```',
    'Complete this function:\n```python\ndef rotate_matrix(m: list[list[int]]) -> list[list[int]]:\n'
    '    """Rotate a square matrix 90 degrees clockwise and return the new matrix."""\n```',
    'Implement this function:\n```python\ndef parse_key_values(line: str) -> dict[str, str]:\n'
    '    """Parse "a=1; b=2" into {"a": "1", "b": "2"}, stripping spaces."""\n```',
    'Write this function:\n```python\ndef moving_average(xs: list[float], window: int) -> list[float]:\n'
    '    """Return the averages of each run of window consecutive values."""\n```',
]
RAW_CODE = [
    'def gcd(a: int, b: int) -> int:\n    """Greatest common divisor by Euclid\'s algorithm."""\n',
    "import json\n\n\ndef load_config(path):\n    \"\"\"Read a JSON config file and return it as a dict.\"\"\"\n",
    "class Queue:\n    \"\"\"A FIFO queue on two stacks.\"\"\"\n\n    def __init__(self):\n",
    "def bubble_sort(xs):\n    \"\"\"Sort xs in place with bubble sort and return it.\"\"\"\n    n = len(xs)\n",
    "#include <stdio.h>\n\n/* Print the first n Fibonacci numbers. */\nvoid print_fib(int n) {\n",
    "function capitalize(words) {\n  // Capitalize the first letter of every word in the array.\n",
    "def read_lines(path):\n    \"\"\"Return the non-empty lines of a text file, stripped.\"\"\"\n    with open(path) as f:\n",
    "SELECT customer_id, SUM(amount) AS total\nFROM orders\n",
]
CHAT = [
    "What is the difference between a list and a tuple in Python?",
    "How does garbage collection work in Java?",
    "Explain what a race condition is.",
    "What does the CAP theorem say?",
    "Why are immutable objects useful?",
    "What is the purpose of a virtual environment in Python?",
    "Explain how a B-tree differs from a binary search tree.",
    "What is dependency injection?",
    "How do I choose between SQL and NoSQL databases?",
    "What is tail recursion?",
    "Explain what a closure is in JavaScript.",
    "What is the difference between TCP and UDP?",
    "What are the SOLID principles?",
    "How does a CPU cache improve performance?",
    "Explain eventual consistency.",
    "What is a memory leak and how do you find one?",
]
CATEGORIES = {"code in chat": (CODE_CHAT, True), "raw code": (RAW_CODE, False), "chat questions": (CHAT, True)}


def peer_passes(args, prompts_by_cat, refs_by_cat, dtype, device) -> dict:
    """transformers' assisted generation with the same pair: tokens per pass per category."""
    from transformers import AutoModelForCausalLM

    from weights.resolve import resolve

    def hf(name: str):
        f = resolve(name).files[0]
        return AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, torch_dtype=dtype).to(device).eval()

    llm, ssm = hf(args.llm), hf(args.ssm)
    calls = [0]
    llm.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    out = {}
    for cat, prompts in prompts_by_cat.items():
        produced = passes = same = 0
        t0 = time.perf_counter()
        for ids, ref in zip(prompts, refs_by_cat[cat]):
            calls[0] = 0
            x = torch.tensor([ids], device=device)
            with torch.inference_mode():
                y = llm.generate(x, attention_mask=torch.ones_like(x), assistant_model=ssm, max_new_tokens=args.new,
                                 do_sample=False, eos_token_id=list(args.eos), pad_token_id=list(args.eos)[0])
            got = y[0, len(ids):].tolist()
            same += got == ref
            produced += len(got) - 1
            passes += calls[0] - 1
        out[cat] = {"tokens_per_pass": produced / max(1, passes), "identical": same, "prompts": len(prompts),
                    "produced_after_first": produced, "passes_after_first": passes,
                    "seconds": time.perf_counter() - t0}
        print(f"{'transformers assisted':<34} {cat:<15} {out[cat]['tokens_per_pass']:>8.2f} "
              f"{same:>3}/{len(prompts):<2} {'':>7} {out[cat]['seconds']:>7.1f}", flush=True)
    pooled = sum(r["produced_after_first"] for r in out.values()) / sum(r["passes_after_first"] for r in out.values())
    out["all"] = {"tokens_per_pass": pooled}
    print(f"{'transformers assisted':<34} {'all':<15} {pooled:>8.2f}", flush=True)
    return out


def time_phases(engine, sync) -> dict[str, list[float]]:
    """Wrap an engine's step to record, per decoding step, the host seconds of: drafting, the LLM pass's
    enqueueing, waiting for the device (a synchronisation put where verification waits anyway),
    verification and commits, and the rest of the step (inputs of the pass, bookkeeping)."""
    rec: dict[str, list[float]] = {k: [] for k in ("step", "draft", "enqueue", "wait", "verify")}
    cur: dict[str, float] = {}
    step, llm_pass, verify = engine.step, engine._llm_pass, engine._verify_and_commit

    def timed_pass(*a, **k):
        t = time.perf_counter()
        out = llm_pass(*a, **k)
        cur["enqueue"] = time.perf_counter() - t
        return out

    def timed_verify(*a, **k):
        t = time.perf_counter()
        sync()
        t1 = time.perf_counter()
        out = verify(*a, **k)
        cur["wait"], cur["verify"] = t1 - t, time.perf_counter() - t1
        if a[0]:  # decoding requests (a prompt's first pass is not a decoding step)
            cur["draft"] = a[6] - a[5]  # t1 - t0 of the step
        return out

    def timed_step():
        cur.clear()
        t = time.perf_counter()
        out = step()
        if "draft" in cur:
            cur["step"] = time.perf_counter() - t
            for k in rec:
                rec[k].append(cur[k])
        return out

    engine._llm_pass, engine._verify_and_commit, engine.step = timed_pass, timed_verify, timed_step
    return rec


def report_phases(name: str, rec: dict[str, list[float]]) -> dict[str, float]:
    n = max(1, len(rec["step"]))
    ms = {k: 1e3 * sum(v) / n for k, v in rec.items()}
    ms["rest"] = ms["step"] - ms["draft"] - ms["enqueue"] - ms["wait"] - ms["verify"]
    print(f"{name:<34} phases, ms per step over {n} steps: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()),
          flush=True)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm", default="qwen-1.5b")
    ap.add_argument("--ssm", default="qwen-0.5b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--reserve", default="1.2G")
    ap.add_argument("--dense", action="store_true", help="stream the LLM dequantized at fp16 (--requantize dense), "
                    "as before GGUFs streamed as stored")
    ap.add_argument("--budgets", default="16,64,256", help="calibrated trees (now)")
    ap.add_argument("--before", default="16,64", help="trees as before: SSM probabilities, depth 16, every candidate")
    ap.add_argument("--expand-ratio", type=float, action="append", dest="expand_ratios", default=None,
                    help="calibrated trees' EXPAND_RATIO (repeatable: one config per value)")
    ap.add_argument("--draft-ahead", action="append", default=None,
                    help="SSM rounds drafted ahead during each LLM pass: a number, or 'auto' (the default: on a GPU "
                    "with a streamed LLM, until the pass ends); repeatable: each config runs with each value")
    ap.add_argument("--whole-trees", action="store_true", help="fixed budgets grow their whole trees, however many "
                    "drafting rounds that takes (TreeConfig.weigh_rounds=False): tree shapes alone, not their cost")
    ap.add_argument("--auto", action="store_true")
    ap.add_argument("--auto-max", type=int, default=None, help="auto's largest budget [default: the largest of --budgets]")
    ap.add_argument("--peer", action="store_true", help="transformers' assisted generation with the same pair")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each config (the median run by tokens/s is shown)")
    ap.add_argument("--categories", default=",".join(CATEGORIES))
    ap.add_argument("--limit", type=int, default=None, help="first N prompts of each category (a quick look)")
    ap.add_argument("--no-incremental", action="store_true",
                    help="skip incremental decoding (outputs are then compared with the first config's)")
    ap.add_argument("--phases", action="store_true", help="time each step's phases (host timers; adds a device "
                    "synchronisation before verification, which waits there anyway)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from offload_infer.speculate import EXPAND_RATIO

    args.expand_ratios = args.expand_ratios or [EXPAND_RATIO]
    from offload_infer.engine import Engine
    from offload_infer.offload import OffloadBuilder, parse_size
    from offload_infer.speculate import TreeConfig, shared_vocab_size
    from offload_infer.stats import GenerationStats
    from weights.load import load_model, resident_layers
    from weights.resolve import resolve

    dev = torch.device(args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    builder = OffloadBuilder(parse_size(args.reserve), kv_bytes=1 << 30, requantize=args.dense) if args.offload \
        else resident_layers
    llm = load_model(resolve(args.llm), device=dev, dtype=dtype, layer_builder=builder)
    ssm = load_model(resolve(args.ssm), device=dev, dtype=dtype)
    vocab = shared_vocab_size(llm.tokenizer.token_strings(), ssm.tokenizer.token_strings(), llm.model.vocab_size,
                              ssm.model.vocab_size, args.ssm)
    tok, eos = llm.tokenizer, llm.tokenizer.eos_ids
    args.eos = eos
    prompts = {cat: [tok.encode_prompt(p, chat=chat) for p in texts[: args.limit]]
               for cat, (texts, chat) in CATEGORIES.items() if cat in args.categories.split(",")}

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run(engine) -> dict:
        res = {}
        for cat, ps in prompts.items():
            outs, produced, passes, rounds, ahead, drafting = [], 0, 0, 0, 0, 0.0
            sync()
            t0 = time.perf_counter()
            for p in ps:
                st = GenerationStats()
                outs.append([t for s in engine.generate(p, args.new, stats=st) for t in s])
                produced += sum(st.tokens_per_pass)
                passes += len(st.tokens_per_pass)
                rounds += sum(st.ssm_calls)
                ahead += sum(st.ahead_calls)
                drafting += st.ssm_time_s
            sync()
            wall = time.perf_counter() - t0
            res[cat] = {"outputs": outs, "tokens": sum(map(len, outs)), "seconds": wall,
                        "tokens_per_pass": produced / max(1, passes), "produced_after_first": produced,
                        "passes_after_first": passes, "ssm_rounds_per_pass": rounds / max(1, passes),
                        "ahead_rounds_per_pass": ahead / max(1, passes), "drafting_seconds": drafting}
        return res

    base = {} if args.no_incremental else run(Engine(llm.model, max_sequence_length=1024, eos_ids=eos))
    refs = {cat: r.pop("outputs") for cat, r in base.items()}
    configs = {f"budget {b}" + (f" (ratio {r})" if r != EXPAND_RATIO else ""):
               TreeConfig(budget=int(b), expand_ratio=r, weigh_rounds=not args.whole_trees)
               for b in args.budgets.split(",") if b for r in args.expand_ratios}
    configs |= {f"budget {b} (before)": TreeConfig(budget=int(b), calibrated=False, expand_ratio=0.0, max_depth=16)
                for b in args.before.split(",") if b}
    if args.auto:
        configs["auto"] = TreeConfig(budget=args.auto_max or max(int(b) for b in args.budgets.split(",")), auto=True)
    aheads = args.draft_ahead or ["auto"]
    if len(aheads) > 1 or aheads != ["auto"]:
        configs = {f"{name} ahead {a}": dataclasses.replace(cfg, draft_ahead=None if a == "auto" else int(a))
                   for name, cfg in configs.items() for a in aheads}
    results = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d"),
               "args": {k: v for k, v in vars(args).items() if k != "eos"}, "incremental": base, "trees": {}}
    print(f"{'config':<34} {'category':<15} {'tok/pass':>8} {'rounds':>6} {'ahead':>6} {'same':>6} {'tok/s':>7} "
          f"{'time s':>7} {'draft s':>7}", flush=True)
    for cat, r in base.items():
        print(f"{'incremental':<34} {cat:<15} {1.0:>8.2f} {'':>6} {'':>6} {'':>6} {r['tokens'] / r['seconds']:>7.2f} "
              f"{r['seconds']:>7.1f}", flush=True)
    for name, cfg in configs.items():
        engine = Engine(llm.model, [ssm.model], cfg, max_sequence_length=1024, eos_ids=eos, valid_vocab=vocab)
        phases = time_phases(engine, sync) if args.phases else None
        runs = [run(engine) for _ in range(args.repeat)]  # the same engine: later runs start with learned figures
        speeds = [sum(r["tokens"] for r in x.values()) / sum(r["seconds"] for r in x.values()) for x in runs]
        res = sorted(runs, key=lambda x: speeds[runs.index(x)])[len(runs) // 2]  # the median run (by tokens/s)
        for cat, r in res.items():
            outs = r.pop("outputs")
            refs.setdefault(cat, outs)  # without incremental decoding: the first config's outputs
            r["identical"] = sum(o == ref for o, ref in zip(outs, refs[cat]))
            r["prompts"] = len(outs)
            print(f"{name:<34} {cat:<15} {r['tokens_per_pass']:>8.2f} {r['ssm_rounds_per_pass']:>6.2f} "
                  f"{r['ahead_rounds_per_pass']:>6.2f} {r['identical']:>3}/{len(outs):<2} "
                  f"{r['tokens'] / r['seconds']:>7.2f} {r['seconds']:>7.1f} {r['drafting_seconds']:>7.1f}", flush=True)
        tokens = sum(r["tokens"] for r in res.values())
        seconds = sum(r["seconds"] for r in res.values())
        n_passes = sum(r["passes_after_first"] for r in res.values())
        pooled = sum(r["produced_after_first"] for r in res.values()) / n_passes
        rounds = sum(r["ssm_rounds_per_pass"] * r["passes_after_first"] for r in res.values()) / n_passes
        ahead = sum(r["ahead_rounds_per_pass"] * r["passes_after_first"] for r in res.values()) / n_passes
        drafting = sum(r["drafting_seconds"] for r in res.values())
        res["all"] = {"tokens_per_s": tokens / seconds, "tokens_per_pass": pooled, "ssm_rounds_per_pass": rounds,
                      "ahead_rounds_per_pass": ahead, "seconds": seconds, "drafting_seconds": drafting}
        print(f"{name:<34} {'all':<15} {pooled:>8.2f} {rounds:>6.2f} {ahead:>6.2f} {'':>6} {tokens / seconds:>7.2f} "
              f"{seconds:>7.1f} {drafting:>7.1f}", flush=True)
        if args.repeat > 1:
            res["all"]["tokens_per_s_runs"] = speeds
            print(f"{name:<34} tokens/s of {args.repeat} runs: {', '.join(f'{x:.1f}' for x in speeds)} "
                  f"(median run shown)", flush=True)
        if phases is not None:
            res["all"]["phases_ms"] = report_phases(name, phases)
        results["trees"][name] = res
    if args.peer:
        results["peer"] = peer_passes(args, prompts, refs, dtype, dev)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    sys.exit(main())
