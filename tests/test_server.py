"""The OpenAI-compatible server, started for real on a free port, talked to with the official ``openai``
client and raw HTTP; and the terminal chat's multi-turn session."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from offload_infer import cli_options as opts
from offload_infer.chat import ChatSession
from offload_infer.cli_serve import run_chat, start_server
from offload_infer.engine import Engine
from offload_infer.sampling import SamplingParams

MODEL = "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, d, api_key=None, max_batch_size=8, max_waiting=64, ssm=(), slow=0.0) -> None:
        mo = opts.ModelOptions(llm=str(d), ssm=tuple(str(x) for x in ssm), max_batch_size=max_batch_size,
                               max_sequence_length=200)
        self.engine, self.tok = opts.build_engine(mo, max_batch_size)
        if slow:
            step = self.engine.step
            self.engine.step = lambda: (time.sleep(slow), step())[1]
        self.port = _free_port()
        self.server, self.loop = start_server(self.engine, self.tok, MODEL, "127.0.0.1", self.port, api_key,
                                              max_waiting, default_max_tokens=16)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(200):
            try:
                httpx.get(self.url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        self.free_blocks = self.engine.pool.blocks.free_blocks

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.loop.stop()

    def client(self, key: str = "none"):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def server(tiny_dirs):
    s = Server(tiny_dirs["llama"][0])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(tiny_dirs):
    """Greedy output of a request served alone by a fresh engine."""
    engine, tok = opts.build_engine(opts.ModelOptions(llm=str(tiny_dirs["llama"][0]), max_sequence_length=200), 1)

    def run(ids: list[int], n: int) -> str:
        return tok.decode([t for s in engine.generate(ids, n) for t in s])
    return run, tok


def _wait_idle(server: Server) -> None:
    for _ in range(200):
        if server.loop.in_flight == 0 and server.engine.pool.blocks.free_blocks == server.free_blocks:
            return
        time.sleep(0.05)
    raise AssertionError(f"{server.loop.in_flight} requests still in flight")


def test_health_models_and_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    text = httpx.get(server.url + "/metrics").text
    for name in ("offload_infer_tokens_per_llm_pass", "offload_infer_queue_depth", "offload_infer_running_requests",
                 "offload_infer_tokens_per_second"):
        assert f"\n{name} " in text


def test_chat_equals_generate_and_streams_the_same_text(server, reference):
    run, tok = reference
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "The quick brown fox"}]
    ref = run(tok.encode_messages(msgs), 12)
    c = server.client()
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == ref and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens == len(tok.encode_messages(msgs))
    assert r.model_extra["offload_infer"]["llm_passes"] >= 1
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    _wait_idle(server)


def test_completions_raw_http(server, reference):
    run, tok = reference
    ref = run(tok.encode("def add(a, b):"), 10)
    body = {"model": MODEL, "prompt": "def add(a, b):", "max_tokens": 10, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref
    assert r.json()["usage"]["total_tokens"] == r.json()["usage"]["prompt_tokens"] + r.json()["usage"]["completion_tokens"]
    with httpx.stream("POST", server.url + "/v1/completions", json=body | {"stream": True}) as s:
        lines = [ln for ln in s.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    assert "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-1]) == ref


def test_concurrent_clients_each_get_their_own_output(server, reference):
    run, tok = reference
    prompts = [f"Pack my box {i} with five dozen" for i in range(8)]
    refs = [run(tok.encode_messages([{"role": "user", "content": p}]), 14) for p in prompts]
    c = server.client()

    def ask(p: str) -> str:
        return c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=14,
                                         temperature=0).choices[0].message.content

    passes0 = server.loop.metrics.passes_total
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, prompts))
    assert got == refs
    assert server.loop.metrics.passes_total - passes0 < 8 * 14  # they shared passes
    _wait_idle(server)


def test_a_client_that_disconnects_frees_its_request(tiny_dirs):
    s = Server(tiny_dirs["llama"][0], slow=0.02)
    try:
        body = {"model": MODEL, "prompt": "The quick", "max_tokens": 150, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 2:
                    break
        assert s.loop.in_flight == 1 or s.loop.metrics.running >= 0
        _wait_idle(s)  # cancelled: its KV is free again
        assert s.loop.metrics.tokens_total < 150
    finally:
        s.stop()


def test_a_full_queue_answers_503_at_once(tiny_dirs):
    s = Server(tiny_dirs["llama"][0], max_batch_size=1, max_waiting=0, slow=0.05)
    try:
        body = {"model": MODEL, "prompt": "The quick", "max_tokens": 40, "temperature": 0}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, s.url + "/v1/completions", json=body, timeout=30)
            for _ in range(100):
                if s.loop.in_flight:
                    break
                time.sleep(0.01)
            t0 = time.perf_counter()
            busy = httpx.post(s.url + "/v1/completions", json=body)
            assert busy.status_code == 503 and time.perf_counter() - t0 < 1.0
            assert busy.json()["error"]["type"] == "server_busy"
            assert first.result().status_code == 200
    finally:
        s.stop()


@pytest.mark.parametrize("body, status, param", [
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": MODEL, "messages": "hi"}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": "yes please"}, 400, "stream"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "fox " * 400}]}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param


def test_malformed_and_oversized_bodies(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (5 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": ""})
    assert r.status_code == 400


def test_the_api_key_is_enforced(tiny_dirs):
    s = Server(tiny_dirs["llama"][0], api_key="sekret")
    try:
        from openai import AuthenticationError

        with pytest.raises(AuthenticationError):
            s.client("wrong").models.list()
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200  # health checks need no key
        assert [m.id for m in s.client("sekret").models.list().data] == [MODEL]
    finally:
        s.stop()


def test_chat_session_prefills_only_the_new_turn(tiny_dirs):
    engine, tok = opts.build_engine(opts.ModelOptions(llm=str(tiny_dirs["llama"][0]), max_sequence_length=200), 1)
    # a template whose rendering of a conversation starts with its rendering of every earlier turn (as
    # ChatML's does): the next turn appends to the tokens already in the cache
    tok.chat_template = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>[assistant] {% endif %}")
    params = SamplingParams(max_new_tokens=4)  # this random model says "<s>" fifth
    session = ChatSession(engine, tok, params, system="be brief")
    first = session.send("The quick brown fox")
    out1 = engine.sequence(session._last).output
    assert not set(out1) & {0, 1, 2}, "special tokens: the reply is not its text"
    pieces: list[str] = []
    second = session.send("def add(a, b):", pieces.append)
    assert "".join(pieces) == second
    ids1 = tok.encode_messages(session.messages[:2])
    ids2 = session.last_ids
    assert ids2[: len(ids1)] == ids1  # the first turn's tokens, as they were
    # the turn ran only its own tokens (the previous answer's last token, the template, the new message)
    assert ids2[len(ids1): len(ids1) + len(out1)] == out1
    assert session.prefilled_last == len(ids2) - (len(ids1) + len(out1) - 1)
    fresh = Engine(engine.llm, max_sequence_length=200)
    assert second == tok.decode([t for s in fresh.generate(ids2, 4) for t in s])
    assert first and session.messages[-1] == {"role": "assistant", "content": second}
    stopped = session.send("Pack my box", should_stop=lambda: True)  # Ctrl-C before the first step
    assert stopped == "" and engine.sequence(session._last).finish_reason == "abort"
    session.reset()
    assert engine.pool.blocks.free_blocks == engine.pool.blocks.n_blocks


def test_terminal_chat_loop(tiny_dirs):
    engine, tok = opts.build_engine(opts.ModelOptions(llm=str(tiny_dirs["llama"][0]), max_sequence_length=200), 1)
    session = ChatSession(engine, tok, SamplingParams(max_new_tokens=6))
    out = io.StringIO()
    run_chat(session, io.StringIO("hello\n/reset\nthe fox\n/exit\n"), out)
    text = out.getvalue()
    assert text.count("> ") == 4 and "(conversation cleared)" in text
    assert engine.pool.blocks.free_blocks == engine.pool.blocks.n_blocks


def test_serve_command_starts_answers_and_stops_on_ctrl_c(tiny_dirs):
    import signal
    import subprocess
    import sys

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "offload_infer.cli", "serve", "-m", str(tiny_dirs["llama"][0]),
                             "--port", str(port), "--served-model-name", "tiny", "--max-sequence-length", "128"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"model": "tiny", "prompt": "The quick", "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130), err  # 130: the conventional status after SIGINT (uvicorn re-raises it)
    assert "unauthenticated" in err and f"http://127.0.0.1:{port}/v1" in err and "stopped" in err


def test_a_speculating_server_gives_the_greedy_output(tiny_dirs, reference):
    run, tok = reference
    s = Server(tiny_dirs["llama"][0], ssm=(tiny_dirs["llama"][0],))
    try:
        prompts = ["The quick brown", "def add(a, b):", "Pack my box"]
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: s.client().completions.create(model=MODEL, prompt=p, max_tokens=12,
                                                                        temperature=0), prompts))
        for p, r in zip(prompts, got):
            assert r.choices[0].text == run(tok.encode(p), 12)
            assert r.model_extra["offload_infer"]["tokens_per_pass"] > 1  # the SSM is the LLM: trees accepted
    finally:
        s.stop()
