"""``--tree-budget auto`` against fixed budgets with the real engine on the CPU and GPU-like step times.

    python tools/emulate_auto_budget.py --eps 0.02,0.05 --noise 0.05

The pair agrees by construction, as in tools/bench_auto_budget.py, at a CPU-sized shape (hidden 1024,
8 layers, vocabulary 32000; the SSM is the LLM's embeddings, first 2 layers and head; the LLM's later
layers have their output projections scaled by ``eps``). Decoding is real (greedy, fp32, so every
configuration decodes the same text); only the seconds are emulated: a step at budget b costs
``pass + per_token * b + draft * b ** 0.8`` seconds (default: the curve measured on the H100 for the
7B shape at int4 with a 1.5 GiB reserve), times ``1 + |N(0, noise)|``. The auto budget is shown those
seconds instead of its own measurements; tokens/s = tokens / emulated seconds.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(__file__))
from random_models import agreeing_weights, ssm_of  # noqa: E402

SHAPE = dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2752, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)


def agreeing_pair(eps: float, ssm_layers: int = 2, head_scale: float = 10.0):
    from offload_infer.models import CausalLM, ModelWeights, ResidentLayers, config_from_dict

    cfg, cpu = config_from_dict(SHAPE), torch.device("cpu")
    glob, layers, kept = agreeing_weights(cfg, eps, ssm_layers, head_scale, cpu, torch.float32,
                                          torch.Generator().manual_seed(1))
    llm = CausalLM(cfg, ModelWeights(glob, ResidentLayers(list(layers))), cpu, torch.float32)
    return llm, ssm_of(SHAPE, glob, kept, cpu, torch.float32)


def main() -> None:
    from offload_infer.engine import Engine, GenerationStats
    from offload_infer.speculate import TreeConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--eps", default="0.03")
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--budgets", default="4,8,16,32,64,128")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--curve", default="0.052,0.0003,0.0006", help="pass, per_token, draft (seconds)")
    args = ap.parse_args()
    base, per_token, draft = (float(x) for x in args.curve.split(","))
    rng = random.Random(0)

    def seconds(b: int) -> float:
        return (base + per_token * b + draft * b**0.8) * (1 + abs(rng.gauss(0, args.noise)))

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 32000, (32,), generator=g).tolist() for _ in range(args.prompts)]
    budgets = [int(b) for b in args.budgets.split(",")]
    for eps in (float(e) for e in args.eps.split(",")):
        llm, ssm = agreeing_pair(eps)

        def run(tree: TreeConfig) -> tuple[float, GenerationStats, list[int]]:
            engine = Engine(llm, [ssm], tree, max_sequence_length=32 + args.new + 1)
            spent = [0.0]
            if engine.auto is not None:
                observe = engine.auto.observe

                def emulated(b, t, path, _measured, *_, **__):
                    s = seconds(b)
                    spent[0] += s
                    observe(b, t, path, s)

                engine.auto.observe = emulated
                observe_plain = engine.auto.observe_plain

                def emulated_plain(_measured):  # a step that drafted nothing costs the pass alone
                    s = seconds(0)
                    spent[0] += s
                    observe_plain(s)
                engine.auto.observe_plain = emulated_plain
            stats, out = GenerationStats(), []
            for p in prompts:
                out += [t for s in engine.generate(p, args.new, stats=stats) for t in s]
            total = spent[0] if engine.auto is not None else sum(seconds(b) for b in stats.budgets)
            return sum(stats.tokens_per_pass) / total, stats, out

        fixed = {b: run(TreeConfig(budget=b, max_depth=16)) for b in budgets}
        auto, stats, out = run(TreeConfig(budget=max(budgets), auto=True, max_depth=16))
        same = all(o == out for _, _, o in fixed.values())
        best = max(fixed, key=lambda b: fixed[b][0])
        print(f"eps {eps}: " + " ".join(f"b={b} {r:.1f}" for b, (r, _, _) in fixed.items())
              + f" | auto {auto:.1f} = {auto / fixed[best][0]:.3f} of best (b={best}); same text: {same}; "
              f"budgets {dict(sorted(Counter(stats.budgets).items()))}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
