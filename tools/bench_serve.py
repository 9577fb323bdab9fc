"""The HTTP server under load, on a CUDA GPU: one client against ``generate``, then many streaming clients.

    PYTHONPATH=. python tools/bench_serve.py --shape llama-7b --precision int4 --reserve 4G \
        --clients 1,4,16,64 --new 64 --json out.json

Random weights at the shape, offloaded (``--reserve`` of GPU memory for the LLM's weights), a small
byte-level BPE tokenizer (the weights are random, so any tokenizer within the vocabulary will do),
greedy, EOS ignored (``ignore_eos``, as vLLM's benchmarks do) so every request makes ``--new`` tokens.
Reported: one client's tokens/s through the server against ``Engine.generate`` on the same engine and
prompt (the server's overhead); for each number of concurrent streaming clients (each with its own
prompt of ``--prompt-len`` tokens), the aggregate tokens/s, the per-client tokens/s (median) and the
time to the first token (median and p95). ``--device cpu --shape tiny`` checks the flow on a CPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(__file__))
from random_models import SHAPES, build  # noqa: E402

SHAPES = {**SHAPES, "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=1024)}


def make_tokenizer(root: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from weights.tokenizer import load_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs."] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=min(vocab, 400), special_tokens=["<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(root, "tokenizer.json"))
    with open(os.path.join(root, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    return load_tokenizer(root)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def stream(url: str, prompt: str, new: int) -> tuple[float, float, int]:
    """One streaming completion: (seconds to the first text, seconds in all, tokens)."""
    import httpx

    body = {"model": "bench", "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, n = None, 0
    with httpx.stream("POST", url, json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                n = d["usage"]["completion_tokens"]
            elif first is None and d["choices"] and d["choices"][0]["text"]:
                first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, n  # first: None when no text came at all


def clients(url: str, prompts: list[str], counts: list[int], new: int, out) -> None:
    """The load, in a process of its own: one client three times, then each number of concurrent clients."""
    stream(url, prompts[0], new)  # warm-up: the first request through the HTTP stack
    one = [stream(url, prompts[0], new) for _ in range(5)]
    by_count = {}
    for c in counts:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            got = list(pool.map(lambda p: stream(url, p, new), prompts[:c]))
        by_count[c] = (got, time.perf_counter() - t0)
    out.put((one, by_count))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--reserve", default="4G")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import httpx

    from offload_infer.cli_serve import start_server
    from offload_infer.engine import Engine
    from offload_infer.offload import parse_size

    dev = args.device
    dtype = torch.float16 if dev.startswith("cuda") else torch.float32
    counts = [int(c) for c in args.clients.split(",")]
    llm, plan, _ = build(SHAPES[args.shape], args.precision, parse_size(args.reserve), dtype=dtype, device=dev)
    print(plan.describe(), flush=True)
    wd = tempfile.mkdtemp()
    tok = make_tokenizer(wd, llm.vocab_size)
    # greedy picks only tokens that are text: the rows of <s>, </s> and of ids past the small tokenizer's
    # vocabulary give logit 0, below the largest of the other (random) logits
    head = llm.weights.globals["lm_head.weight"]
    head[:2] = 0
    head[tok.vocab_size :] = 0
    engine = Engine(llm, max_sequence_length=4 * args.prompt_len + args.new, max_batch_size=max(counts),
                    max_batch_tokens=max(2048, max(counts) * args.prompt_len), detokenize=tok.decode)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, tok.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(max(counts))]
    prompts = [tok.decode(p) for p in ids]
    res = {"device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu", "date": time.strftime("%Y-%m-%d"),
           "args": vars(args), "rows": []}

    def timed_generate(p: list[int]) -> float:
        from offload_infer.sampling import SamplingParams

        sid = engine.add_request(p, SamplingParams(max_new_tokens=args.new, ignore_eos=True))
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        dt = time.perf_counter() - t0
        engine.forget(sid)
        return args.new / dt

    timed_generate(tok.encode(prompts[0]))  # warm-up
    gen_rates = [timed_generate(tok.encode(prompts[0])) for _ in range(3)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server, loop = start_server(engine, tok, "bench", "127.0.0.1", port, None, max_waiting=256)
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}/v1/completions"
    for _ in range(100):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health")
            break
        except httpx.HTTPError:
            time.sleep(0.1)

    ctx = multiprocessing.get_context("spawn")  # the clients run in their own process: no GIL shared with the server
    results = ctx.Queue()
    try:
        child = ctx.Process(target=clients, args=(url, prompts, counts, args.new, results))
        child.start()
        one, by_count = results.get(timeout=3600)
        child.join()
        server.should_exit = True
        loop.stop()  # the engine is ours again: generate once more, so drift over the run cancels
        gen_rates += [timed_generate(tok.encode(prompts[0])) for _ in range(3)]
        gen_rate = statistics.median(gen_rates)
        server_rate = statistics.median(n / dt for _, dt, n in one)
        row = {"clients": "one vs generate", "generate_tokens_per_s": gen_rate, "server_tokens_per_s": server_rate,
               "ratio": server_rate / gen_rate}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        for c, (got, wall) in by_count.items():
            ttft = [f for f, _, _ in got if f is not None]
            assert ttft, "no stream produced text"
            row = {"clients": c, "aggregate_tokens_per_s": sum(n for _, _, n in got) / wall,
                   "per_client_tokens_per_s_median": statistics.median(n / dt for _, dt, n in got),
                   "ttft_s_median": statistics.median(ttft), "ttft_s_p95": percentile(ttft, 0.95),
                   "tokens": sum(n for _, _, n in got), "streams_without_text": len(got) - len(ttft)}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.should_exit = True
        loop.stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
