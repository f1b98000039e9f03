"""The OpenAI-compatible API (project/serve/openai_api.py), served with the Gradio page on one port (project/serve/page.py),
through the official `openai` client and raw HTTP, on the trained character model and on a trained-BPE model."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import GPT2_STYLE, REPO, free_port, tiny_gpt

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("gradio")

from project.serve.server import build_server  # noqa: E402
from project.formats.checkpoint import load_model  # noqa: E402
from project.generate import GenerationSettings, stream  # noqa: E402
from project.serve.openai_api import ChatMessage, chat_prompt  # noqa: E402
from project.serve.page import App  # noqa: E402
from project.serve.scheduler import Scheduler  # noqa: E402

MODEL = "tiny-shakespeare"
KEY = "test-key-123"
CLIENT_TIMEOUT_S = 120  # every request in these tests must finish within this


def serve_in_thread(app, *, wait_for_page: bool = False):
    """Run `app` with uvicorn on a free loopback port in a thread; yield its base URL (once the page serves too, with
    `wait_for_page`), then stop it."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    if wait_for_page:
        assert app.state.page_ready.wait(CLIENT_TIMEOUT_S), "the page was not built"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def app(loaded):
    return build_server(loaded, model_name=MODEL)


@pytest.fixture(scope="module")
def url(app):
    yield from serve_in_thread(app)


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=CLIENT_TIMEOUT_S, max_retries=0)


def library_text(loaded, prompt: str, **settings) -> str:
    """What project.generate.stream produces for the same prompt and settings (top-k off, as in the API)."""
    return "".join(stream(loaded.model, loaded.tokenizer, prompt, GenerationSettings(top_k=None, **settings)))


# --- listing, completion, chat ----------------------------------------------------------------------------------


def test_lists_and_retrieves_the_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_is_the_library_text(client, loaded):
    response = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=20, temperature=0)
    choice = response.choices[0]
    assert choice.text == library_text(loaded, "ROMEO:", max_new_tokens=20, temperature=0)
    assert len(choice.text) == 20 and choice.finish_reason == "length"  # a character model: one token a character
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (6, 20)


def test_absent_or_null_sampling_fields_take_the_api_defaults(url, loaded):
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 12, "seed": 4}
    plain = httpx.post(f"{url}/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S).json()
    nulls = httpx.post(f"{url}/v1/completions", json={**body, "temperature": None, "top_p": None},
                       timeout=CLIENT_TIMEOUT_S).json()
    expected = library_text(loaded, "ROMEO:", max_new_tokens=12, temperature=1.0, seed=4)
    assert plain["choices"][0]["text"] == nulls["choices"][0]["text"] == expected


def test_completion_of_several_prompts(client, loaded):
    response = client.completions.create(model=MODEL, prompt=["ROMEO:", "JULIET:"], max_tokens=8, temperature=0)
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.text for c in response.choices] == [library_text(loaded, p, max_new_tokens=8, temperature=0)
                                                  for p in ("ROMEO:", "JULIET:")]


def test_chat_template():
    messages = [ChatMessage(role="system", content="Speak in verse."), ChatMessage(role="user", content="Hail!"),
                ChatMessage(role="assistant", content="Good morrow."),
                ChatMessage(role="user", name="JULIET", content=[{"type": "text", "text": "O Romeo"}])]
    assert chat_prompt(messages) == ("SYSTEM:\nSpeak in verse.\n\nUSER:\nHail!\n\nASSISTANT:\nGood morrow.\n\n"
                                     "JULIET:\nO Romeo\n\nASSISTANT:\n")


def test_chat_streamed_equals_unstreamed_and_the_library(client, loaded):
    messages = [{"role": "user", "name": "ROMEO", "content": "But soft"}]
    args = dict(model=MODEL, messages=messages, max_tokens=4, temperature=0)  # 28 prompt tokens: 4 fit the context
    reply = client.chat.completions.create(**args)
    text = reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant"
    prompt = chat_prompt([ChatMessage(**m) for m in messages])
    assert text == library_text(loaded, prompt, max_new_tokens=4, temperature=0, stop=["\n\n"])
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1, "the reply should arrive in several pieces"
    assert "".join(deltas) == text
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason


def test_stream_is_server_sent_events_ending_with_done(url):
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1


def test_seed_reproduces_the_text(client, loaded):
    def ask(seed):
        return client.completions.create(model=MODEL, prompt="First Citizen:\n", max_tokens=16, temperature=1.0,
                                          top_p=0.9, seed=seed).choices[0].text

    first, again, other = ask(5), ask(5), ask(6)
    assert first == again != other
    assert first == library_text(loaded, "First Citizen:\n", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=5)


def test_stop_strings_end_the_text(client):
    args = dict(model=MODEL, prompt="First Citizen:\n", max_tokens=16, temperature=1.0, seed=3)
    full = client.completions.create(**args).choices[0].text
    stop = full[10:12]  # a string the unstopped text contains
    choice = client.completions.create(**args, stop=[stop, "@@"]).choices[0]
    assert choice.text == full[: full.index(stop)] and choice.finish_reason == "stop"


# --- bad requests ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, status, param, code", [
    ({"model": "gpt-4"}, 404, "model", "model_not_found"),
    ({"prompt": "ROMEO: " * 10}, 400, "prompt", "context_length_exceeded"),  # 70 tokens, the context is 32
    ({"max_tokens": 1_000_000}, 400, "max_tokens", None),
    ({"max_tokens": 0}, 400, "max_tokens", None),
    ({"temperature": 3.0}, 400, "temperature", None),
    ({"top_p": 0.0}, 400, "top_p", None),
    ({"n": 0}, 400, "n", None),
    ({"best_of": 1, "n": 2}, 400, "best_of", None),
    ({"best_of": 2, "stream": True}, 400, "best_of", None),
    ({"logprobs": 6}, 400, "logprobs", None),
    ({"seed": 2**64}, 400, "seed", None),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"prompt": "caf\u00e9"}, 400, "prompt", None),  # a character outside the model's vocabulary
    ({"prompt": ""}, 400, "prompt", None),
    ({"frobnicate": 1}, 400, "frobnicate", None),  # a field OpenAI does not have either
    ({"logit_bias": {"1": 5}}, 400, "logit_bias", None),  # OpenAI's, not implemented here
    ({"presence_penalty": 0.5}, 400, "presence_penalty", None),
    ({"suffix": "!"}, 400, "suffix", None),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options", None),
])
def test_bad_requests_get_the_error_shape(client, overrides, status, param, code):
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=5, extra_body=overrides)
    err = caught.value
    assert err.status_code == status
    assert set(err.body) == {"message", "type", "param", "code"} and err.body["message"]
    assert (err.body["param"], err.body["code"], err.body["type"]) == (param, code, "invalid_request_error")
    if "frobnicate" in overrides:
        assert err.body["message"] == "Unrecognized request argument supplied: frobnicate"  # OpenAI's words
    elif param in ("logit_bias", "presence_penalty", "suffix"):
        assert err.body["message"].startswith(f"{param} is not supported by this server")


def test_unsupported_fields_at_their_no_op_values_are_accepted(client):
    noop = {"logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0, "user": "me", "suffix": None}
    plain = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=5, temperature=0)
    assert client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=5, temperature=0,
                                     extra_body=noop).choices[0].text == plain.choices[0].text
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A"}],
                                       extra_body={"tools": [{"type": "function", "function": {"name": "f"}}]})
    assert caught.value.body["param"] == "tools"


def test_chat_over_the_context_is_refused(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ROMEO: " * 6}])
    assert caught.value.body["code"] == "context_length_exceeded" and caught.value.body["param"] == "messages"


@pytest.mark.parametrize("content, message", [
    (b'{"model": "tiny-shakespeare", "prompt": "ROMEO:"', "not valid JSON"),
    (b'{"model": "tiny-shakespeare"}', "prompt: Field required"),
    (b'{"model": "tiny-shakespeare", "prompt": "ROMEO:", "max_tokens": "many"}', "max_tokens"),
])
def test_malformed_bodies_get_400_and_the_error_shape(url, content, message):
    response = httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"},
                          timeout=CLIENT_TIMEOUT_S)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and message in error["message"]


# --- the key, concurrency, the page beside the API ---------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_url(loaded):
    yield from serve_in_thread(build_server(loaded, model_name=MODEL, api_key=KEY), wait_for_page=True)


def test_api_key_is_enforced(keyed_url):
    client = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key="wrong-key", max_retries=0, timeout=CLIENT_TIMEOUT_S)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    response = httpx.post(f"{keyed_url}/v1/completions", json={"model": MODEL, "prompt": "A"})  # no key at all
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=KEY, max_retries=0, timeout=CLIENT_TIMEOUT_S)
    assert client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=3).choices[0].text
    assert httpx.get(f"{keyed_url}/config").status_code == 401  # the page's config needs the key as the password


def test_twenty_concurrent_requests_share_steps_and_answer_as_alone(client, app, loaded):
    """Concurrent requests decode together (continuous batching) yet each gets what it gets when served alone."""
    seeds = list(range(20))

    def ask(seed):
        if seed % 2:  # half streamed, half not: both share the one model
            pieces = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Speak"}],
                                                    max_tokens=8, temperature=1.0, seed=seed, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
        return client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=16, temperature=1.0,
                                         seed=seed).choices[0].text

    stats = app.state.scheduler.stats
    steps, rows = stats.steps, stats.rows
    with ThreadPoolExecutor(max_workers=len(seeds)) as pool:
        answers = list(pool.map(ask, seeds))  # an exception or a timeout in any request fails the test
    assert (stats.rows - rows) / (stats.steps - steps) > 2, "the requests should have shared decoding steps"
    assert answers == [ask(seed) for seed in seeds]  # each alone: the same tokens
    # and the library's text (its steps run one row, not four: the same tokens here, if not the same last bits)
    assert answers[0] == library_text(loaded, "ROMEO:", max_new_tokens=16, temperature=1.0, seed=0)


def test_sixty_concurrent_clients_get_answers_or_429_and_none_hangs(client):
    def ask(i):
        try:
            stream = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=4, stream=True, seed=i)
            return "".join(c.choices[0].text for c in stream if c.choices)
        except openai.RateLimitError as err:
            assert int(err.response.headers["retry-after"]) >= 1
            return None

    with ThreadPoolExecutor(max_workers=60) as pool:
        answers = list(pool.map(ask, range(60)))
    assert sum(a is not None for a in answers) >= 8 and all(a is None or len(a) == 4 for a in answers)


def test_the_page_answers_on_the_same_port(url, app):
    from gradio_client import Client

    assert app.state.page_ready.wait(CLIENT_TIMEOUT_S)
    text, status = Client(url, verbose=False).predict("ROMEO:", 10, 0.8, 20, 1.0, 1, api_name="/generate")
    assert status.startswith("done") and text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 10
    assert httpx.get(url, timeout=CLIENT_TIMEOUT_S).status_code == 200
    assert httpx.get(f"{url}/config", timeout=CLIENT_TIMEOUT_S).status_code == 200  # no key: no password


def test_the_api_serves_while_the_page_is_built_and_after_the_page_fails(loaded, monkeypatch, caplog):
    """The page is built in a thread after the app listens: meanwhile "/" answers 503 with Retry-After and the API
    answers; a page that fails to build leaves the API serving and "/" a 500 naming the log."""
    import project.serve.server

    release = threading.Event()
    real_build_page = project.serve.server.build_page

    def slow_build_page(*args, **kwargs):
        assert release.wait(CLIENT_TIMEOUT_S)
        return real_build_page(*args, **kwargs)

    monkeypatch.setattr(project.serve.server, "build_page", slow_build_page)
    app = build_server(loaded, model_name=MODEL)
    for url in serve_in_thread(app):
        starting = httpx.get(url, timeout=CLIENT_TIMEOUT_S)
        assert starting.status_code == 503 and int(starting.headers["retry-after"]) >= 1
        assert "starting" in starting.text and 'http-equiv="refresh"' in starting.text
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=CLIENT_TIMEOUT_S, max_retries=0)
        assert len(client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=3).choices[0].text) == 3
        assert not app.state.page_ready.is_set()
        release.set()
        assert app.state.page_ready.wait(CLIENT_TIMEOUT_S)
        assert httpx.get(url, timeout=CLIENT_TIMEOUT_S).status_code == 200

    def broken_build_page(*args, **kwargs):
        raise RuntimeError("a bug in the page")

    monkeypatch.setattr(project.serve.server, "build_page", broken_build_page)
    app = build_server(loaded, model_name=MODEL)
    for url in serve_in_thread(app):
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        while (response := httpx.get(url, timeout=CLIENT_TIMEOUT_S)).status_code == 503:
            assert time.monotonic() < deadline, "the failed page still says it is starting"
            time.sleep(0.05)
        assert response.status_code == 500 and "log" in response.text
        assert "a bug in the page" in caplog.text
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=CLIENT_TIMEOUT_S, max_retries=0)
        assert len(client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=3).choices[0].text) == 3


# --- exact answers: log-probabilities, echo, n, best_of ----------------------------------------------------------


def model_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits over `ids` in one forward: row i predicts token i + 1."""
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)


def test_completion_logprobs_and_echo_are_the_models(client, loaded):
    response = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=6, temperature=0, logprobs=3,
                                         echo=True)
    choice = response.choices[0]
    prompt_ids = loaded.tokenizer.encode("ROMEO:")
    ids = prompt_ids + loaded.tokenizer.encode(choice.text[len("ROMEO:"):])
    expected = model_logprobs(loaded.model, ids)
    lp = choice.logprobs
    assert choice.text.startswith("ROMEO:") and "".join(lp.tokens) == choice.text and len(ids) == len(prompt_ids) + 6
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(ids))]
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-4)
        top = expected[i - 1].topk(3)
        assert len(lp.top_logprobs[i]) in (3, 4) and lp.tokens[i] in lp.top_logprobs[i]  # the top 3 + the chosen
        for token, value in zip(top.indices.tolist(), top.values.tolist()):
            assert lp.top_logprobs[i][loaded.tokenizer.decode([token])] == pytest.approx(value, abs=1e-4)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (6, 6)
    scored = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=0, logprobs=0, echo=True)
    assert scored.choices[0].text == "ROMEO:" and scored.usage.completion_tokens == 0  # scoring a text, as lm-eval does
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:6], abs=1e-6)


def test_chat_logprobs_give_tokens_bytes_and_alternatives(client, loaded):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Speak"}], max_tokens=5,
                                           temperature=0, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    for entry in content:
        assert bytes(entry.bytes).decode() == entry.token and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.logprob - 1e-6 or \
            entry.token in {alt.token for alt in entry.top_logprobs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "A"}], top_logprobs=2)
    assert caught.value.body["param"] == "top_logprobs"


def test_n_choices_sample_with_seed_plus_their_index(client):
    args = dict(model=MODEL, prompt="First Citizen:\n", max_tokens=12, temperature=1.0)
    response = client.completions.create(**args, n=3, seed=10)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text for c in response.choices] == [client.completions.create(**args, seed=10 + i).choices[0].text
                                                  for i in range(3)]
    assert response.usage.completion_tokens == 36 and len({c.text for c in response.choices}) > 1
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hail"}], max_tokens=8,
                                          n=2, seed=3, temperature=1.0)
    assert [c.index for c in chat.choices] == [0, 1]


def test_best_of_returns_the_candidate_with_the_highest_mean_logprob(client):
    args = dict(model=MODEL, prompt="First Citizen:\n", max_tokens=10, temperature=1.0, logprobs=0)
    best = client.completions.create(**args, best_of=3, seed=20)
    candidates = [client.completions.create(**args, seed=20 + i).choices[0] for i in range(3)]
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in candidates]
    assert best.choices[0].text == candidates[means.index(max(means))].text
    assert best.usage.completion_tokens == 30  # every candidate was computed


# --- one admission limit for the API and the page -------------------------------------------------------------


def test_a_full_queue_answers_429_with_retry_after_and_the_page_says_busy(loaded):
    """One slot, nothing may wait: while a request holds the (never started) scheduler, the API and the page refuse."""
    scheduler = Scheduler(loaded.model, slots=1, max_waiting=0)
    app = build_server(loaded, model_name=MODEL, scheduler=scheduler)
    for url in serve_in_thread(app):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=CLIENT_TIMEOUT_S, max_retries=0)
        first = ThreadPoolExecutor(1).submit(client.completions.create, model=MODEL, prompt="ROMEO:", max_tokens=3)
        deadline = time.monotonic() + 30
        while not scheduler.waiting:
            assert time.monotonic() < deadline and not first.done(), "the first request never reached the scheduler"
            time.sleep(0.05)
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=3)
        assert caught.value.body["code"] == "rate_limit_exceeded" and "busy" in caught.value.body["message"]
        assert int(caught.value.response.headers["retry-after"]) >= 1

        async def page():
            return [u async for u in App(loaded, scheduler).generate("ROMEO:", 5, 0.8, 20, 1.0, 1)]

        with pytest.warns(UserWarning, match="busy"):
            (text, status), = asyncio.run(page())
        assert status.startswith("error: the server is busy") and text == "ROMEO:"
        scheduler.close()  # as a server's shutdown does: the waiting request gets an error, not a hang
        with pytest.raises(openai.APIStatusError) as caught:
            first.result(timeout=30)
        assert caught.value.status_code == 503


# --- a trained-BPE model, exported and served offline ---------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_url(shakespeare_path, tmp_path_factory):
    """A tiny random GPT with a trained BPE, exported to a transformers folder and loaded with no tiktoken cache and
    no network (every socket connection refused while it loads), then served."""
    from project.formats.hf import export_hf
    from project.tokenizer import train_bpe

    tokenizer = train_bpe(shakespeare_path.read_text()[:100_000], 300)
    folder = tmp_path_factory.mktemp("bpe") / "hf"
    export_hf(tiny_gpt(tokenizer.vocab_size, spread=0.5, block_size=64, **GPT2_STYLE), tokenizer, folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("empty-tiktoken-cache")))

        def refuse(*args, **kwargs):
            raise OSError("no network in this test")

        patch.setattr(socket.socket, "connect", refuse)
        loaded = load_model(folder)
    assert loaded.tokenizer.kind == "bpe" and loaded.tokenizer.encode("ROMEO:") == tokenizer.encode("ROMEO:")
    for url in serve_in_thread(build_server(loaded, model_name=MODEL)):
        yield url, loaded.tokenizer


def test_bpe_usage_and_finish_reason_count_sampled_ids_not_re_encoded_text(bpe_url):
    url, tokenizer = bpe_url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=CLIENT_TIMEOUT_S, max_retries=0)
    texts, tokens = [], []
    for seed in range(4):
        response = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=20, temperature=1.0, seed=seed,
                                             logprobs=0)
        choice = response.choices[0]
        texts.append(choice.text)
        tokens.append(response.usage.completion_tokens)
        if choice.finish_reason == "length":
            assert response.usage.completion_tokens == len(choice.logprobs.tokens) == 20
        else:  # the end-of-text token was sampled: counted, not shown
            assert choice.finish_reason == "stop" and response.usage.completion_tokens == len(choice.logprobs.tokens) + 1
    re_encoded = [len(tokenizer.encode(text)) for text in texts]
    assert re_encoded != tokens, "these random-model samples should re-encode to other token counts"


# --- shutting down ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_with_requests_in_flight_stops_the_server_at_once(trained_run, tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "project", "serve", "--ckpt_path", str(trained_run["ckpt"]),
                               "--port", str(port), "--compile", "false", "--slots", "1", "--max_queue", "64"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()[-3000:]
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60, max_retries=0)

        def ask(seed):
            try:
                return client.completions.create(model="gpt", prompt="ROMEO:", max_tokens=24, seed=seed,
                                                 stream=seed % 2 == 1)
            except (openai.APIStatusError, openai.APIConnectionError) as err:
                return err

        with ThreadPoolExecutor(40) as pool:
            futures = [pool.submit(ask, seed) for seed in range(40)]
            while not any(f.done() for f in futures):
                time.sleep(0.01)
            server.send_signal(signal.SIGINT)  # one slot, 40 requests: most are waiting or decoding
            start = time.monotonic()
            returncode = server.wait(timeout=30)
            assert time.monotonic() - start < 15
            for future in futures:
                answer = future.result(timeout=30)  # none hangs
                if isinstance(answer, openai.Stream):
                    try:
                        list(answer)
                    except (openai.APIError, httpx.HTTPError):  # an error event, or the connection closed
                        pass
    finally:
        server.kill()
    stderr = server.stderr.read()
    assert returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr[-3000:]
