"""Tokenizer backends, chat templates and streaming detokenization."""

from __future__ import annotations

import json

import pytest

from offload_infer.detok import StreamDecoder
from tests.conftest import TEXT
from weights.tokenizer import load_tokenizer


def test_tokenizer_json_round_trip_and_specials(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    ids = tok.encode("The quick brown fox")
    assert ids[0] == 1 and tok.decode(ids) == "The quick brown fox"
    assert 2 in tok.eos_ids
    assert tok.encode("fox", add_special_tokens=False)[0] != 1


def test_chat_template(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<s>[user] hi\n[assistant] "
    ids = tok.encode_prompt("hi", chat=True)
    assert ids.count(1) == 1  # the template's BOS only, none added on top


def test_sentencepiece_model(tmp_path):
    import sentencepiece as spm

    (tmp_path / "corpus.txt").write_text(TEXT * 5)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=120, model_type="bpe", bos_id=1, eos_id=2, unk_id=0,
                                   minloglevel=2)
    tok = load_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    ids = tok.encode("the lazy dog")
    assert ids == [1, *sp.encode("the lazy dog")]
    assert tok.decode(ids) == "the lazy dog"
    assert tok.eos_ids == {2}


def test_gpt2_vocab_merges_opt_style(tmp_path, tiny_tokenizer_dir):
    from tokenizers import Tokenizer as HF

    hf = HF.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    model = json.loads(hf.to_str())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "</s>", "eos_token": "</s>"}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt"}))
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("The quick brown fox")
    assert ids[0] == 2  # OPT prepends </s>
    assert ids[1:] == hf.encode("The quick brown fox", add_special_tokens=False).ids
    assert tok.decode(ids) == "The quick brown fox"


def test_stream_decoder_never_emits_broken_utf8(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    text = "東京 🙂 é and more 🙂🙂"
    ids = tok.encode(text, add_special_tokens=False)
    dec = StreamDecoder(tok)
    pieces = [dec.push([i]) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p == "") > 0  # some tokens were held back mid-character


def test_missing_tokenizer_is_clear(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
