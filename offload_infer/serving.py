"""The engine on its own thread, for servers: requests come in from any thread, each request's
progress goes out through its own callback (an HTTP handler's queue), one engine step at a time.

Only the engine thread touches the engine after ``start()``; other threads submit and cancel through
an inbox. A request is checked when submitted (so a bad one is refused at once), and refused with
``QueueFullError`` when ``max_running + max_waiting`` requests are already in flight.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from offload_infer.engine import Engine
from offload_infer.sampling import SamplingParams

log = logging.getLogger("offload_infer.serving")


class QueueFullError(RuntimeError):
    pass


@dataclass
class Event:
    """A request's progress: new tokens; at the end why it finished, the text cut at a stop string and
    its statistics; or an error."""

    tokens: list[int]
    finished: bool = False
    finish_reason: str | None = None
    stop_text: str | None = None
    stats: dict | None = None
    prompt_tokens: int = 0
    error: str | None = None


Callback = Callable[[Event], None]


@dataclass
class _Metrics:
    started: float
    requests_total: int = 0
    tokens_total: int = 0  # tokens generated
    passes_total: int = 0  # LLM passes (steps)
    step_seconds_total: float = 0.0  # time spent inside steps
    running: int = 0
    waiting: int = 0


class EngineLoop:
    def __init__(self, engine: Engine, max_waiting: int = 64) -> None:
        self.engine = engine
        self.max_in_flight = engine.scheduler.max_batch_size + max_waiting
        self._inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="offload-infer-engine", daemon=True)
        self.metrics = _Metrics(time.time())
        self.failed: str | None = None  # set if the engine loop died
        self._told = 0  # engine notices logged so far

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is in flight and end the thread."""
        self._stop.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, prompt_ids: list[int], params: SamplingParams, callback: Callback) -> int:
        """Queue a request (checked now: ValueError if bad, QueueFullError if too many are in flight);
        returns a handle for ``cancel``. ``callback`` is called on the engine thread."""
        if self.failed:
            raise RuntimeError(f"the engine stopped: {self.failed}")
        self.engine.validate(prompt_ids, params)  # reads only the engine's fixed settings
        with self._lock:
            if self._in_flight >= self.max_in_flight:
                raise QueueFullError(f"{self._in_flight} requests in flight; try again later")
            self._in_flight += 1
        handle = next(self._ids)
        self._inbox.put(("add", handle, list(prompt_ids), params, callback))
        return handle

    def cancel(self, handle: int) -> None:
        self._inbox.put(("cancel", handle))

    # ---- the engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        live: dict[int, tuple[int, Callback, int]] = {}  # engine id -> (handle, callback, prompt tokens)
        by_handle: dict[int, int] = {}
        try:
            while not self._stop.is_set():
                self._drain(live, by_handle, block=not self.engine.has_unfinished())
                if self._stop.is_set() or not self.engine.has_unfinished():
                    continue
                t0 = time.perf_counter()
                outs = self.engine.step()
                m = self.metrics
                m.step_seconds_total += time.perf_counter() - t0
                m.passes_total += 1
                m.running, m.waiting = len(self.engine.scheduler.running), len(self.engine.scheduler.waiting)
                while len(self.engine.notices) > self._told:  # said once, in the server's log
                    log.warning(self.engine.notices[self._told])
                    self._told += 1
                for o in outs:
                    m.tokens_total += len(o.new_tokens)
                    if o.id in live:
                        self._deliver(live, by_handle, o.id, o.new_tokens, o.finished, o.finish_reason)
        except Exception as e:  # noqa: BLE001 - the thread must tell every waiting client, whatever broke
            log.exception("the engine loop failed")
            self.failed = f"{type(e).__name__}: {e}"
            for sid, (handle, cb, _) in list(live.items()):
                cb(Event([], True, "error", error=self.failed))
        finally:
            for sid, (handle, cb, _) in list(live.items()):  # stopped: cancel what is left
                self.engine.abort(sid)
                self._deliver(live, by_handle, sid, [], True, "abort")

    def _drain(self, live: dict, by_handle: dict, block: bool) -> None:
        while True:
            try:
                cmd = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if cmd[0] == "add":
                _, handle, ids, params, cb = cmd
                try:
                    sid = self.engine.add_request(ids, params)
                except ValueError as e:  # checked at submit; kept for safety
                    with self._lock:
                        self._in_flight -= 1
                    cb(Event([], True, "error", error=str(e)))
                    continue
                live[sid] = (handle, cb, len(ids))
                by_handle[handle] = sid
                self.metrics.requests_total += 1
            elif cmd[0] == "cancel":
                sid = by_handle.get(cmd[1])
                if sid is not None and sid in live and self.engine.abort(sid):
                    self._deliver(live, by_handle, sid, [], True, "abort")

    def _deliver(self, live: dict, by_handle: dict, sid: int, tokens: list[int], finished: bool,
                 reason: str | None) -> None:
        handle, cb, n_prompt = live[sid]
        if not finished:
            cb(Event(tokens, prompt_tokens=n_prompt))
            return
        seq = self.engine.sequence(sid)
        cb(Event(tokens, True, reason, seq.stop_text, seq.stats.as_dict(), n_prompt))
        del live[sid], by_handle[handle]
        self.engine.forget(sid)
        with self._lock:
            self._in_flight -= 1
