"""The high-level API: ``from offload_infer import LLM, SamplingParams``."""

from __future__ import annotations

import pytest
import torch

from offload_infer import LLM, SamplingParams
from offload_infer.cli_options import device_of, dtype_for
from offload_infer.engine import Engine
from offload_infer.speculate import VocabularyMismatchError
from tests.conftest import swapped_vocab_copy


@pytest.fixture(scope="module")
def llm(tiny_dirs):
    return LLM(str(tiny_dirs["llama"][0]), ssm=str(tiny_dirs["llama"][0]), max_sequence_length=128)


def test_defaults_device_dtype_and_eos(llm, monkeypatch):
    assert llm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_of("auto").type == "cuda" and dtype_for(torch.device("cuda")) == torch.float16
    assert dtype_for(torch.device("cpu")) == torch.float32 and dtype_for(torch.device("cuda"), True) == torch.float32
    assert llm.engine.eos_ids == frozenset(llm.tokenizer.eos_ids) and llm.engine.eos_ids


def test_generate_chat_and_stream_agree_with_the_engine(llm):
    params = SamplingParams(max_new_tokens=12)
    res = llm.generate(["The quick brown", "def add(a, b):"], params)
    plain = Engine(llm.engine.llm, max_sequence_length=128, eos_ids=llm.tokenizer.eos_ids)
    for r, p in zip(res, ["The quick brown", "def add(a, b):"]):
        ref = [t for s in plain.generate(llm.tokenizer.encode(p), 12) for t in s]
        assert r.token_ids == ref and r.text == llm.tokenizer.decode(ref)
        assert r.finish_reason in ("eos", "length") and r.time_to_first_token_s > 0 and r.stats["llm_passes"] >= 1
    assert "".join(llm.stream("The quick brown", params)) == res[0].text
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    reply = llm.chat(msgs, params)
    assert reply.prompt_token_ids == llm.tokenizer.encode_messages(msgs)
    assert "".join(llm.stream(msgs, params)) == reply.text
    assert llm.generate("hi", params, system="be brief")[0].token_ids == reply.token_ids


def test_the_same_checks_as_the_cli(tiny_dirs, tmp_path):
    other = swapped_vocab_copy(tiny_dirs["qwen2"][0], tmp_path / "other")
    with pytest.raises(VocabularyMismatchError, match="disagree on token"):
        LLM(str(tiny_dirs["llama"][0]), ssm=str(other))
    with pytest.raises(ValueError, match="unknown quantization"):
        LLM(str(tiny_dirs["llama"][0]), quantization="int3")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        LLM(str(tiny_dirs["llama"][0]), max_sequence_length=100000)
    q = LLM(str(tiny_dirs["llama"][0]), quantization="int8", reserve="1G", max_sequence_length=64)
    assert q.options.offload and q.options.quant_codec == "int8-row"
    assert q.generate("The quick", SamplingParams(max_new_tokens=4))[0].token_ids
