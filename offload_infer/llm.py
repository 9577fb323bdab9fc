"""The high-level Python API, in the spirit of vLLM's ``LLM`` and llama-cpp-python's ``Llama``:

    from offload_infer import LLM, SamplingParams
    llm = LLM("qwen-1.5b", ssm="qwen-0.5b", offload=True, quantization="nf4")
    print(llm.chat([{"role": "user", "content": "Write a haiku"}]).text)

It loads through the same path as the CLI (so the same checks: the SSMs' vocabulary, the memory plan),
picks the GPU when there is one (fp16 there, fp32 on the CPU), and stops at the model's EOS unless told
otherwise. ``generate`` serves its prompts batched; ``stream`` yields text as it is decoded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from offload_infer.cli_options import ModelOptions, build_engine
from offload_infer.detok import TextStream
from offload_infer.requests import RequestManager
from offload_infer.sampling import SamplingParams

_CODECS = {"nf4": "nf4", "int4": "nf4", "4bit": "nf4", "fp4": "fp4", "int8": "int8-row", "8bit": "int8-row",
           "int8-row": "int8-row", "int8-block": "int8-block"}


@dataclass
class Result:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str | None  # "eos", "stop", "length"
    time_to_first_token_s: float | None = None
    stats: dict = field(default_factory=dict)  # LLM passes, tokens per pass, acceptance, times


class LLM:
    def __init__(self, model: str = "demo", ssm: str | list[str] | None = None, *, offload: bool = False,
                 reserve: str = "4G", quantization: str | None = None, device: str = "auto",
                 full_precision: bool = False, tree_budget: int | str = 16, max_sequence_length: int | None = None,
                 max_batch_size: int = 8, kv_cache_size: str | None = None, tokenizer: str | None = None) -> None:
        """``model``/``ssm``: hub ids, directories, .gguf files or offline names; ``quantization``: nf4,
        int8 (or any codec name) for the streamed layers (implies ``offload``); ``reserve``: GPU memory for
        the LLM's weights when offloading; ``tree_budget``: speculated tokens per LLM pass, or "auto"."""
        codec = None
        if quantization is not None:
            if quantization not in _CODECS:
                raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(_CODECS)}")
            codec, offload = _CODECS[quantization], True
        ssms = (ssm,) if isinstance(ssm, str) else tuple(ssm or ())
        from pathlib import Path

        self.options = ModelOptions(llm=model, tokenizer=Path(tokenizer) if tokenizer else None, ssm=ssms,
                                    tree_budget=str(tree_budget), max_sequence_length=max_sequence_length,
                                    use_full_precision=full_precision, device=device, offload=offload,
                                    offload_reserve_space_size=reserve, quant_codec=codec,
                                    max_batch_size=max_batch_size, max_batch_tokens=max(2048, max_batch_size),
                                    kv_cache_size=kv_cache_size)
        self.engine, self.tokenizer = build_engine(self.options, max_batch_size)

    @property
    def device(self):
        return self.engine.llm.device

    def _manager(self, params: SamplingParams | None, chat: bool, system: str | None) -> RequestManager:
        if chat and not self.tokenizer.chat_template:
            raise ValueError(f"{self.options.llm} has no chat template")
        return RequestManager(self.engine, self.tokenizer, chat=chat, params=params or SamplingParams(),
                              system=system)

    @staticmethod
    def _result(r: dict) -> Result:
        keep = ("text", "output_text", "output_token_ids", "prompt_token_ids", "finish_reason", "prompt", "guid",
                "time_to_first_token_s")
        return Result(r["output_text"], r["output_token_ids"], r["prompt_token_ids"], r["finish_reason"],
                      r["time_to_first_token_s"], {k: v for k, v in r.items() if k not in keep})

    def generate(self, prompts: str | list[str], params: SamplingParams | None = None, *, chat: bool = False,
                 system: str | None = None) -> list[Result]:
        """Complete each prompt (raw text, or through the chat template with ``chat``), all in one batch."""
        rm = self._manager(params, chat or system is not None, system)
        for p in [prompts] if isinstance(prompts, str) else prompts:
            rm.register_new_request(p)
        return [self._result(r) for r in rm.serve()]

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> Result:
        """The assistant's reply to a conversation of system/user/assistant messages."""
        rm = self._manager(params, True, None)
        rm.register_new_request(self.tokenizer.encode_messages(messages))
        return self._result(rm.serve()[0])

    def stream(self, prompt: str | list[dict[str, str]], params: SamplingParams | None = None) -> Iterator[str]:
        """Text pieces as they are decoded, for a prompt (raw text) or a conversation (a list of messages)."""
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else self.tokenizer.encode_messages(prompt)
        sid = self.engine.add_request(ids, params)
        seq = self.engine.sequence(sid)
        text = TextStream(self.tokenizer, params.stop)
        try:
            while not seq.status.value == "finished":
                for out in self.engine.step():
                    if out.id == sid:
                        piece = text.push(out.new_tokens, out.finished, seq.stop_text if out.finished else None)
                        if piece:
                            yield piece
        finally:
            if seq.status.value != "finished":
                self.engine.abort(sid)
            self.engine.forget(sid)
