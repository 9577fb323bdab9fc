"""CLI start to first token, on this machine: median of ``--runs`` fresh processes per configuration.

    python tools/bench_startup.py [--runs 3] [--configs demo,qwen-pair]

Each run starts ``offload-infer generate`` as a new process and times the first byte of generated text
on its stdout (imports, model resolution, GGUF reading and dequantization, tokenizer, engine, prefill).
The models must be cached (``offload-infer models fetch demo qwen-1.5b qwen-0.5b``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "demo": ["-m", "demo"],
    "qwen-pair": ["-m", "qwen-1.5b", "--ssm", "qwen-0.5b"],
}


def first_token_s(args: list[str]) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "offload_infer.cli", "generate", "What is the capital of France?", "-n", "8", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - t0
    rest, err = proc.communicate()
    if proc.returncode != 0 or not first.strip():
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return elapsed, err.decode()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--configs", default="demo,qwen-pair")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for name in args.configs.split(","):
        times, log = [], ""
        for _ in range(args.runs):
            t, log = first_token_s(CONFIGS[name])
            times.append(t)
        row = {"config": name, "median_s": statistics.median(times), "runs_s": times,
               "phases": [ln for ln in log.splitlines() if ln.startswith("loaded ")]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
