"""The real SmolLM2-135M-Instruct GGUF (fetched through pip) against transformers' own GGUF loading."""

from __future__ import annotations

import pytest
import torch

from offload_infer.engine import Engine
from offload_infer.requests import RequestManager
from weights.load import load_model
from weights.resolve import resolve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return load_model(resolve(str(smollm2_path)), progress=False)


def test_logits_match_transformers_gguf(smol, smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                              dtype=torch.float32).eval()
    hft = AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    text = "Hello! 12345 The quick brown fox jumps over the lazy dog.\n  def f(x): return x"
    ids = smol.tokenizer.encode(text)
    assert ids == hft(text)["input_ids"]
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ref_ids = hft.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    ref_ids = list(ref_ids["input_ids"] if hasattr(ref_ids, "keys") else ref_ids)
    assert smol.tokenizer.encode_prompt("What is the capital of France?", chat=True) == ref_ids
    with torch.no_grad():
        ref = hf(torch.tensor([ref_ids])).logits[0]
    ours = smol.model.forward(torch.tensor(ref_ids), torch.arange(len(ref_ids)), smol.model.new_cache(64))
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-3)


def test_answers_paris(smol):
    engine = Engine(smol.model, max_sequence_length=256, eos_ids=smol.tokenizer.eos_ids)
    rm = RequestManager(engine, smol.tokenizer, chat=True, max_new_tokens=24)
    rm.register_new_request("What is the capital of France?")
    (res,) = rm.serve()
    assert "Paris" in res["output_text"]
    assert res["output_token_ids"][-1] in smol.tokenizer.eos_ids
