"""``offload-infer serve`` (an OpenAI-compatible HTTP server) and ``offload-infer chat`` (a terminal chat)."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Optional

import typer

from offload_infer import cli_options as opts


def start_server(engine, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, max_waiting: int = 64, default_max_tokens: int = 256):
    """Start the engine loop and return (uvicorn server, engine loop); ``server.run()`` serves until
    ``server.should_exit`` is set (Ctrl-C sets it), then ``loop.stop()`` cancels what is left."""
    import uvicorn

    from offload_infer.api import create_app
    from offload_infer.serving import EngineLoop

    loop = EngineLoop(engine, max_waiting)
    app = create_app(loop, tokenizer, model_name, api_key, default_max_tokens)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    loop.start()
    return uvicorn.Server(config), loop


@opts.model_options()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, help="Require 'Authorization: Bearer KEY' on /v1/ requests."),
    served_model_name: Optional[str] = typer.Option(None, help="Model name clients use (default: --llm)."),
    max_waiting: int = typer.Option(64, min=0, help="Requests that may wait beyond the batch; more get 503."),
    default_max_tokens: int = typer.Option(256, min=1, help="Tokens a request may generate when it names no max_tokens."),
    mo: opts.ModelOptions = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (chat and text completions, streaming)."""
    try:
        engine, tok = opts.build_engine(mo, mo.max_batch_size)
    except (ValueError, OSError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    name = served_model_name or mo.llm
    server, loop = start_server(engine, tok, name, host, port, api_key, max_waiting, default_max_tokens)
    if api_key is None:
        typer.echo("warning: no --api-key: the server is unauthenticated", err=True)
    typer.echo(f"offload-infer: serving {name!r} at http://{host}:{port}/v1 (Ctrl-C stops)", err=True)
    try:
        server.run()
    finally:
        loop.stop()
        typer.echo("offload-infer: stopped; in-flight requests were cancelled", err=True)


@opts.model_options(batching=False)
def chat(
    system: Optional[str] = typer.Option(None, help="System prompt."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", min=1, help="Most tokens per answer."),
    temperature: float = opts.TEMPERATURE,
    top_p: float = opts.TOP_P,
    top_k: int = opts.TOP_K,
    repetition_penalty: float = opts.REPETITION_PENALTY,
    seed: Optional[int] = opts.SEED,
    mo: opts.ModelOptions = None,
) -> None:
    """Chat in the terminal (/reset clears the conversation, /exit or Ctrl-D ends; Ctrl-C stops an answer)."""
    from offload_infer.chat import ChatSession
    from offload_infer.sampling import SamplingParams

    try:
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, repetition_penalty)
        engine, tok = opts.build_engine(mo, 1)
        session = ChatSession(engine, tok, params, system)
    except (ValueError, OSError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    run_chat(session, sys.stdin, sys.stdout)


def run_chat(session, stdin, stdout) -> None:
    """The chat loop over text streams (the CLI passes the terminal's)."""
    interrupted = threading.Event()
    previous = signal.getsignal(signal.SIGINT)
    is_main = threading.current_thread() is threading.main_thread()

    def on_sigint(*_):
        interrupted.set()

    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            stdout.write("(conversation cleared)\n")
            continue
        if not text:
            continue
        interrupted.clear()
        if is_main:
            signal.signal(signal.SIGINT, on_sigint)  # Ctrl-C ends the answer, not the program
        try:
            session.send(text, lambda piece: (stdout.write(piece), stdout.flush()), interrupted.is_set)
        except ValueError as e:
            stdout.write(f"error: {e}")
        finally:
            if is_main:
                signal.signal(signal.SIGINT, previous)
        stdout.write("\n" if not interrupted.is_set() else " [stopped]\n")
    session.reset()
