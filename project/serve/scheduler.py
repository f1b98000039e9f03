"""Continuous batching: every request the server takes (the API's and the page's) decodes in one shared loop.

One thread owns the model's `Decoder` (project/decoding.py): a fixed set of KV-cache slots. Requests wait in a
bounded queue (`Busy` when it is full: the API answers 429 with Retry-After, the page a one-line message), join a
free slot between two steps (their prompt prefilled at batch 1), then move on a token per step together with
every other busy slot, and leave (end-of-text, max tokens, the end of the context, or `cancel`) between steps,
the last busy slot moving into the hole so that busy slots stay packed. This is what llama.cpp's server and vLLM
do (without their paged cache: a slot holds a whole context here).

A request's tokens are the same whatever else runs: its prompt is prefilled at batch 1 and its steps run at a
fixed multiple of 4 rows (see project/decoding.py), greedy ids come from its own row and sampled ones from its
own generator. `rows_are_independent`, checked at start, says whether this machine's kernels allow that promise.

Consumers get `Token` events (the id and, when asked, its log-probability and the top alternatives), then one
`Finished` or `Failed`; they make the text themselves (generate.CompletionText) and cancel once a stop string
shows. Events go into a queue.SimpleQueue, or an asyncio queue of the consumer's event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import torch

from project.decoding import ROW_MULTIPLE, Decoder
from project.generate import GenerationSettings, is_greedy, sample_next
from project.model import GPT

log = logging.getLogger(__name__)


# --- what a request asks and what comes back -----------------------------------------------------------------------


@dataclass
class Request:
    """One completion to decode.

    Args:
        ids: the prompt's token ids (1 to block_size of them).
        settings: max_new_tokens, temperature, top_k, top_p and seed (stop strings are the consumer's).
        eot_id: end the completion after this token (the tokenizer's end-of-text), or None.
        top_logprobs: give each token's log-probability and this many most likely alternatives (None: no
            log-probabilities). Log-probabilities are those of the model (its raw logits), before temperature,
            top-k or top-p.
        prompt_logprobs: also give the log-probabilities of the prompt's tokens (all but the first), as
            `PromptLogprobs` before the first token.
        slide: past the end of the context go on from the last block_size tokens (as `generate` does); else end
            there with finish reason "length".
    """

    ids: list[int]
    settings: GenerationSettings
    eot_id: int | None = None
    top_logprobs: int | None = None
    prompt_logprobs: bool = False
    slide: bool = False


@dataclass
class TokenLogprob:
    """A token's log-probability and the most likely tokens at its position, [(id, logprob)], most likely first."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Token:
    id: int
    logprob: TokenLogprob | None = None


@dataclass
class PromptLogprobs:
    """The log-probabilities of prompt tokens 1..T-1 (the first has no context)."""

    tokens: list[TokenLogprob]


@dataclass
class Finished:
    """The request ended: "stop" (end-of-text), "length" (max tokens or the end of the context) or "cancelled"."""

    reason: str


@dataclass
class Failed:
    message: str


Event = Token | PromptLogprobs | Finished | Failed


class Busy(Exception):
    """The waiting queue is full; `retry_after` estimates the seconds until a request could be taken."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Handle:
    """A submitted request: its events, in order (iterate, or `async for` when submitted from an event loop), and
    `cancel`. Iteration ends after Finished or Failed."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop | None) -> None:
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop else queue.SimpleQueue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop decoding this request: its slot is freed before the next step (a no-op once it has finished)."""
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        """Called by the decoding thread."""
        if self.loop is None:
            self.events.put(event)
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            self.cancel()

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self.events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return


# --- the decoding loop --------------------------------------------------------------------------------------------


@dataclass
class Running:
    """A request in a slot: the tokens of its context (the last block_size at most) and what it has produced."""

    handle: Handle
    generator: torch.Generator | None
    context: list[int]
    cached: int  # positions written in its slot's cache
    produced: int = 0
    finish: str | None = None  # why it ends, once it does
    started: float = field(default_factory=time.monotonic)


@dataclass
class SchedulerStats:
    """Counters for tests and benchmarks."""

    steps: int = 0  # batched decoding steps
    rows: int = 0  # busy slots summed over steps
    admitted: int = 0
    finished: int = 0
    refused: int = 0  # Busy


class Scheduler:
    """Decodes every request on `model` in one thread, `slots` at a time, with at most `max_waiting` waiting.

    `start` builds the decoder in the thread (with `compile`, compiling its step for every row count: the
    start-up cost, in `compile_seconds`) and checks that rows are independent; `close` ends every request and
    the thread.
    """

    def __init__(self, model: GPT, *, slots: int = 8, max_waiting: int = 32, compile: bool = False) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.model, self.slots, self.max_waiting, self.compile = model, slots, max_waiting, compile
        self.block_size = model.config.block_size
        self.waiting: collections.deque[Handle] = collections.deque()
        self.running: list[Running] = []  # slot i holds running[i]
        self.wake = threading.Condition(threading.RLock())  # reentrant: stop() may run in a signal handler
        self.closing = False
        self.stats = SchedulerStats()
        self.compile_seconds = 0.0
        self.exact: bool | None = None  # rows_are_independent, once started
        self.recent_seconds: collections.deque[float] = collections.deque(maxlen=32)  # durations of recent requests
        self.thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self.ready = threading.Event()
        self.start_error: BaseException | None = None

    # -- the consumers' side ----------------------------------------------------------------------------------------

    def start(self) -> Scheduler:
        """Start the decoding thread and wait until it is ready (compiled and checked); returns self."""
        self.thread.start()
        self.ready.wait()
        if self.start_error is not None:
            raise self.start_error
        return self

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue `request`; its Handle. Busy when `max_waiting` requests wait already; ValueError for a prompt that
        is empty or longer than the context."""
        if not 1 <= len(request.ids) <= self.block_size:
            raise ValueError(f"the prompt is {len(request.ids)} tokens: give 1 to {self.block_size} (the context)")
        handle = Handle(request, loop)
        with self.wake:
            if self.closing:
                raise Busy("the server is shutting down", retry_after=1)
            free = self.slots - len(self.running)
            if len(self.waiting) >= self.max_waiting + max(0, free):
                self.stats.refused += 1
                retry = self.retry_after()
                raise Busy(f"the server is busy: {len(self.waiting)} requests are waiting for {self.slots} slots; "
                           f"retry in {retry} s", retry_after=retry)
            self.waiting.append(handle)
            self.wake.notify()
        return handle

    def retry_after(self) -> int:
        """Seconds until a waiting request is likely to get a slot: the recent request time per slot-turn of the
        queue, at least 1."""
        mean = sum(self.recent_seconds) / len(self.recent_seconds) if self.recent_seconds else 1.0
        return max(1, math.ceil(mean * (len(self.waiting) + 1) / self.slots))

    def stop(self) -> None:
        """Stop taking requests and end every waiting and running one (Failed: shutting down), without waiting:
        safe to call from a signal handler."""
        with self.wake:
            self.closing = True
            self.wake.notify()

    def close(self, timeout: float = 10.0) -> None:
        """`stop`, then wait for the decoding thread to end (or, never started, fail the waiting requests)."""
        self.stop()
        if self.thread.is_alive():
            self.thread.join(timeout)
        elif not self.ready.is_set():
            self._fail_waiting()

    # -- the decoding thread ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self.decoder = Decoder(self.model, self.slots, compile=self.compile, row_multiple=ROW_MULTIPLE)
                self.compile_seconds = self.decoder.warm_up()
                self.exact = self.decoder.rows_are_independent()
                if not self.exact:
                    log.warning("this machine's kernels give a row different results depending on its neighbours: "
                                "a request's answer may differ in the last bits when others run beside it")
        except BaseException as err:  # noqa: BLE001 - handed to start(), which raises it in the caller
            self.start_error = err
            self.ready.set()
            return
        self.ready.set()
        with torch.inference_mode():
            while self._wait_for_work():
                try:
                    self._iteration()
                except Exception as err:  # noqa: BLE001 - our bug: fail the requests in flight, keep serving
                    log.exception("decoding failed")
                    for running in self.running:
                        running.handle.emit(Failed(f"internal error ({type(err).__name__})"))
                    self.running.clear()
                    self.decoder.reset()
        for running in self.running:
            running.handle.emit(Failed("the server is shutting down"))
        self.running.clear()
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        with self.wake:
            while self.waiting:
                self.waiting.popleft().emit(Failed("the server is shutting down"))

    def _wait_for_work(self) -> bool:
        with self.wake:
            while not self.closing and not self.waiting and not self.running:
                self.wake.wait()
            return not self.closing

    def _iteration(self) -> None:
        self._drop_cancelled()
        while len(self.running) < self.slots:
            with self.wake:
                if not self.waiting:
                    break
                handle = self.waiting.popleft()
            if not handle.cancelled.is_set():
                self._admit(handle)
        if self.running:
            self._step()

    def _admit(self, handle: Handle) -> None:
        """Prefill the request's prompt into the next free slot at batch 1 and emit its first token."""
        request, slot = handle.request, len(self.running)
        settings = request.settings
        generator = None
        if settings.seed is not None and not is_greedy(settings):
            generator = torch.Generator(device=self.decoder.tokens.device).manual_seed(settings.seed)
        running = Running(handle, generator, list(request.ids), cached=len(request.ids))
        self.stats.admitted += 1
        ids = torch.tensor([request.ids], dtype=torch.long, device=self.decoder.tokens.device)
        logits = self.decoder.prefill(slot, ids, all_logits=request.prompt_logprobs)
        if request.prompt_logprobs:
            handle.emit(PromptLogprobs(prompt_logprobs(logits[0], request.ids, request.top_logprobs or 0)))
            logits = logits[:, -1]
        if settings.max_new_tokens == 0:
            self._finish(running, "length")
            return
        self.running.append(running)
        self._take(slot, logits[0], None)

    def _step(self) -> None:
        """One token for every running request: a batched step, then a window prefill for those past the context."""
        count = len(self.running)
        greedy, logits = self.decoder.step(count)
        self.stats.steps += 1
        self.stats.rows += count
        for slot, running in enumerate(self.running):
            if running.cached == self.block_size:  # the context is full: go on from its last block_size tokens
                window = torch.tensor([running.context[-self.block_size :]], device=logits.device)
                self._take(slot, self.decoder.prefill(slot, window)[0], None)
                running.cached = self.block_size
            else:
                running.cached += 1
                self._take(slot, logits[slot], greedy[slot])
        self._drop_finished()

    def _take(self, slot: int, logits: torch.Tensor, greedy_id: torch.Tensor | None) -> None:
        """Choose the next token of the request in `slot` from its logits (V,), emit it, and note if it is done."""
        running = self.running[slot]
        request = running.handle.request
        settings = request.settings
        if is_greedy(settings):
            token = int(logits.argmax()) if greedy_id is None else int(greedy_id)
            if greedy_id is None:
                self.decoder.tokens[slot] = token
        else:
            token = int(sample_next(logits[None], settings.temperature, settings.top_k, settings.top_p,
                                    running.generator)[0])
            self.decoder.tokens[slot] = token
        logprob = None if request.top_logprobs is None else token_logprob(logits, token, request.top_logprobs)
        running.handle.emit(Token(token, logprob))
        running.produced += 1
        running.context.append(token)
        if len(running.context) > 2 * self.block_size:  # only the last block_size are ever read again
            del running.context[: -self.block_size]
        if request.eot_id is not None and token == request.eot_id:
            running.finish = "stop"
        elif running.produced >= settings.max_new_tokens:
            running.finish = "length"
        elif running.cached == self.block_size and not request.slide:
            running.finish = "length"  # the context is full

    def _drop_cancelled(self) -> None:
        for running in self.running:
            if running.handle.cancelled.is_set():
                running.finish = "cancelled"
        self._drop_finished()

    def _drop_finished(self) -> None:
        """Finish the running requests that are done, moving the last busy slots into their slots."""
        slot = 0
        while slot < len(self.running):
            running = self.running[slot]
            if running.finish is None:
                slot += 1
                continue
            self._finish(running, running.finish)
            last = len(self.running) - 1
            if slot != last:
                self.decoder.move(last, slot, self.running[last].cached)
                self.running[slot] = self.running[last]
            self.running.pop()

    def _finish(self, running: Running, reason: str) -> None:
        running.handle.emit(Finished(reason))
        self.stats.finished += 1
        self.recent_seconds.append(time.monotonic() - running.started)


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The log-probability of `token` under `logits` (V,) and the `top` most likely tokens'."""
    logprobs = logits.float().log_softmax(dim=-1)
    best = torch.topk(logprobs, min(top, logprobs.numel())) if top else None
    pairs = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist()))
    return TokenLogprob(float(logprobs[token]), pairs)


def prompt_logprobs(logits: torch.Tensor, ids: list[int], top: int) -> list[TokenLogprob]:
    """Log-probabilities of prompt tokens 1..T-1 from the prompt's logits (T, V)."""
    logprobs = logits[:-1].float().log_softmax(dim=-1)
    chosen = logprobs.gather(-1, torch.tensor(ids[1:], device=logits.device)[:, None])[:, 0].tolist()
    if not top:
        return [TokenLogprob(lp, []) for lp in chosen]
    best = torch.topk(logprobs, min(top, logprobs.size(-1)), dim=-1)
    return [TokenLogprob(lp, list(zip(i, v))) for lp, i, v in zip(chosen, best.indices.tolist(), best.values.tolist())]
