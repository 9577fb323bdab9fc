"""End-to-end decoding speed on one CUDA GPU against the tools users would pick instead (batch 1, greedy).

    PYTHONPATH=. python tools/bench_e2e.py --shape llama-7b --reserve 4GiB --flexgen opt-6.7b --json e2e.json

Same model shape, GPU weight budget and prompt (64 random tokens) for:
  (a) transformers + accelerate offloading (fp16);
  (b) (a) with transformers assisted generation and a resident SSM (Qwen2.5-0.5B shape);
  (c) offload-infer incremental decoding, offloaded (fp16, int8 and int4);
  (d) offload-infer with SSM token trees (same SSM shape, resident, drafting from CUDA graphs; one row
      with the SSM run eagerly), offloaded;
  (e) FlexGen 0.1.8 at batch 1 on the OPT shape (fp16 and int4), beside (c) on that shape.
Weights are random (zero for transformers), so a random SSM gets nothing accepted: (b) and (d) show
what drafting costs here; what speculation gains comes from the real pair's acceptance on the CPU
(tools/bench_tree_acceptance.py) combined with the pass and drafting times measured here
(``draft_round_ms_graphs``: one drafting round by tree budget; tools/project_e2e.py combines them).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_offload import h2d_bandwidth, time_pass  # noqa: E402
from random_models import SSM_SHAPE, build, random_resident  # noqa: E402
from bench_peers import _flexgen_tokenizer, accelerate_model, flexgen_decode, ours_decode  # noqa: E402

PROMPT, NEW = 64, 16


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def hf_generate_tps(model, assistant=None, runs: int = 2) -> float:
    ids = torch.randint(3, 1000, (1, PROMPT), device="cuda")
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    if assistant is not None:
        kw["assistant_model"] = assistant
    out = []
    with torch.no_grad():
        for _ in range(runs):
            times = []
            for n in (1, NEW):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            out.append((NEW - 1) / (times[1] - times[0]))
    return statistics.median(out)


def random_ssm(dtype=torch.float16):
    return random_resident(SSM_SHAPE, "cuda", dtype)


def engine_tps(llm, ssms, tree, runs: int = 3, ssm_static: bool | None = None) -> dict:
    from offload_infer.engine import Engine, GenerationStats

    engine = Engine(llm, ssms, tree, max_sequence_length=512, ssm_static=ssm_static)
    for d in engine.drafters:
        d.capture_graphs()
    prompt = torch.randint(3, 1000, (PROMPT,)).tolist()
    rates, stats = [], None
    for _ in range(runs):
        stats = GenerationStats()
        it = engine.generate(prompt, NEW, stats=stats)
        first = next(it)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = len(first) + sum(len(s) for s in it)
        torch.cuda.synchronize()
        rates.append((n - len(first)) / (time.perf_counter() - t0))
    return {"tokens_per_s": statistics.median(rates), "tokens_per_pass": stats.as_dict()["tokens_per_pass_mean"],
            "ssm_calls_mean": stats.as_dict()["ssm_calls_mean"]}


def ssm_forward_ms(ssm, sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256), runs: int = 7) -> dict:
    out = {}
    for n in sizes:
        cache = ssm.new_cache(PROMPT + n + 8)
        ssm.forward(torch.randint(0, 1000, (PROMPT,)), torch.arange(PROMPT), cache)
        cache.commit_all()
        mask = torch.ones(n, PROMPT + n, dtype=torch.bool)
        times = []
        for _ in range(runs + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ssm.forward(torch.randint(0, 1000, (n,)), PROMPT + torch.arange(n), cache, mask).argmax(-1).tolist()
            times.append(time.perf_counter() - t0)
            cache.rollback()
        out[n] = 1e3 * statistics.median(times[1:])
    return out


def draft_round_ms(ssm, budgets=(1, 4, 16, 64, 256), static: bool = True, runs: int = 7, max_len: int = 512) -> dict:
    """Wall time of one drafting round (an SSM forward plus the tree bookkeeping around it) when growing
    a best-first tree of each budget: median draft time / SSM calls, after two warm-up drafts."""
    from offload_infer.speculate import Drafter, TreeConfig

    out = {}
    for b in budgets:
        tree_cfg = TreeConfig(budget=b, max_depth=12)
        d = Drafter(ssm, ssm.vocab_size, tree_cfg, -(-(max_len + tree_cfg.pending_slots() + 1) // 16) + 1, 16,
                    static=static)
        d.capture_graphs([1], [256])
        st = d.admit(max_len, torch.randint(3, 1000, (PROMPT,)).tolist())
        per_round, captured = [], 0
        for r in range(runs + 2):
            if r == 2:  # the warm-up drafts captured what they needed (the prompt's round, too)
                captured = d.graphs_captured
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tree = d.draft([st], [12], [b])[0]
            torch.cuda.synchronize()
            if r >= 2:
                per_round.append((time.perf_counter() - t0) / st.calls)
            d.commit([(st, [], tree.tokens[-1])])  # drop the tree, queue one token: the next draft starts like a pass's
        assert d.graphs_captured == captured, "a graph was captured while timing"
        out[b] = 1e3 * statistics.median(per_round)
    return out


def peers_ab(shape: str, reserve: str, row) -> None:
    """Rows (a) and (b): transformers + accelerate offloading, alone and with assisted generation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf, _ = accelerate_model(shape, reserve)
    row(system="a", desc="transformers+accelerate", precision="fp16", tokens_per_s=hf_generate_tps(hf))
    d = dict(SSM_SHAPE)
    assistant = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d),
                                                 dtype=torch.float16).cuda().eval()
    row(system="b", desc="transformers assisted generation + accelerate", precision="fp16",
        tokens_per_s=hf_generate_tps(hf, assistant))
    del hf, assistant
    _free()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--reserve", default="4GiB")
    ap.add_argument("--flexgen", default="opt-6.7b")
    ap.add_argument("--budgets", default="16,64")
    ap.add_argument("--precisions", default="fp16,int8,int4", help="for offload-infer's rows (c) and (d)")
    ap.add_argument("--skip-peers", action="store_true", help="only offload-infer's rows (c) and (d)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from offload_infer.offload import parse_size
    from offload_infer.speculate import TreeConfig

    reserve = parse_size(args.reserve.replace("iB", ""))
    res = {"device": torch.cuda.get_device_name(), "shape": args.shape, "reserve": args.reserve, "rows": []}
    print(f"device: {res['device']}, pinned H2D {h2d_bandwidth() / 1e9:.1f} GB/s", flush=True)

    def row(**r):
        res["rows"].append(r)
        print(json.dumps(r), flush=True)

    ssm = random_ssm()
    res["ssm_forward_ms"] = ssm_forward_ms(ssm)
    print("SSM (Qwen2.5-0.5B shape) eager forward ms by tokens:", res["ssm_forward_ms"], flush=True)
    for static in (True, False):
        key = "draft_round_ms_" + ("graphs" if static else "eager")
        res[key] = draft_round_ms(ssm, static=static)
        print(f"drafting round ms by budget ({key[15:]}):", res[key], flush=True)

    if not args.skip_peers:
        peers_ab(args.shape, args.reserve, row)

    for precision in args.precisions.split(","):
        llm, plan, _ = build(args.shape, precision, reserve)
        row(system="c", desc="offload-infer incremental", precision=precision,
            **engine_tps(llm, [], TreeConfig()), pass_ms_1=1e3 * time_pass(llm, 1, 5))
        for b in (int(x) for x in args.budgets.split(",")):
            row(system="d", desc=f"offload-infer token tree, budget {b}", precision=precision,
                **engine_tps(llm, [ssm], TreeConfig(budget=b, max_depth=12)))
        row(system="d", desc=f"offload-infer token tree, budget {b}, eager SSM", precision=precision,
            **engine_tps(llm, [ssm], TreeConfig(budget=b, max_depth=12), ssm_static=False))
        row(system="d", desc=f"offload-infer token tree, budget auto (up to {b})", precision=precision,
            **engine_tps(llm, [ssm], TreeConfig(budget=b, auto=True, max_depth=12)))
        del llm
        _free()

    if not args.skip_peers:
        with tempfile.TemporaryDirectory() as wd:
            _flexgen_tokenizer(wd)
            for shape in filter(None, args.flexgen.split(",")):
                for precision in ("fp16", "int4"):
                    f = flexgen_decode(shape, precision == "int4", wd)
                    row(system="e", desc="FlexGen", shape=shape, precision=precision,
                        tokens_per_s=f.get("tokens_per_s"))
                    o = ours_decode(shape, precision, None)
                    row(system="c", desc="offload-infer incremental", shape=shape, precision=precision,
                        tokens_per_s=o["tokens_per_s"])
        a = next(r["tokens_per_s"] for r in res["rows"] if r["system"] == "a")
        print("\nratios to (a) transformers+accelerate:")
        for r in res["rows"]:
            if r.get("tokens_per_s") and "shape" not in r:
                print(f"  ({r['system']}) {r['desc']:<45} {r['precision']:<5} {r['tokens_per_s']:8.2f} tok/s  "
                      f"{r['tokens_per_s'] / a:6.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
