"""Bad inputs and faults through the real CLI (subprocesses): each one fails with a line that names the
culprit, never a traceback, and leaves every input file as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import swapped_vocab_copy

# (arguments, a substring the error names, case-insensitive); {d} a tiny model, {t} a scratch directory
CASES = [
    (["generate", "hi", "-m", "{d}", "--temperature", "-1"], "--temperature"),
    (["generate", "hi", "-m", "{d}", "--top-p", "0"], "top_p"),
    (["generate", "hi", "-m", "{d}", "--top-p", "1.5"], "--top-p"),
    (["generate", "hi", "-m", "{d}", "--top-k", "-1"], "--top-k"),
    (["generate", "hi", "-m", "{d}", "-n", "0"], "--max-new-tokens"),
    (["generate", "hi", "-m", "{d}", "-n", "many"], "--max-new-tokens"),
    (["generate", "hi", "-m", "{d}", "-c", "1"], "--max-sequence-length"),
    (["generate", "hi", "-m", "{d}", "-c", "100000"], "context"),
    (["generate", "hi", "-m", "{d}", "--seed", "-1"], "--seed"),
    (["generate", "hi", "-m", "{d}", "--repetition-penalty", "0"], "repetition_penalty"),
    (["generate", "hi", "-m", "{d}", "--tree-budget", "0"], "budget"),
    (["generate", "hi", "-m", "{d}", "--tree-budget", "lots"], "--tree-budget"),
    (["generate", "hi", "-m", "{d}", "--max-tree-budget", "0"], "--max-tree-budget"),
    (["generate", "hi", "-m", "{d}", "--expansion", "1,x"], "expansion"),
    (["generate", "hi", "-m", "{d}", "--expansion", "0,1"], "expansion"),
    (["generate", "hi", "-m", "{d}", "--tree-budget", "auto", "--expansion", "1,2"], "expansion"),
    (["generate", "hi", "-m", "{d}", "--max-depth", "0"], "--max-depth"),
    (["generate", "hi", "-m", "{d}", "--offload", "--quant-block-size", "0"], "--quant-block-size"),
    (["generate", "hi", "-m", "{d}", "--offload", "--quant-codec", "int3"], "int3"),
    (["generate", "hi", "-m", "{d}", "--4bit-quantization"], "--offload"),
    (["generate", "hi", "-m", "{d}", "--offload", "--4bit-quantization", "--8bit-quantization"], "choose one"),
    (["generate", "hi", "-m", "{d}", "--offload", "--offload-reserve-space-size", "lots"], "size"),
    (["generate", "hi", "-m", "{d}", "--offload", "--offload-reserve-space-size", "1K"], "too small"),
    (["generate", "hi", "-m", "{d}", "--offload", "--offload-ring-slots", "0"], "--offload-ring-slots"),
    (["generate", "hi", "-m", "{d}", "--max-batch-size", "0"], "--max-batch-size"),
    (["generate", "hi", "-m", "{d}", "--max-batch-tokens", "0"], "--max-batch-tokens"),
    (["generate", "hi", "-m", "{d}", "--max-batch-size", "8", "--max-batch-tokens", "4"], "--max-batch-tokens"),
    (["generate", "hi", "-m", "{d}", "--kv-cache-size", "1K"], "less than one block"),
    (["generate", "hi", "-m", "{d}", "--kv-cache-size", "lots"], "size"),
    (["generate", "hi", "-m", "{d}", "--device", "cuda:7"], "cuda"),
    (["generate", "hi", "-m", "{d}", "--device", "tpu"], "tpu"),
    (["generate", "hi", "-m", "{t}/missing-dir/"], "missing-dir"),
    (["generate", "hi", "-m", "{t}/missing.gguf"], "missing.gguf"),
    (["generate", "hi", "-m", "{t}/text.gguf"], "text.gguf"),
    (["generate", "hi", "-m", "{d}", "--llm-model", "gpt5"], "gpt5"),
    (["generate", "hi", "-m", "{d}", "--ssm", "{t}/no-such-ssm"], "no-such-ssm"),
    (["generate", "hi", "-m", "{d}", "--ssm", "{t}/other-vocab"], "disagree"),
    (["generate", "-f", "{t}/missing.json", "-m", "{d}"], "--prompt-file"),
    (["generate", "-f", "{t}/numbers.json", "-m", "{d}"], "prompt"),
    (["generate", "-f", "{t}/empty.txt", "-m", "{d}"], "empty"),
    (["generate", "", "-m", "{d}", "--no-chat"], "empty"),
    (["generate", "hi", "-f", "{t}/prompts.json", "-m", "{d}"], "not both"),
    (["generate", "hi", "-p", "hello", "-m", "{d}"], "once"),
    (["generate", "-m", "{d}"], "prompt"),
    (["generate", "hi", "-m", "{d}", "--output-file", "{d}/config.json"], "overwrite"),
    (["generate", "hi", "-m", "{d}", "--output-file", "{t}/no/such/dir/out.json"], "does not exist"),
    (["generate", "hi", "-m", "{d}", "--output-file", "{t}"], "directory"),
    (["generate", "-f", "{t}/prompts.json", "-m", "{d}", "--stats-file", "{t}/prompts.json"], "overwrite"),
    (["generate", "hi", "--llm-weight", "{d}"], "--llm-config"),
    (["generate", "hi", "--llm-weight", "{d}", "--llm-config", "{t}/nope.json"], "nope.json"),
    (["generate", "hi", "-m", "{d}", "--tokenizer", "{t}/no-tokenizer"], "no-tokenizer"),
    (["generate", "hi", "-m", "{d}", "--no-chat", "--system", "be brief"], "--system"),
    (["generate", "hi", "-m", "{t}/no-template", "--chat"], "chat template"),
    (["generate", "hi", "-m", "{d}", "--stop", ""], "stop"),
    (["generate", "hi", "-m", "{t}/config-list"], "json object"),
    (["generate", "hi", "-m", "{t}/config-type"], "num_hidden_layers"),
    (["generate", "hi", "-m", "{t}/config-broken"], "config.json"),
    (["generate", "hi", "-m", "{t}/tokenizer-corrupt"], "tokenizer"),
    (["generate", "hi", "-m", "{t}/template-broken"], "chat template"),
    (["generate", "hi", "-m", "{t}/weights-truncated"], "truncated"),
    (["generate", "hi", "-m", "{t}/weights-garbage"], "safetensors"),
    (["generate", "hi", "-m", "{t}/weights-missing"], "weights-missing"),
    (["generate", "hi", "-m", "{t}/weights-wrong-shape"], "shape"),
    (["compress", "{d}", "--out", "{t}/c1", "--bits", "3"], "--bits"),
    (["compress", "{d}", "--out", "{t}/c2", "--codec", "int3"], "int3"),
    (["compress", "{d}", "--out", "{t}/c3", "--dtype", "int8"], "dtype"),
    (["compress", "{d}", "--out", "{d}", "--force"], "overlaps"),
    (["compress", "{d}", "--out", "{t}/nonempty"], "--force"),
    (["compress", "--out", "{t}/c4"], "model"),
    (["compress", "{d}", "-m", "{d}", "--out", "{t}/c5"], "once"),
    (["models", "fetch", "gpt-5-turbo"], "unknown model"),
    (["serve", "-m", "{d}", "--port", "70000"], "--port"),
    (["chat", "-m", "{t}/no-template"], "chat template"),
]


def _sha(path) -> dict:
    if path.is_dir():
        return {p.name: _sha(p) for p in sorted(path.iterdir())}
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def scratch(tiny_dirs, tmp_path_factory):
    t = tmp_path_factory.mktemp("bad")
    d = tiny_dirs["llama"][0]

    def variant(name: str):
        v = t / name
        shutil.copytree(d, v)
        return v

    (t / "text.gguf").write_text("not a gguf file")
    (t / "numbers.json").write_text("[1, 2]")
    (t / "empty.txt").write_text("")
    (t / "prompts.json").write_text('["a", "b"]')
    (t / "nonempty").mkdir()
    (t / "nonempty" / "keep.txt").write_text("keep me")
    swapped_vocab_copy(tiny_dirs["qwen2"][0], t / "other-vocab")
    v = variant("no-template")
    cfg = json.loads((v / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (v / "tokenizer_config.json").write_text(json.dumps(cfg))
    (variant("config-list") / "config.json").write_text("[1, 2]")
    v = variant("config-type")
    cfg = json.loads((v / "config.json").read_text())
    (v / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": "two"}))
    (variant("config-broken") / "config.json").write_text('{"model_type": "llama", ')
    (variant("tokenizer-corrupt") / "tokenizer.json").write_text('{"model": 3')
    v = variant("template-broken")
    cfg = json.loads((v / "tokenizer_config.json").read_text())
    (v / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "{% for m in messages %}{{ m }"}))
    v = variant("weights-truncated")
    data = (v / "model.safetensors").read_bytes()
    (v / "model.safetensors").write_bytes(data[: len(data) // 2])
    v = variant("weights-garbage")
    (v / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + data[24:])
    (variant("weights-missing") / "model.safetensors").unlink()
    v = variant("weights-wrong-shape")
    cfg = json.loads((v / "config.json").read_text())
    (v / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    return t, d


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offload_infer.cli", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_every_bad_input_is_one_clear_error_and_no_file_changes(scratch):
    t, d = scratch
    assert len(CASES) >= 60
    before = {"t": _sha(t), "d": _sha(d)}
    jobs = [[a.format(d=d, t=t) for a in args] for args, _ in CASES]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(_run, jobs))
    problems = []
    for (args, culprit), job, r in zip(CASES, jobs, results):
        out = r.stdout + r.stderr
        if r.returncode == 0:
            problems.append(f"{args}: exit 0")
        elif "Traceback" in out:
            problems.append(f"{args}: traceback\n{out[-1500:]}")
        elif culprit.lower() not in out.lower():
            problems.append(f"{args}: the message does not name {culprit!r}: {out.strip()[-400:]}")
    assert not problems, "\n".join(problems)
    assert {"t": _sha(t), "d": _sha(d)} == before
