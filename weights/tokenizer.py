"""Tokenizers behind one interface: ``tokenizer.json``, SentencePiece ``tokenizer.model``, GPT-2
``vocab.json`` + ``merges.txt`` and the BPE embedded in GGUF files, plus chat templates (Jinja2).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from weights.sources import CheckpointError, gguf_field

# Pre-tokenizer split patterns of the BPE vocabularies we rebuild from GGUF (llama.cpp's "pre" names).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT}
# Tokens that end a turn in common chat formats; counted as end-of-sequence when they are special.
_END_OF_TURN = {"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>"}


class Tokenizer:
    """``encode``/``decode`` plus the special ids and chat template a generator needs."""

    def __init__(
        self,
        backend,
        *,
        bos_id: int | None,
        eos_ids: set[int],
        add_bos: bool,
        chat_template: str | None,
        bos_token: str = "",
        eos_token: str = "",
    ) -> None:
        self._backend = backend
        self._sp = not isinstance(backend, HFTokenizer)
        self.bos_id = bos_id
        self.eos_ids = set(eos_ids)
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        if chat_template is not None:
            self._environment().from_string(chat_template)  # a broken template is refused when loaded

    @staticmethod
    def _environment():
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
        return env

    # -- encode / decode ------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._sp:
            ids = list(self._backend.encode(text))
        else:
            ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._sp:
            if skip_special_tokens:
                ids = [i for i in ids if not self._backend.is_control(i)]
            return self._backend.decode(ids)
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_piece_size() if self._sp else self._backend.get_vocab_size(with_added_tokens=True)

    def token_strings(self) -> list[str]:
        """Token text by id (``""`` for unused ids): what two models must share to speculate for each other."""
        if self._sp:
            return [self._backend.id_to_piece(i) for i in range(self._backend.get_piece_size())]
        vocab = self._backend.get_vocab(with_added_tokens=True)
        out = [""] * (max(vocab.values()) + 1 if vocab else 0)
        for tok, i in vocab.items():
            out[i] = tok
        return out

    def save(self, d: Path) -> None:
        """Write the tokenizer so that ``load_tokenizer(d)`` rebuilds it (same ids, specials, template)."""
        d = Path(d)
        if self._sp:
            (d / "tokenizer.model").write_bytes(self._backend.serialized_model_proto())
        else:
            self._backend.save(str(d / "tokenizer.json"))
        cfg = {"bos_token": self.bos_token or None, "eos_token": self.eos_token or None,
               "add_bos_token": self.add_bos, "chat_template": self.chat_template}
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": sorted(self.eos_ids),
                                                              "bos_token_id": self.bos_id}, indent=2))

    # -- chat -----------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; use --no-chat")
        return self._environment().from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            tools=None,
        )

    def encode_prompt(self, prompt: str, chat: bool) -> list[int]:
        """Token ids for a user prompt, wrapped in the chat template when ``chat``."""
        if chat:
            return self.encode_messages([{"role": "user", "content": prompt}])
        return self.encode(prompt)

    def encode_messages(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation through the chat template."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        # templates write their own BOS, as transformers' apply_chat_template(tokenize=True) assumes
        return self.encode(text, add_special_tokens=False)


# -- loaders ------------------------------------------------------------------------------------------
def _token_content(tok) -> str | None:
    if tok is None or isinstance(tok, str):
        return tok
    return tok.get("content")


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a {type(data).__name__}")
    return data


def _eos_from_config(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, list) else {int(value)}


def has_tokenizer(path: Path) -> bool:
    path = Path(path)
    if path.is_file():
        return True
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def load_tokenizer(path: Path, model_config: dict | None = None) -> Tokenizer:
    """From a directory (or a ``tokenizer.json``/``tokenizer.model`` file), with the special ids and
    chat template of ``tokenizer_config.json``, ``generation_config.json`` and the model config. Any
    failure is a CheckpointError naming the file."""
    try:
        return _load_tokenizer(Path(path), model_config)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - the tokenizers/sentencepiece/jinja2 libraries raise many kinds
        raise tokenizer_error(path, e) from None


def tokenizer_error(path: Path, e: Exception) -> CheckpointError:
    from jinja2.exceptions import TemplateSyntaxError

    what = "its chat template does not compile" if isinstance(e, TemplateSyntaxError) else "it cannot be loaded"
    return CheckpointError(f"tokenizer at {path}: {what} ({type(e).__name__}: {e})")


def _load_tokenizer(path: Path, model_config: dict | None) -> Tokenizer:
    if path.suffix == ".gguf":
        from weights.sources import open_gguf

        return tokenizer_from_gguf(open_gguf(path), path)
    d = path if path.is_dir() else path.parent
    tcfg = _read_json(d / "tokenizer_config.json")
    smap = _read_json(d / "special_tokens_map.json")
    gen = _read_json(d / "generation_config.json")
    mcfg = model_config or _read_json(d / "config.json")
    bos_tok = _token_content(tcfg.get("bos_token") or smap.get("bos_token"))
    eos_tok = _token_content(tcfg.get("eos_token") or smap.get("eos_token"))
    add_bos = tcfg.get("add_bos_token")

    if path.is_file() and path.name.endswith(".json") or (d / "tokenizer.json").exists() and path.is_dir():
        backend = HFTokenizer.from_file(str(path if path.is_file() else d / "tokenizer.json"))
        to_id = backend.token_to_id
        # the post-processor usually adds BOS itself; encode() never adds a second one
        add_bos = bool(add_bos)
    elif path.suffix == ".model" or (d / "tokenizer.model").exists():
        import sentencepiece as spm

        backend = spm.SentencePieceProcessor(model_file=str(path if path.is_file() else d / "tokenizer.model"))
        to_id = lambda t: (i if (i := backend.piece_to_id(t)) != backend.unk_id() or t == "<unk>" else None)  # noqa: E731
        bos_tok = bos_tok or (backend.id_to_piece(backend.bos_id()) if backend.bos_id() >= 0 else None)
        eos_tok = eos_tok or (backend.id_to_piece(backend.eos_id()) if backend.eos_id() >= 0 else None)
        add_bos = True if add_bos is None else add_bos
    elif (d / "vocab.json").exists() and (d / "merges.txt").exists():
        backend = HFTokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        specials = [t for t in {bos_tok, eos_tok, _token_content(smap.get("unk_token")),
                                _token_content(smap.get("pad_token"))} if t]
        added = _read_json(d / "added_tokens.json")
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*specials, *added]])
        to_id = backend.token_to_id
        add_bos = (mcfg.get("model_type") == "opt") if add_bos is None else add_bos
    else:
        raise CheckpointError(
            f"no tokenizer found at {path}: expected tokenizer.json, tokenizer.model or vocab.json + merges.txt"
        )
    bos_id = to_id(bos_tok) if bos_tok else mcfg.get("bos_token_id")
    eos_ids = _eos_from_config(gen.get("eos_token_id")) | _eos_from_config(mcfg.get("eos_token_id"))
    if eos_tok and to_id(eos_tok) is not None:
        eos_ids.add(to_id(eos_tok))
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{d / 'tokenizer_config.json'}: chat_template must be a string, found "
                              f"{type(template).__name__}")
    if template is None and (d / "chat_template.jinja").exists():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    return Tokenizer(backend, bos_id=bos_id, eos_ids=eos_ids, add_bos=bool(add_bos), chat_template=template,
                     bos_token=bos_tok or "", eos_token=eos_tok or "")


def tokenizer_from_gguf(reader, path: Path) -> Tokenizer:
    """Rebuild the byte-level BPE tokenizer that llama.cpp stores in GGUF metadata."""
    kind = gguf_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens: list[str] = gguf_field(reader, "tokenizer.ggml.tokens")
    merges: list[str] = gguf_field(reader, "tokenizer.ggml.merges") or []
    types: list[int] = gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = HFTokenizer(
        models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], fuse_unk=False, byte_fallback=False)
    )
    split = _SPLITS.get(gguf_field(reader, "tokenizer.ggml.pre"))
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
        )
    elif gguf_field(reader, "tokenizer.ggml.pre") == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # 3 = control, 4 = user-defined: match them whole, before BPE
    specials = [AddedToken(t, special=(ty == 3), normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)]
    backend.add_tokens(specials)
    bos_id = gguf_field(reader, "tokenizer.ggml.bos_token_id")
    eos_ids = {int(gguf_field(reader, k)) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
               if gguf_field(reader, k) is not None}
    eos_ids |= {i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3 and t in _END_OF_TURN}
    return Tokenizer(
        backend,
        bos_id=None if bos_id is None else int(bos_id),
        eos_ids=eos_ids,
        add_bos=bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
        chat_template=gguf_field(reader, "tokenizer.chat_template"),
        bos_token=tokens[int(bos_id)] if bos_id is not None else "",
        eos_token=tokens[int(gguf_field(reader, "tokenizer.ggml.eos_token_id"))]
        if gguf_field(reader, "tokenizer.ggml.eos_token_id") is not None else "",
    )
