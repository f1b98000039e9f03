"""An OpenAI-compatible HTTP API for a loaded model: any OpenAI client, editor or chat front-end can use it.

    GET  /v1/models                   the one model served (and /v1/models/{id})
    POST /v1/completions              text completion of `prompt` (a string or a list of strings)
    POST /v1/chat/completions         a reply to `messages`, through the chat template below

`stream: true` sends server-sent events (`data: {chunk}` lines, ending with `data: [DONE]`). The sampling
fields map onto `GenerationSettings`: `temperature` (0 = greedy, up to 2), `top_p`, `max_tokens`, `stop`
(a string or up to 4), `seed` (a fixed seed gives the same text); top-k is off, as the API has none.
Unknown fields are ignored; `n` must be 1.

Chat template. An instruction-tuned model (python -m project finetune) is prompted through the template it was
trained with (project/chat.py; developer messages count as system ones), and its reply ends at its end-of-text
token. A base model gets chat messages as plain text in the corpus's own shape, a speaker's name in capitals, a
colon, the speech, and a blank line:

    {SPEAKER}:\\n{content}\\n\\n      for each message, then      ASSISTANT:\\n

SPEAKER is the message's `name` when given (e.g. "JULIET"), else SYSTEM (system/developer), USER or
ASSISTANT by role. The reply ends at the first blank line, the end of a speech, or at a stop string.

Errors come in the API's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a malformed body or
value out of range (max_tokens above the limit, a prompt longer than the model's context), 401 for a
missing or wrong API key when the server has one, 404 for an unknown model. Usage counts re-encode the
text (exact for character models; a BPE model's sampled tokens may merge differently when re-encoded).

Generation is blocking CPU work: each request runs in a worker thread with its own KV cache, and one lock
lets a single decoding step run at a time, so concurrent requests interleave token by token and none waits
for another to finish.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from project.chat import PromptTemplate
from project.formats.checkpoint import LoadedCheckpoint
from project.tokenizer import Tokenizer
from project.generate import GenerationSettings, InvalidSetting, request_model, stream

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4  # as the OpenAI API allows
MAX_TEMPERATURE = 2.0
SPEECH_END = "\n\n"  # a blank line ends a speech in the chat template
ROLE_SPEAKERS = {"system": "SYSTEM", "developer": "SYSTEM", "user": "USER", "assistant": "ASSISTANT"}
API_PARAMS = {"max_new_tokens": "max_tokens"}  # GenerationSettings field -> the API's name, where they differ


class APIError(Exception):
    """A request the API refuses, answered with `status` and the OpenAI error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- request bodies (the fields the API defines that this server honours) ----------------------------------------


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None  # None (or absent): the API's default, 1
    top_p: float | None = None  # None (or absent): 1, the whole distribution
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    max_tokens: int | None = 16  # the API's default for completions


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # the newer name of max_tokens


def chat_prompt(messages: list[ChatMessage], template: PromptTemplate | None = None,
                tokenizer: Tokenizer | None = None) -> str | list[int]:
    """The prompt for `messages`: token ids through an instruction-tuned model's `template`, else text by the
    module's speaker template."""
    if template is not None:
        conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        return template.encode(conversation, tokenizer, add_generation_prompt=True)[0]
    turns = [f"{message.name or ROLE_SPEAKERS[message.role]}:\n{message.text()}{SPEECH_END}" for message in messages]
    return "".join(turns) + f"{ROLE_SPEAKERS['assistant']}:\n"


# --- generation ------------------------------------------------------------------------------------------------


class Generator:
    """Runs generation for the API's requests: validation into GenerationSettings, then locked decoding steps."""

    def __init__(self, loaded: LoadedCheckpoint, max_tokens_limit: int | None = None) -> None:
        self.loaded = loaded
        self.block_size = loaded.model.config.block_size
        self.max_tokens_limit = max_tokens_limit or self.block_size
        self.lock = threading.Lock()  # one decoding step at a time: the CPU is shared anyway

    def count_tokens(self, text: str) -> int:
        return len(self.loaded.tokenizer.encode(text)) if text else 0

    def check_prompt(self, prompt: str | list[int], param: str) -> int:
        """The prompt's token count (text, or a chat template's ids); APIError 400 when it is empty, not encodable
        or longer than the context."""
        if not prompt:
            raise APIError(400, f"{param} is empty: give at least one character", param=param)
        try:
            count = len(prompt) if isinstance(prompt, list) else self.count_tokens(prompt)
        except ValueError as err:  # e.g. a character outside a character model's vocabulary
            raise APIError(400, f"{param}: {err}", param=param) from None
        if count > self.block_size:
            raise APIError(400, f"{param} is {count} tokens but this model's context is {self.block_size} tokens: "
                           "shorten it", param=param, code="context_length_exceeded")
        return count

    def settings(self, body: SamplingFields, max_tokens: int | None, extra_stop: list[str]) -> GenerationSettings:
        """GenerationSettings from the request's sampling fields; APIError 400 naming the allowed range."""
        if body.n != 1:
            raise APIError(400, f"n must be 1 (one completion per request), got {body.n}", param="n")
        max_tokens = self.max_tokens_limit if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= self.max_tokens_limit:
            raise APIError(400, f"max_tokens must be from 1 to {self.max_tokens_limit} (this server's limit), "
                           f"got {max_tokens}", param="max_tokens")
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

    def pieces(self, prompt: str | list[int], settings: GenerationSettings) -> Iterator[str]:
        """The completion's text pieces; every decoding step holds the lock, waiting for the client does not."""
        model = request_model(self.loaded.model)  # shares the weights, owns its KV cache
        text_pieces = stream(model, self.loaded.tokenizer, prompt, settings)
        try:
            while True:
                with self.lock:
                    piece = next(text_pieces, None)
                if piece is None:
                    return
                yield piece
        finally:
            text_pieces.close()


def finish_reason(completion_tokens: int, settings: GenerationSettings) -> str:
    return "length" if completion_tokens >= settings.max_new_tokens else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# --- the routes ------------------------------------------------------------------------------------------------


def add_openai_routes(app: FastAPI, loaded: LoadedCheckpoint, *, model_name: str = "gpt", api_key: str | None = None,
                      max_tokens_limit: int | None = None) -> FastAPI:
    """Add the /v1 routes and the API's error handling to `app`, serving `loaded` under `model_name`.

    With `api_key`, every /v1 request needs `Authorization: Bearer <api_key>` (401 otherwise).
    `max_tokens_limit` caps max_tokens (default: the model's context).
    """
    generator = Generator(loaded, max_tokens_limit)
    created = int(time.time())
    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "project"}

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
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            return JSONResponse(APIError(400, f"the request body is not valid JSON ({first['msg']})").body(), 400)
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        return JSONResponse(APIError(400, f"{where}: {first['msg']}", param=where or None).body(), 400)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    def list_models() -> dict:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name}", dependencies=[Depends(check_key)])
    def retrieve_model(name: str) -> dict:
        check_model(name)
        return model_card

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    def completions(body: CompletionRequest):
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list: give at least one prompt", param="prompt")
        prompt_tokens = [generator.check_prompt(p, "prompt") for p in prompts]
        settings = generator.settings(body, body.max_tokens, [])
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        head = {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": model_name}

        include_usage = bool((body.stream_options or {}).get("include_usage"))
        if body.stream:
            return event_stream(completion_events(generator, prompts, settings, head, sum(prompt_tokens), include_usage))
        return completion_response(generator, prompts, settings, head, sum(prompt_tokens))

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    def chat_completions(body: ChatRequest):
        check_model(body.model)
        if not body.messages:
            raise APIError(400, "messages is empty: give at least one message", param="messages")
        prompt = chat_prompt(body.messages, loaded.template, loaded.tokenizer)
        prompt_tokens = generator.check_prompt(prompt, "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        settings = generator.settings(body, max_tokens, [SPEECH_END] if loaded.template is None else [])
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

        include_usage = bool((body.stream_options or {}).get("include_usage"))
        if body.stream:
            return event_stream(chat_events(generator, prompt, settings, head, prompt_tokens, include_usage))
        return chat_response(generator, prompt, settings, head, prompt_tokens)

    return app


def completion_events(generator: Generator, prompts: list[str], settings: GenerationSettings, head: dict,
                      prompt_tokens: int, include_usage: bool) -> Iterator[str]:
    """The streamed /v1/completions: a chunk per piece of text, a closing chunk per prompt, then usage if asked."""
    completion_tokens = 0
    for index, prompt in enumerate(prompts):
        text = ""
        for piece in generator.pieces(prompt, settings):
            text += piece
            yield sse({**head, "choices": [{"index": index, "text": piece, "logprobs": None, "finish_reason": None}]})
        tokens = generator.count_tokens(text)
        completion_tokens += tokens
        yield sse({**head, "choices": [{"index": index, "text": "", "logprobs": None,
                                        "finish_reason": finish_reason(tokens, settings)}]})
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})


def completion_response(generator: Generator, prompts: list[str], settings: GenerationSettings, head: dict,
                        prompt_tokens: int) -> dict:
    """The unstreamed /v1/completions: one choice per prompt."""
    choices, completion_tokens = [], 0
    for index, prompt in enumerate(prompts):
        text = "".join(generator.pieces(prompt, settings))
        tokens = generator.count_tokens(text)
        completion_tokens += tokens
        choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason(tokens, settings)})
    return {**head, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chat_events(generator: Generator, prompt: str | list[int], settings: GenerationSettings, head: dict,
                prompt_tokens: int, include_usage: bool) -> Iterator[str]:
    """The streamed /v1/chat/completions: the assistant role, a delta per piece, the finish reason, usage if asked."""
    chunk = {**head, "object": "chat.completion.chunk"}
    yield sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    text = ""
    for piece in generator.pieces(prompt, settings):
        text += piece
        yield sse({**chunk, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
    tokens = generator.count_tokens(text)
    yield sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason(tokens, settings)}]})
    if include_usage:
        yield sse({**chunk, "choices": [], "usage": usage(prompt_tokens, tokens)})


def chat_response(generator: Generator, prompt: str | list[int], settings: GenerationSettings, head: dict,
                  prompt_tokens: int) -> dict:
    """The unstreamed /v1/chat/completions: one assistant message."""
    text = "".join(generator.pieces(prompt, settings))
    tokens = generator.count_tokens(text)
    return {**head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason(tokens, settings)}],
            "usage": usage(prompt_tokens, tokens)}


def event_stream(events: Iterator[str]) -> StreamingResponse:
    """Server-sent events ending with `data: [DONE]`; a failure mid-stream ends it with an error event."""

    def guarded() -> Iterator[str]:
        try:
            yield from events
        except Exception as err:  # noqa: BLE001 - the status line is sent already: report in the stream, log it
            log.exception("generation failed mid-stream")
            yield sse(APIError(500, f"internal error ({type(err).__name__})", type="server_error").body())
        yield sse("[DONE]")

    return StreamingResponse(guarded(), media_type="text/event-stream")

