"""The OpenAI-compatible API (project/serve/openai_api.py), served with the Gradio page on one port (project/serve/page.py),
through the official `openai` client and raw HTTP."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import free_port

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("gradio")

from project.serve.server import build_server  # noqa: E402
from project.formats.checkpoint import load_model  # noqa: E402
from project.generate import GenerationSettings, stream  # noqa: E402
from project.serve.openai_api import ChatMessage, chat_prompt  # noqa: E402

MODEL = "tiny-shakespeare"
KEY = "test-key-123"
CLIENT_TIMEOUT_S = 120  # every request in these tests must finish within this


def serve_in_thread(app):
    """Run `app` with uvicorn on a free loopback port in a thread; yield its base URL, then stop it."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def url(loaded):
    yield from serve_in_thread(build_server(loaded, model_name=MODEL))


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
    args = dict(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    reply = client.chat.completions.create(**args)
    text = reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant"
    prompt = chat_prompt([ChatMessage(**m) for m in messages])
    assert text == library_text(loaded, prompt, max_new_tokens=24, temperature=0, stop=["\n\n"])
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
        return client.completions.create(model=MODEL, prompt="First Citizen:\n", max_tokens=30, temperature=1.0,
                                          top_p=0.9, seed=seed).choices[0].text

    first, again, other = ask(5), ask(5), ask(6)
    assert first == again != other
    assert first == library_text(loaded, "First Citizen:\n", max_new_tokens=30, temperature=1.0, top_p=0.9, seed=5)


def test_stop_strings_end_the_text(client):
    args = dict(model=MODEL, prompt="First Citizen:\n", max_tokens=30, temperature=1.0, seed=3)
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
    ({"n": 2}, 400, "n", None),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"prompt": "caf\u00e9"}, 400, "prompt", None),  # a character outside the model's vocabulary
    ({"prompt": ""}, 400, "prompt", None),
])
def test_bad_requests_get_the_error_shape(client, overrides, status, param, code):
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(**{"model": MODEL, "prompt": "ROMEO:", "max_tokens": 5, **overrides})
    err = caught.value
    assert err.status_code == status
    assert set(err.body) == {"message", "type", "param", "code"} and err.body["message"]
    assert (err.body["param"], err.body["code"], err.body["type"]) == (param, code, "invalid_request_error")


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
    yield from serve_in_thread(build_server(loaded, model_name=MODEL, api_key=KEY))


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


def test_twenty_concurrent_requests_all_succeed(client, loaded):
    seeds = list(range(20))

    def ask(seed):
        if seed % 2:  # half streamed, half not: both share the one model
            pieces = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Speak"}],
                                                    max_tokens=16, temperature=1.0, seed=seed, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
        return client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=16, temperature=1.0,
                                         seed=seed).choices[0].text

    with ThreadPoolExecutor(max_workers=len(seeds)) as pool:
        answers = list(pool.map(ask, seeds))  # an exception or a timeout in any request fails the test
    chat = chat_prompt([ChatMessage(role="user", content="Speak")])
    for seed, answer in zip(seeds, answers):  # interleaved requests do not disturb each other
        prompt, stop = (chat, ["\n\n"]) if seed % 2 else ("ROMEO:", [])
        assert answer == library_text(loaded, prompt, max_new_tokens=16, temperature=1.0, seed=seed, stop=stop)


def test_the_page_answers_on_the_same_port(url):
    from gradio_client import Client

    text, status = Client(url, verbose=False).predict("ROMEO:", 10, 0.8, 20, 1.0, 1, api_name="/generate")
    assert status.startswith("done") and text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 10
    assert httpx.get(url, timeout=CLIENT_TIMEOUT_S).status_code == 200
    assert httpx.get(f"{url}/config", timeout=CLIENT_TIMEOUT_S).status_code == 200  # no key: no password
