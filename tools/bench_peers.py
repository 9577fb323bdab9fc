"""The offloading peers on the same card, in the same run: transformers + accelerate offloading and
FlexGen, next to offload-infer's incremental decoding on the same shapes and budgets.

    PYTHONPATH=. python tools/bench_peers.py --accelerate llama-7b --flexgen opt-6.7b,opt-13b --json out.json

- accelerate: a transformers model at the shape (zero weights: timing does not depend on the values),
  dispatched with ``max_memory={0: reserve, "cpu": ...}``; greedy decoding, seconds per token (median).
- FlexGen 0.1.8: ``flexgen.flex_opt --path _DUMMY_ --percent 0 100 100 0 100 0`` (all weights on the
  CPU), batch 1, prompt 64, 16 new tokens, with and without ``--compress-weight`` (4-bit, group 64);
  its own decode throughput.
- offload-infer: a one-token decoding pass after a 64-token prompt, with every decoder layer streamed
  (the reserve holds only the embeddings, head and ring), fp16 and int4 (NF4); median of 7.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_offload import time_pass  # noqa: E402
from random_models import SHAPES, build  # noqa: E402


def accelerate_model(shape: str, reserve: str):
    """A transformers model at ``shape`` (zero weights), offloaded by accelerate within ``reserve``."""
    from accelerate import dispatch_model, infer_auto_device_map
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(SHAPES[shape])
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.zero_()
    model.eval()
    no_split = [type(model.model.layers[0]).__name__] if hasattr(model, "model") and hasattr(model.model, "layers") \
        else [type(model.model.decoder.layers[0]).__name__]
    dmap = infer_auto_device_map(model, max_memory={0: reserve, "cpu": "110GiB"}, no_split_module_classes=no_split)
    return dispatch_model(model, device_map=dmap), sum(1 for v in dmap.values() if v == 0)


def accelerate_decode(shape: str, reserve: str, new_tokens: int = 6) -> dict:
    model, on_gpu = accelerate_model(shape, reserve)
    ids = torch.randint(0, 1000, (1, 64), device="cuda")
    times = []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    del model, past, out
    gc.collect()
    torch.cuda.empty_cache()
    s = statistics.median(times[1:])
    return {"peer": "accelerate", "shape": shape, "precision": "fp16", "s_per_token": s, "tokens_per_s": 1 / s,
            "modules_on_gpu": on_gpu}


def _flexgen_tokenizer(root: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Paris is the capital city of France."] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(os.path.join(root, "facebook", "opt-30b"))


def flexgen_decode(shape: str, compress: bool, workdir: str) -> dict:
    name = {"opt-6.7b": "facebook/opt-6.7b", "opt-13b": "facebook/opt-13b"}[shape]
    cmd = [sys.executable, "-m", "flexgen.flex_opt", "--model", name, "--path", "_DUMMY_", "--percent", "0", "100",
           "100", "0", "100", "0", "--gpu-batch-size", "1", "--prompt-len", "64", "--gen-len", "16",
           "--offload-dir", os.path.join(workdir, "offload")]
    if compress:
        cmd.append("--compress-weight")
    res = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    m = re.search(r"decode throughput: ([\d.]+)", res.stdout)
    if not m:
        print(res.stdout[-3000:], res.stderr[-3000:], file=sys.stderr)
        return {"peer": "flexgen", "shape": shape, "precision": "int4" if compress else "fp16", "error": True}
    tps = float(m.group(1))
    return {"peer": "flexgen", "shape": shape, "precision": "int4" if compress else "fp16", "tokens_per_s": tps,
            "s_per_token": 1 / tps}


def ours_decode(shape: str, precision: str, reserve: int | None) -> dict:
    from offload_infer.models import config_from_dict
    from offload_infer.offload import make_plan

    if reserve is None:  # stream every layer, like FlexGen with all weights on the CPU
        p = make_plan(config_from_dict(SHAPES[shape]), torch.float16, 1 << 40, {"fp16": None, "int4": "nf4",
                                                                                  "int8": "int8-row"}[precision])
        reserve = p.global_bytes + 2 * p.packed_layer_bytes
    model, plan, _ = build(shape, precision, reserve)
    s = time_pass(model, 1, 7)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"peer": "offload-infer", "shape": shape, "precision": precision, "s_per_token": s, "tokens_per_s": 1 / s,
            "resident_layers": len(plan.resident_layers)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--accelerate", default="llama-7b")
    ap.add_argument("--reserve", default="4GiB")
    ap.add_argument("--flexgen", default="opt-6.7b,opt-13b")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from offload_infer.offload import parse_size

    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    rows = []
    for shape in filter(None, args.accelerate.split(",")):
        for r in (accelerate_decode(shape, args.reserve),
                  ours_decode(shape, "fp16", parse_size(args.reserve.replace("iB", ""))),
                  ours_decode(shape, "int4", parse_size(args.reserve.replace("iB", "")))):
            rows.append(r)
            print(json.dumps(r), flush=True)
    with tempfile.TemporaryDirectory() as wd:
        _flexgen_tokenizer(wd)
        for shape in filter(None, args.flexgen.split(",")):
            for precision in ("fp16", "int4"):
                for r in (flexgen_decode(shape, precision == "int4", wd), ours_decode(shape, precision, None)):
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
