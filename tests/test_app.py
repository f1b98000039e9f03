"""The Gradio app (project/serve/page.py): its handlers directly, the running server through gradio_client, and the
page in a real headless Chromium."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import DEBUG_CONFIG, REPO, free_port, run_cli

gr = pytest.importorskip("gradio")
pytest.importorskip("matplotlib")

from project.serve.page import App, build_app, model_card  # noqa: E402
from project.serve.scheduler import Scheduler  # noqa: E402
from project.formats.checkpoint import load_model  # noqa: E402
from project.commands import serve_command  # noqa: E402
from project.generate import GenerationSettings, stream  # noqa: E402


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
GEN_ARGS = dict(max_new_tokens=24, temperature=0.8, top_k=20, top_p=0.95)
MODEL = DEBUG_CONFIG["model"]["config"]  # the trained_run checkpoint's architecture
TOO_LONG = "ROMEO: " * (MODEL["block_size"] // 7 + 1)  # a character per token: over the context, under 200 chars


@pytest.fixture(scope="module")
def handlers(loaded, scheduler) -> App:
    return App(loaded, scheduler, max_prompt_chars=200)


def updates(handlers: App, prompt, **args) -> list[tuple[str, str]]:
    """Every (text, status) update of the page's generate handler (an async generator), run to its end."""
    async def collect():
        return [update async for update in handlers.generate(prompt, **args)]

    return asyncio.run(collect())


@pytest.fixture(scope="module")
def server(loaded, scheduler):
    """The app served on 127.0.0.1 at a free port, in this process."""
    demo = build_app(loaded, scheduler, max_prompt_chars=200)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            ssr_mode=False)
    yield url
    demo.close()


# --- the handlers, called directly ---------------------------------------------------------------------------


def test_generate_streams_and_concatenates(handlers, loaded):
    streamed = updates(handlers, "ROMEO:", seed=7, **GEN_ARGS)
    texts = [text for text, _ in streamed]
    assert len(streamed) > 3, "the completion should arrive in several pieces"
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1)), "each update extends the last"
    final, status = streamed[-1]
    assert status.startswith("done")
    pieces = stream(loaded.model, loaded.tokenizer, "ROMEO:", GenerationSettings(seed=7, **GEN_ARGS))
    assert final == "ROMEO:" + "".join(pieces)  # the same text as the library's stream, for the same seed
    assert len(final) == len("ROMEO:") + GEN_ARGS["max_new_tokens"]  # one character per token


@pytest.mark.parametrize("prompt, overrides, message", [
    ("", {}, "prompt is empty"),
    ("ROMEO:", {"temperature": -0.5}, "temperature must be a number >= 0"),
    ("ROMEO:", {"seed": 2**64}, "seed must be a whole number from 0 to"),
    ("ROMEO:", {"top_p": 1.5}, "top_p must be in (0, 1]"),
    ("ROMEO:", {"top_p": 0.0}, "top_p must be in (0, 1]"),
    ("ROMEO:", {"top_k": -3}, "top-k must be"),
    ("ROMEO:", {"max_new_tokens": 10_000}, "max new tokens must be"),
    ("ROMEO:", {"temperature": None}, "temperature must be a number"),
    ("ROMEO:", {"seed": 1.5}, "seed must be"),
    (TOO_LONG, {}, f"context is {MODEL['block_size']}"),
    ("x" * 201, {}, "limit is 200"),  # over the character cap
    ("ROMEO: \u00e9", {}, "not in this model's vocabulary"),
])
def test_bad_generate_inputs_give_a_message(handlers, prompt, overrides, message):
    args = {**GEN_ARGS, "seed": 1, **overrides}
    # the message is also raised as a Gradio warning toast; outside a request Gradio issues it as a UserWarning
    with pytest.warns(UserWarning, match=re.escape(message)):
        streamed = updates(handlers, prompt, **args)  # no exception
    assert len(streamed) == 1
    text, status = streamed[0]
    assert status.startswith("error: ") and message in status, status
    assert text == prompt  # the prompt stays in the output box, nothing generated


def test_attention_returns_figures_and_sorted_top10(handlers, loaded):
    from matplotlib.figure import Figure

    heatmap, bars, rows, status = handlers.attention("ROMEO:\nBut soft", 1, 1)
    assert isinstance(heatmap, Figure) and isinstance(bars, Figure), status
    assert [t.get_text() for t in heatmap.axes[0].get_xticklabels()][:3] == ["R", "O", "M"]  # token labels
    assert len(rows) == 10 and "prompt tokens" in status
    top = handlers.next_token_top("ROMEO:\nBut soft")
    probs = [p for _, p in top]
    assert len(top) == 10 and probs == sorted(probs, reverse=True)
    assert all(p > 0 for p in probs) and sum(probs) <= 1 + 1e-6
    labels, weights = handlers.attention_weights("ROMEO:\nBut soft", 1, 1)
    assert weights.shape == (15, 15) and len(labels) == 15
    assert torch.allclose(weights.sum(-1), torch.ones(15), atol=1e-5)  # each query's weights sum to 1
    assert torch.all(weights.triu(1) == 0)  # causal: no token attends to a later one


@pytest.mark.parametrize("prompt, layer, head, message", [
    ("", 0, 0, "prompt is empty"),
    ("ROMEO:", 2, 0, "layer must be a whole number from 0 to 1"),
    ("ROMEO:", 0, -1, "head must be a whole number from 0 to 1"),
    ("ROMEO:", None, 0, "layer must be"),
    (TOO_LONG, 0, 0, f"context is {MODEL['block_size']}"),
])
def test_bad_attention_inputs_give_a_message(handlers, prompt, layer, head, message):
    with pytest.warns(UserWarning, match=re.escape(message)):  # the toast, as above
        heatmap, bars, rows, status = handlers.attention(prompt, layer, head)
    assert heatmap is None and bars is None and rows == []
    assert status.startswith("error: ") and message in status, status


def test_model_card_describes_the_checkpoint(loaded):
    card = model_card(loaded)
    for needle in ("parameters", f"{loaded.model.num_params():,}", "characters (65 symbols)",
                   f"| training steps | {DEBUG_CONFIG['trainer']['max_steps']} |", "| val loss |", "| val bpb |",
                   "| val ppl |", "| best val loss |",
                   f"| context (block_size) | {MODEL['block_size']} |", f"| layers | {MODEL['n_layer']} |"):
        assert needle in card, needle


def test_exported_transformers_directory_serves_the_same_text(loaded, handlers, tmp_path):
    pytest.importorskip("transformers")
    from project.formats.hf import export_hf

    out = export_hf(loaded.model, loaded.tokenizer, tmp_path / "hf")
    exported = load_model(out)
    assert exported.tokenizer.chars == loaded.tokenizer.chars
    args = {**GEN_ARGS, "seed": 11}
    exported_scheduler = Scheduler(exported.model, slots=1).start()
    try:
        served = updates(App(exported, exported_scheduler), "ROMEO:", **args)[-1]
        assert served == updates(handlers, "ROMEO:", **args)[-1]
    finally:
        exported_scheduler.close()


def test_serve_binds_locally_by_default_and_needs_a_key_elsewhere(monkeypatch, trained_run):
    from project.serve import server

    calls = {}

    def run_server(app, host, port, scheduler):
        calls.update(app=app, host=host, port=port)
        assert app.state.scheduler is scheduler and scheduler.thread.is_alive()
        scheduler.close()

    monkeypatch.setattr(server, "run_server", run_server)
    monkeypatch.delenv("PROJECT_API_KEY", raising=False)
    serve_command(ckpt_path=str(trained_run["ckpt"]), compile=False)
    assert calls["host"] == "127.0.0.1" and calls["port"] == 7860
    paths = {getattr(route, "path", None) for route in calls["app"].routes}
    # the API and the page on one app (Starlette stores the mount at "/" as "")
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", ""} <= paths
    with pytest.raises(ValueError, match="--api_key or PROJECT_API_KEY"):
        serve_command(ckpt_path=str(trained_run["ckpt"]), host="0.0.0.0", port=8001, compile=False)
    calls.clear()
    monkeypatch.setenv("PROJECT_API_KEY", "secret")
    serve_command(ckpt_path=str(trained_run["ckpt"]), host="0.0.0.0", port=8001, compile=False)
    assert calls["host"] == "0.0.0.0" and calls["port"] == 8001


def test_serve_cli_reports_a_missing_checkpoint_in_one_line(tmp_path):
    result = run_cli("serve", "--ckpt_path", str(tmp_path / "missing.ckpt"), cwd=tmp_path, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: checkpoint")
    assert "Traceback" not in result.stderr


# --- the running server, through gradio_client -----------------------------------------------------------------


def test_server_answers_concurrent_requests_and_survives_a_failure(server, handlers):
    from gradio_client import Client

    client = Client(server, verbose=False)
    seeds = [1, 2, 3, 4, 5]

    def ask(seed):
        return client.predict("First Citizen:\n", GEN_ARGS["max_new_tokens"], GEN_ARGS["temperature"],
                              GEN_ARGS["top_k"], GEN_ARGS["top_p"], seed, api_name="/generate")

    with ThreadPoolExecutor(max_workers=len(seeds)) as pool:
        answers = list(pool.map(ask, seeds))
    for seed, (text, status) in zip(seeds, answers):
        assert status.startswith("done"), status
        # concurrent requests do not disturb each other: each equals the same request made alone
        expected, _ = updates(handlers, "First Citizen:\n", seed=seed, **GEN_ARGS)[-1]
        assert text == expected

    text, status = client.predict("", 10, 0.8, 20, 1.0, 1, api_name="/generate")  # a failing request
    assert status.startswith("error: ") and "prompt is empty" in status
    text, status = client.predict("JULIET:\nO Romeo", 10, 0.8, 20, 1.0, 1, api_name="/generate")  # then a good one
    assert status.startswith("done") and text.startswith("JULIET:\nO Romeo") and len(text) == len("JULIET:\nO Romeo") + 10

    heatmap, bars, table, status = client.predict("ROMEO:", 0, 1, api_name="/attention")
    assert heatmap and bars and "prompt tokens" in status
    assert len(table["data"]) == 10


def test_server_streams_partial_outputs(server):
    from gradio_client import Client

    job = Client(server, verbose=False).submit("ROMEO:", 20, 0.8, 20, 1.0, 3, api_name="/generate")
    final_text, final_status = job.result(timeout=60)
    outputs = job.outputs()
    assert final_status.startswith("done") and len(outputs) > 2  # several updates streamed before the last
    assert outputs[-1][0] == final_text


# --- the page in a real headless browser -----------------------------------------------------------------------


def test_page_generates_in_a_browser(server, tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: CI must install Chromium (apt-get install chromium) for this test")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); required when CI is set")
    from playwright.sync_api import expect, sync_playwright

    prompt = "JULIET:\nO Romeo"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(server, wait_until="domcontentloaded", timeout=60_000)
            box = page.locator("#prompt textarea")
            box.wait_for(timeout=60_000)
            expect(page.locator("#model-card")).to_contain_text("training steps", timeout=30_000)
            box.fill(prompt)
            page.locator("#generate-btn").click()
            status = page.locator("#status textarea")
            deadline = time.monotonic() + 60
            while not status.input_value().startswith(("done", "error")) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert status.input_value().startswith("done"), status.input_value()
            text = page.locator("#output textarea").input_value()
            assert text.startswith(prompt) and len(text) > len(prompt)
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("CI"):
        artifacts = REPO / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        shutil.copy(shot, artifacts / "app.png")
