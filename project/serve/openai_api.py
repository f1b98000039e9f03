"""An OpenAI-compatible HTTP API for a loaded model: any OpenAI client, editor or chat front-end can use it.

    GET  /v1/models                   the one model served (and /v1/models/{id})
    POST /v1/completions              text completion of `prompt` (a string, a list of them, token ids, or lists of
                                      token ids)
    POST /v1/chat/completions         a reply to `messages`, through the chat template below

Every request decodes through the server's one scheduler (project/serve/scheduler.py), beside the page's.

Fields, as OpenAI defines them:
- sampling: `temperature` (0 = greedy, up to 2; default 1), `top_p`, `seed` (0 to 2**64 - 1: the same text for the
  same request, alone or beside others), `stop` (a string or up to 4), `max_tokens` (completions: default 16;
  chat: `max_completion_tokens` or `max_tokens`, default the rest of the context). Prompt + max_tokens must fit
  the model's context (400 `context_length_exceeded`); a default max_tokens is cut to what fits.
- `n` completions per prompt (choice i samples with seed + i); completions' `best_of` candidates, the n with the
  highest mean token log-probability returned (not streamable); `echo` (completions: the prompt before the
  completion, with `max_tokens` 0 too: scoring a text); `logprobs` (completions: 0-5 alternatives per token; chat:
  `logprobs` true and `top_logprobs` 0-20), the model's own log-probabilities (its raw logits, before
  temperature or top-p); `stream` and `stream_options.include_usage`.
- `finish_reason` ("stop": end-of-text or a stop string; "length": max_tokens or the end of the context) and
  `usage` count the sampled token ids (the end-of-text or stop-completing token included; `best_of`'s unreturned
  candidates too), never re-encoded text.
- accepted at their no-op values only, else 400 naming them: `presence_penalty`/`frequency_penalty` (0),
  `logit_bias` ({}), `suffix` (""), tools and functions (none), `response_format` (text), `audio`, `prediction`,
  `modalities` (["text"]), `store` (false), `reasoning_effort`, `web_search_options`; `user`, `metadata` and
  `service_tier` are informational. Any other field: 400 "Unrecognized request argument supplied: NAME".

Chat template. An instruction-tuned model (python -m project finetune) is prompted through the template it was
trained with (project/chat.py; developer messages count as system ones), and its reply ends at its end-of-text
token. A base model gets chat messages as plain text in the corpus's own shape, a speaker's name in capitals, a
colon, the speech, and a blank line:

    {SPEAKER}:\\n{content}\\n\\n      for each message, then      ASSISTANT:\\n

SPEAKER is the message's `name` when given (e.g. "JULIET"), else SYSTEM (system/developer), USER or
ASSISTANT by role. The reply ends at the first blank line, the end of a speech, or at a stop string.

Errors come in the API's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a malformed body or
value out of range, 401 for a missing or wrong API key when the server has one, 404 for an unknown model, 429
with `Retry-After` (seconds) when the scheduler's queue is full, 503 when the server shuts down mid-request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from project.chat import PromptTemplate
from project.formats.checkpoint import LoadedCheckpoint
from project.generate import MAX_SEED, CompletionText, GenerationSettings, InvalidSetting
from project.serve.scheduler import (Busy, Failed, Finished, Handle, PromptLogprobs, Request as DecodeRequest,
                                     Scheduler, Token, TokenLogprob)
from project.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4  # as the OpenAI API allows
MAX_TEMPERATURE = 2.0
MAX_LOGPROBS = {"completions": 5, "chat": 20}  # alternatives per token, as OpenAI allows
MAX_CHOICES = 128  # prompts x max(n, best_of) in one request
SPEECH_END = "\n\n"  # a blank line ends a speech in the chat template
ROLE_SPEAKERS = {"system": "SYSTEM", "developer": "SYSTEM", "user": "USER", "assistant": "ASSISTANT"}
API_PARAMS = {"max_new_tokens": "max_tokens"}  # GenerationSettings field -> the API's name, where they differ
# fields this server does not implement: the values that mean "not used", accepted; any other is a 400
NO_OP_VALUES: dict[str, tuple] = {
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "parallel_tool_calls": (None, False, True), "audio": (None,),
    "prediction": (None,), "modalities": (None, ["text"]), "store": (None, False), "reasoning_effort": (None,),
    "web_search_options": (None,), "response_format": (None, {"type": "text"}),
}


class APIError(Exception):
    """A request the API refuses, answered with `status` and the OpenAI error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- request bodies ---------------------------------------------------------------------------------------------


class APIBody(BaseModel):
    """A request body: unknown fields are refused (400 naming them), as OpenAI does."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(APIBody):
    include_usage: bool | None = None


class SamplingFields(APIBody):
    """Fields shared by completions and chat completions."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None  # None (or absent): the API's default, 1
    top_p: float | None = None  # None (or absent): 1, the whole distribution
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    store: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # the API's default for completions
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(APIBody):
    type: Literal["text"]
    text: str


class ChatMessage(APIBody):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


def chat_prompt(messages: list[ChatMessage], template: PromptTemplate | None = None,
                tokenizer: Tokenizer | None = None) -> str | list[int]:
    """The prompt for `messages`: token ids through an instruction-tuned model's `template`, else text by the
    module's speaker template."""
    if template is not None:
        conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        return template.encode(conversation, tokenizer, add_generation_prompt=True)[0]
    turns = [f"{message.name or ROLE_SPEAKERS[message.role]}:\n{message.text()}{SPEECH_END}" for message in messages]
    return "".join(turns) + f"{ROLE_SPEAKERS['assistant']}:\n"


# --- from a request body to the scheduler's requests ----------------------------------------------------------------


@dataclass
class Plan:
    """What one API request asks of the scheduler: `prompts` (token ids) x `candidates` completions each, `n` of
    them returned per prompt (the best by mean log-probability when candidates > n)."""

    prompts: list[list[int]]
    settings: list[GenerationSettings]  # per prompt (max_tokens may be cut to the context)
    candidates: int
    n: int
    top_logprobs: int | None  # alternatives per token, None: no log-probabilities
    echo: bool = False


@dataclass
class Choice:
    """One completion as it comes: its text so far, its tokens' log-probabilities, why it ended."""

    index: int
    text: CompletionText
    logprobs: list[TokenLogprob | None] = field(default_factory=list)  # per generated token
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None

    def mean_logprob(self) -> float:
        values = [lp.logprob for lp in self.logprobs[: len(self.text.tokens)] if lp is not None]
        return sum(values) / len(values) if values else 0.0


class Generator:
    """The API's side of the scheduler: request fields checked into Plans, and the completions' events."""

    def __init__(self, loaded: LoadedCheckpoint, scheduler: Scheduler, max_tokens_limit: int | None = None) -> None:
        self.loaded, self.scheduler = loaded, scheduler
        self.tokenizer = loaded.tokenizer
        self.block_size = loaded.model.config.block_size
        self.max_tokens_limit = max_tokens_limit or self.block_size

    def encode(self, prompt: str | list[int], param: str) -> list[int]:
        """A prompt's token ids; APIError 400 when it is empty, not encodable or longer than the context."""
        if isinstance(prompt, list):
            ids = prompt
            if any(not 0 <= i < self.loaded.model.config.vocab_size for i in ids):
                raise APIError(400, f"{param} holds token ids outside 0..{self.loaded.model.config.vocab_size - 1}",
                               param=param)
        else:
            try:
                ids = self.tokenizer.encode(prompt)
            except ValueError as err:  # e.g. a character outside a character model's vocabulary
                raise APIError(400, f"{param}: {err}", param=param) from None
        if not ids:
            raise APIError(400, f"{param} is empty: give at least one character", param=param)
        if len(ids) > self.block_size:
            raise APIError(400, f"{param} is {len(ids)} tokens but this model's context is {self.block_size} tokens: "
                           "shorten it", param=param, code="context_length_exceeded")
        return ids

    def settings(self, body: SamplingFields, prompt_len: int, max_tokens: int | None, explicit: bool,
                 extra_stop: list[str], *, allow_zero: bool = False) -> GenerationSettings:
        """GenerationSettings from the request's sampling fields; APIError 400 naming the allowed range."""
        room, low = self.block_size - prompt_len, 0 if allow_zero else 1
        if not explicit:  # the default: what fits
            max_tokens = min(room, self.max_tokens_limit, room if max_tokens is None else max_tokens)
        elif not low <= max_tokens <= self.max_tokens_limit:
            raise APIError(400, f"max_tokens must be from {low} to {self.max_tokens_limit} (this server's limit), "
                           f"got {max_tokens}", param="max_tokens")
        if not low <= max_tokens <= room:
            raise APIError(400, f"this model's context is {self.block_size} tokens, but {prompt_len + max_tokens} were "
                           f"asked for ({prompt_len} in the prompt, {max_tokens} to generate): lower max_tokens or "
                           "shorten the prompt", param="max_tokens", code="context_length_exceeded")
        temperature = 1.0 if body.temperature is None else body.temperature
        if not 0 <= temperature <= MAX_TEMPERATURE:
            raise APIError(400, f"temperature must be from 0 to {MAX_TEMPERATURE}, got {temperature}",
                           param="temperature")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
        try:
            return GenerationSettings(max_new_tokens=max_tokens, temperature=temperature, top_k=None,
                                      top_p=None if body.top_p in (None, 1) else body.top_p, seed=body.seed,
                                      stop=[s for s in stop + extra_stop if s])
        except InvalidSetting as err:
            raise APIError(400, str(err), param=API_PARAMS.get(err.field, err.field)) from None

    def submit(self, plan: Plan) -> Run:
        """Queue every candidate of `plan` with the scheduler; APIError 429 (with Retry-After) when it cannot take
        them all (none is taken then)."""
        loop = asyncio.get_running_loop()
        run = Run(plan, [], [])
        try:
            for p, (ids, settings) in enumerate(zip(plan.prompts, plan.settings)):
                for i in range(plan.candidates):
                    seed = None if settings.seed is None else (settings.seed + i) % (MAX_SEED + 1)
                    child = GenerationSettings(**{**settings.to_dict(), "seed": seed})
                    request = DecodeRequest(ids, child, eot_id=self.tokenizer.eot_id if child.stop_at_eot else None,
                                            top_logprobs=plan.top_logprobs,
                                            prompt_logprobs=plan.echo and plan.top_logprobs is not None)
                    run.handles.append(self.scheduler.submit(request, loop))
                    run.choices.append(Choice(p * plan.candidates + i, CompletionText(self.tokenizer, child)))
        except Busy as err:
            run.cancel()
            raise APIError(429, str(err), type="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": str(err.retry_after)}) from None
        return run

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")


@dataclass
class Run:
    """The candidates of one API request, in the scheduler."""

    plan: Plan
    handles: list[Handle]
    choices: list[Choice]

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def updates(self) -> AsyncIterator[tuple[Choice, str]]:
        """Yield (choice, text piece) as pieces come, in any order across choices, and (choice, "") once when a
        choice ends (its finish_reason set by then). APIError 503 when the scheduler fails a candidate. Every candidate
        is cancelled when the caller stops early."""
        merged: asyncio.Queue = asyncio.Queue()

        async def follow(handle: Handle, choice: Choice) -> None:
            async for event in handle:
                await merged.put((handle, choice, event))

        tasks = [asyncio.create_task(follow(h, c)) for h, c in zip(self.handles, self.choices)]
        try:
            open_choices = len(self.choices)
            while open_choices:
                handle, choice, event = await merged.get()
                if isinstance(event, Token) and choice.finish_reason is None:
                    choice.logprobs.append(event.logprob)
                    piece = choice.text.add(event.id)
                    if choice.text.stopped:  # end-of-text or a stop string
                        handle.cancel()
                        choice.finish_reason = "stop"
                        piece += choice.text.end()
                    if piece:
                        yield choice, piece
                    if choice.finish_reason is not None:
                        yield choice, ""
                elif isinstance(event, PromptLogprobs):
                    choice.prompt_logprobs = event.tokens
                elif isinstance(event, Failed):
                    raise APIError(503, f"generation did not finish: {event.message}", type="server_error")
                elif isinstance(event, Finished):
                    open_choices -= 1
                    if choice.finish_reason is None:  # max tokens or the end of the context
                        choice.finish_reason = "length"
                        piece = choice.text.end()
                        if piece:
                            yield choice, piece
                        yield choice, ""
        finally:
            self.cancel()
            for task in tasks:
                task.cancel()


def finished_choices(choices: list[Choice], plan: Plan) -> list[Choice]:
    """The choices to return: all of them, or per prompt the n best candidates by mean token log-probability."""
    if plan.candidates == plan.n:
        return choices
    kept = []
    for p in range(len(plan.prompts)):
        candidates = choices[p * plan.candidates : (p + 1) * plan.candidates]
        kept += sorted(candidates, key=lambda c: -c.mean_logprob())[: plan.n]
    return kept


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# --- log-probabilities in the API's two shapes ----------------------------------------------------------------------


def completion_logprobs(generator: Generator, tokens: list[int], logprobs: list[TokenLogprob | None],
                        offset: int) -> dict:
    """The completions API's logprobs object for `tokens`: their text, log-probability, the alternatives (with the
    chosen token among them) and where each token's text starts in the choice's text (from `offset`)."""
    texts = [generator.token_text(t) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    top = [None if lp is None else {**{generator.token_text(i): v for i, v in lp.top}, text: lp.logprob}
           for text, lp in zip(texts, logprobs)]
    return {"tokens": texts, "token_logprobs": [None if lp is None else lp.logprob for lp in logprobs],
            "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(generator: Generator, tokens: list[int], logprobs: list[TokenLogprob | None]) -> dict:
    """The chat API's logprobs object: a token, its log-probability and bytes, and the alternatives, per token."""
    def entry(token: int, logprob: float) -> dict:
        raw = generator.tokenizer.decode_bytes([token])
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**entry(t, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for t, lp in zip(tokens, logprobs)], "refusal": None}


# --- the routes ------------------------------------------------------------------------------------------------


def add_openai_routes(app: FastAPI, loaded: LoadedCheckpoint, scheduler: Scheduler, *, model_name: str = "gpt",
                      api_key: str | None = None, max_tokens_limit: int | None = None) -> FastAPI:
    """Add the /v1 routes and the API's error handling to `app`, serving `loaded` through `scheduler` under
    `model_name`.

    With `api_key`, every /v1 request needs `Authorization: Bearer <api_key>` (401 otherwise).
    `max_tokens_limit` caps max_tokens (default: the model's context).
    """
    generator = Generator(loaded, scheduler, max_tokens_limit)
    created = int(time.time())
    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "project"}
    fingerprint = system_fingerprint(loaded, scheduler)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send it as 'Authorization: Bearer KEY' "
                           "(the openai client's api_key)", code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server has {model_name!r}",
                           param="model", code="model_not_found")

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            return JSONResponse(APIError(400, f"the request body is not valid JSON ({first['msg']})").body(), 400)
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        if first["type"] == "extra_forbidden":  # OpenAI's own words for a field it does not know
            return JSONResponse(APIError(400, f"Unrecognized request argument supplied: {where}", param=where).body(),
                                400)
        return JSONResponse(APIError(400, f"{where}: {first['msg']}", param=where or None).body(), 400)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    def list_models() -> dict:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name}", dependencies=[Depends(check_key)])
    def retrieve_model(name: str) -> dict:
        check_model(name)
        return model_card

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        plan = completion_plan(body, generator)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "system_fingerprint": fingerprint}
        show_logprobs = body.logprobs is not None
        run = generator.submit(plan)
        if body.stream:
            return event_stream(completion_events(generator, run, head, show_logprobs, include_usage(body)))
        return await until_done(request, run, completion_response(generator, run, head, show_logprobs))

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        plan = chat_plan(body, generator, loaded)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name,
                "system_fingerprint": fingerprint}
        run = generator.submit(plan)
        if body.stream:
            return event_stream(chat_events(generator, run, head, bool(body.logprobs), include_usage(body)))
        return await until_done(request, run, chat_response(generator, run, head, bool(body.logprobs)))

    return app


def completion_plan(body: CompletionRequest, generator: Generator) -> Plan:
    """What a /v1/completions request asks the scheduler for, or an APIError (400) naming the field at fault."""
    check_common(body)
    prompts = prompt_list(body.prompt)
    if not prompts:
        raise APIError(400, "prompt is an empty list: give at least one prompt", param="prompt")
    ids = [generator.encode(p, "prompt") for p in prompts]
    n = check_count(body.n, "n", 1)
    best_of = check_count(body.best_of, "best_of", n)
    if best_of < n:
        raise APIError(400, f"best_of ({best_of}) must be at least n ({n})", param="best_of")
    if best_of > n and body.stream:
        raise APIError(400, "best_of results cannot be streamed: leave out stream, or best_of", param="best_of")
    if len(prompts) * best_of > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x {best_of} completions is over {MAX_CHOICES}", param="n")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS["completions"]:
        raise APIError(400, f"logprobs must be from 0 to {MAX_LOGPROBS['completions']}, got {body.logprobs}",
                       param="logprobs")
    explicit = "max_tokens" in body.model_fields_set and body.max_tokens is not None
    settings = [generator.settings(body, len(i), body.max_tokens, explicit, [], allow_zero=bool(body.echo))
                for i in ids]
    top = body.logprobs if body.logprobs is not None else (0 if best_of > n else None)
    return Plan(ids, settings, best_of, n, top, echo=bool(body.echo))


def chat_plan(body: ChatRequest, generator: Generator, loaded: LoadedCheckpoint) -> Plan:
    """What a /v1/chat/completions request asks the scheduler for, or an APIError (400) naming the field at fault."""
    check_common(body)
    if not body.messages:
        raise APIError(400, "messages is empty: give at least one message", param="messages")
    ids = generator.encode(chat_prompt(body.messages, loaded.template, loaded.tokenizer), "messages")
    n = check_count(body.n, "n", 1)
    if len(ids) == generator.block_size:
        raise APIError(400, f"messages fill this model's whole context ({generator.block_size} tokens), leaving "
                       "no room for a reply: shorten them", param="messages", code="context_length_exceeded")
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if not 0 <= body.top_logprobs <= MAX_LOGPROBS["chat"]:
            raise APIError(400, f"top_logprobs must be from 0 to {MAX_LOGPROBS['chat']}, got {body.top_logprobs}",
                           param="top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    stops = [SPEECH_END] if loaded.template is None else []  # an instruction-tuned reply ends at end-of-text
    settings = generator.settings(body, len(ids), max_tokens, max_tokens is not None, stops)
    return Plan([ids], [settings], n, n, (body.top_logprobs or 0) if body.logprobs else None)


def check_common(body: SamplingFields) -> None:
    """400 for a field this server does not implement, set to something other than its no-op value."""
    for name, allowed in NO_OP_VALUES.items():
        value = getattr(body, name, None)
        if value not in allowed:
            raise APIError(400, f"{name} is not supported by this server (send it as {allowed[-1]!r}, or leave it out)",
                           param=name)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options needs stream: true", param="stream_options")


def check_count(value: int | None, name: str, default: int) -> int:
    value = default if value is None else value
    if not 1 <= value <= MAX_CHOICES:
        raise APIError(400, f"{name} must be from 1 to {MAX_CHOICES}, got {value}", param=name)
    return value


def include_usage(body: SamplingFields) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def prompt_list(prompt: str | list) -> list[str | list[int]]:
    """A completions prompt as a list of prompts, each a string or token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


def system_fingerprint(loaded: LoadedCheckpoint, scheduler: Scheduler) -> str:
    """Changes exactly when a seeded request may give another answer: the weights' identity, dtype, torch version,
    thread count and how steps are batched."""
    model = loaded.model
    parts = [str(loaded.path), str(loaded.global_step), json.dumps(model.config.to_dict(), sort_keys=True),
             str(next(model.parameters()).dtype), torch.__version__, str(torch.get_num_threads()),
             str(scheduler.slots), str(scheduler.compile)]
    return "fp_" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:10]


async def until_done(request: Request, run: Run, response) -> dict:
    """Await an unstreamed answer, cancelling its decoding if the client goes away first."""
    task = asyncio.ensure_future(response)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "the client closed the connection")
    finally:
        task.cancel()
        run.cancel()


async def finish(run: Run) -> list[Choice]:
    """Decode every candidate of `run` to its end; the candidates, in order."""
    async for _ in run.updates():
        pass
    return run.choices


def echo_logprobs(choice: Choice, prompt_ids: list[int]) -> tuple[list[int], list[TokenLogprob | None]]:
    """A prompt's tokens and their log-probabilities (none for the first, which has no context)."""
    return prompt_ids, [None] + list(choice.prompt_logprobs or [])


async def completion_response(generator: Generator, run: Run, head: dict, show_logprobs: bool) -> dict:
    """The unstreamed /v1/completions: n choices per prompt."""
    plan = run.plan
    candidates = await finish(run)
    body = []
    for index, choice in enumerate(finished_choices(candidates, plan)):
        prompt_ids = plan.prompts[choice.index // plan.candidates]
        shown = choice.text.shown_tokens()
        tokens, values = choice.text.tokens[:shown], choice.logprobs[:shown]
        text = choice.text.text
        if plan.echo:
            text = generator.tokenizer.decode(prompt_ids) + text
            prompt_tokens, prompt_values = echo_logprobs(choice, prompt_ids)
            tokens, values = prompt_tokens + tokens, prompt_values + values
        logprobs = completion_logprobs(generator, tokens, values, 0) if show_logprobs else None
        body.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason})
    completion_tokens = sum(len(c.text.tokens) for c in candidates)
    return {**head, "choices": body, "usage": usage(sum(map(len, plan.prompts)), completion_tokens)}


async def completion_events(generator: Generator, run: Run, head: dict, show_logprobs: bool, with_usage: bool
                            ) -> AsyncIterator[str]:
    """The streamed /v1/completions: the prompt first with `echo`, a chunk per piece of text, a closing chunk per
    choice, then usage if asked."""
    plan = run.plan
    released: dict[int, int] = {}  # tokens whose log-probabilities went out, per choice
    offsets: dict[int, int] = {}  # characters of text sent, per choice

    def chunk(choice: Choice, text: str, logprobs: dict | None, finish_reason: str | None = None) -> str:
        return sse({**head, "choices": [{"index": choice.index, "text": text, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]})

    async for choice, piece in run.updates():
        if plan.echo and choice.index not in offsets:  # the prompt (its log-probabilities are known by now)
            prompt_ids = plan.prompts[choice.index // plan.candidates]
            text = generator.tokenizer.decode(prompt_ids)
            logprobs = completion_logprobs(generator, *echo_logprobs(choice, prompt_ids), 0) if show_logprobs else None
            offsets[choice.index] = len(text)
            yield chunk(choice, text, logprobs)
        shown, first = choice.text.shown_tokens(), released.get(choice.index, 0)
        logprobs = None
        if show_logprobs and shown > first:
            logprobs = completion_logprobs(generator, choice.text.tokens[first:shown], choice.logprobs[first:shown],
                                           offsets.get(choice.index, 0))
            released[choice.index] = shown
        if piece or logprobs:
            offsets[choice.index] = offsets.get(choice.index, 0) + len(piece)
            yield chunk(choice, piece, logprobs)
        elif choice.finish_reason is not None:
            yield chunk(choice, "", None, choice.finish_reason)
    if with_usage:
        completion_tokens = sum(len(c.text.tokens) for c in run.choices)
        yield sse({**head, "choices": [], "usage": usage(sum(map(len, plan.prompts)), completion_tokens)})


async def chat_response(generator: Generator, run: Run, head: dict, show_logprobs: bool) -> dict:
    """The unstreamed /v1/chat/completions: n assistant messages."""
    choices = await finish(run)
    body = []
    for choice in choices:
        shown = choice.text.shown_tokens()
        logprobs = (chat_logprobs(generator, choice.text.tokens[:shown], choice.logprobs[:shown]) if show_logprobs
                    else None)
        body.append({"index": choice.index, "message": {"role": "assistant", "content": choice.text.text},
                     "logprobs": logprobs, "finish_reason": choice.finish_reason})
    completion_tokens = sum(len(c.text.tokens) for c in choices)
    return {**head, "object": "chat.completion", "choices": body,
            "usage": usage(len(run.plan.prompts[0]), completion_tokens)}


async def chat_events(generator: Generator, run: Run, head: dict, show_logprobs: bool, with_usage: bool
                      ) -> AsyncIterator[str]:
    """The streamed /v1/chat/completions: the assistant role, a delta per piece, the finish reason, usage if asked."""
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(choice: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> str:
        return sse({**head, "choices": [{"index": choice, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}]})

    for index in range(run.plan.n):
        yield chunk(index, {"role": "assistant", "content": ""})
    released: dict[int, int] = {}
    async for choice, piece in run.updates():
        shown, first = choice.text.shown_tokens(), released.get(choice.index, 0)
        logprobs = None
        if show_logprobs and shown > first:
            logprobs = chat_logprobs(generator, choice.text.tokens[first:shown], choice.logprobs[first:shown])
            released[choice.index] = shown
        if piece or logprobs:
            yield chunk(choice.index, {"content": piece}, logprobs)
        elif choice.finish_reason is not None:
            yield chunk(choice.index, {}, None, choice.finish_reason)
    if with_usage:
        completion_tokens = sum(len(c.text.tokens) for c in run.choices)
        yield sse({**head, "choices": [], "usage": usage(len(run.plan.prompts[0]), completion_tokens)})


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events ending with `data: [DONE]`; a failure mid-stream ends it with an error event."""

    async def guarded() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except APIError as err:
            yield sse(err.body())
        except Exception as err:  # noqa: BLE001 - the status line is sent already: report in the stream, log it
            log.exception("generation failed mid-stream")
            yield sse(APIError(500, f"internal error ({type(err).__name__})", type="server_error").body())
        finally:
            await events.aclose()
        yield sse("[DONE]")

    return StreamingResponse(guarded(), media_type="text/event-stream")
