"""Checkpoint formats and the errors a user sees for bad ones."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import build_hf, llama_cfg
from weights.load import load_model
from weights.resolve import resolve
from weights.sources import CheckpointError
from offload_infer.models import UnsupportedModelError


def _logits(d, **kw):
    m = load_model(resolve(str(d), **kw) if kw else resolve(str(d)), progress=False).model
    return m.forward(torch.arange(3, 13), torch.arange(10), m.new_cache(16))


@pytest.fixture(scope="module")
def hf_llama():
    return build_hf(llama_cfg(), seed=3)


def _ref(hf):
    with torch.no_grad():
        return hf(torch.arange(3, 13)[None]).logits[0]


def test_sharded_safetensors(tmp_path, hf_llama):
    hf_llama.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    torch.testing.assert_close(_logits(tmp_path), _ref(hf_llama), atol=1e-4, rtol=1e-4)


def test_legacy_bin(tmp_path, hf_llama):
    hf_llama.config.save_pretrained(tmp_path)
    torch.save(hf_llama.state_dict(), tmp_path / "pytorch_model.bin")
    torch.testing.assert_close(_logits(tmp_path), _ref(hf_llama), atol=1e-4, rtol=1e-4)


def test_split_paths(tmp_path, hf_llama, tiny_tokenizer_dir):
    weights, cfg = tmp_path / "w", tmp_path / "cfg" / "config.json"
    hf_llama.save_pretrained(weights)
    cfg.parent.mkdir()
    shutil.move(weights / "config.json", cfg)
    r = resolve(None, str(weights), str(cfg), str(tiny_tokenizer_dir / "tokenizer.json"))
    m = load_model(r, progress=False)
    out = m.model.forward(torch.arange(3, 13), torch.arange(10), m.model.new_cache(16))
    torch.testing.assert_close(out, _ref(hf_llama), atol=1e-4, rtol=1e-4)
    assert m.tokenizer.encode("fox")[0] == 1


def test_truncated_safetensors_names_file(tmp_path, hf_llama):
    hf_llama.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_model(resolve(str(tmp_path)), progress=False)


def test_corrupt_header(tmp_path, hf_llama):
    hf_llama.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(resolve(str(tmp_path)), progress=False)


def test_missing_tensor_and_shape_mismatch(tmp_path, hf_llama):
    sd = {k: v.clone() for k, v in hf_llama.state_dict().items()}
    hf_llama.config.save_pretrained(tmp_path)
    missing = dict(sd)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors: model.layers.1.mlp.up_proj.weight"):
        load_model(resolve(str(tmp_path)), progress=False)
    bad = dict(sd)
    bad["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 32)
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors.*q_proj.weight.*\(16, 32\).*\(32, 32\)"):
        load_model(resolve(str(tmp_path)), progress=False)
    extra = dict(sd)
    extra["model.layers.0.surprise.weight"] = torch.zeros(2)
    save_file(extra, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not use: model.layers.0.surprise.weight"):
        load_model(resolve(str(tmp_path)), progress=False)


def test_unknown_model_type_lists_supported(tmp_path, hf_llama):
    hf_llama.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="'mamba'.*llama.*opt.*qwen2"):
        load_model(resolve(str(tmp_path)), progress=False)
    # --llm-model overrides it, case-insensitively
    out = load_model(resolve(str(tmp_path)), model_type="LLaMA", progress=False).model
    torch.testing.assert_close(out.forward(torch.arange(3, 13), torch.arange(10), out.new_cache(16)),
                               _ref(hf_llama), atol=1e-4, rtol=1e-4)


def test_missing_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve(str(tmp_path / "nope.gguf"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights found"):
        resolve(str(tmp_path))


def test_hub_unreachable_is_clear(monkeypatch):
    import huggingface_hub

    def boom(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", boom)
    with pytest.raises(CheckpointError, match="cannot get 'someone/some-model'.*offline models"):
        resolve("someone/some-model")


def test_hub_downloads_only_needed_files(monkeypatch, tmp_path, hf_llama):
    import huggingface_hub

    hf_llama.save_pretrained(tmp_path)
    seen = {}
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: ["config.json", "model.safetensors"])

    def fake_snapshot(repo, allow_patterns):
        seen["patterns"] = allow_patterns
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    r = resolve("org/tiny")
    assert r.kind == "safetensors" and "*.safetensors" in seen["patterns"]
    assert not any("bin" in p for p in seen["patterns"])
