"""A Gradio app to sample from a trained model and look inside it.

    python -m project serve --ckpt_path runs/gpt/version_0/checkpoints/last.ckpt       (http://127.0.0.1:7860)

Generate: a prompt, streamed completion, sampling controls (max new tokens capped by the context,
temperature, top-k, top-p, seed), TinyShakespeare example prompts and a panel describing the model. An
instruction-tuned model (python -m project finetune) answers the prompt as an instruction, through its template.
Attention: for a prompt, one layer's and head's attention weights over the prompt tokens as a heatmap, and
the next-token top-10 probabilities as a bar chart.

Bad input (an empty or too long prompt, a value out of range) gives a message in the page, never a stack
trace. Generation goes through the server's scheduler (project/serve/scheduler.py), beside the API's requests and
under the same admission limit: when its queue is full the page says when to try again. A failed request leaves
the app serving.

`serve` puts the page and an OpenAI-compatible API (/v1) on one FastAPI app and port (project/serve/server.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch

from project.formats.checkpoint import LoadedCheckpoint
from project.generate import CompletionText, GenerationSettings
from project.serve.scheduler import Busy, Failed, Finished, Request, Scheduler, Token

if TYPE_CHECKING:  # gradio and matplotlib are imported when the app is built, so `import project.commands` stays light
    import gradio as gr
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

EXAMPLE_PROMPTS = ["ROMEO:", "First Citizen:\n", "JULIET:\nO Romeo"]
EXAMPLE_INSTRUCTIONS = ["Continue this speech by ROMEO.", "Which character speaks these lines?"]
TOP_N = 10  # next-token probabilities shown
MAX_LABELLED_TOKENS = 48  # beyond this many prompt tokens, the heatmap labels every n-th token only
ATTENTION_CONCURRENCY = 2  # attention views drawn at once (a full forward and two figures each); the rest queue


# --- what the page shows -------------------------------------------------------------------------------------


def model_card(loaded: LoadedCheckpoint) -> str:
    """Markdown describing the architecture, size, tokenizer and training of the loaded model."""
    cfg = loaded.model.config
    params = loaded.model.num_params()
    rows = [
        ("checkpoint", f"`{loaded.path.name}`"),
        ("parameters", f"{params:,} ({params / 1e6:.2f} M)"),
        ("tokenizer", loaded.tokenizer.describe()),
        ("training steps", f"{loaded.global_step:,}"),
    ]
    for name, value in sorted(loaded.metrics.items()):
        rows.append((name.replace("/", " ").replace("_", " "), f"{value:.4f}"))
    if not any("val" in name for name in loaded.metrics):
        rows.append(("val loss", "not recorded in this checkpoint"))
    arch = [("context (block_size)", cfg.block_size), ("layers", cfg.n_layer), ("heads", cfg.n_head),
            ("kv heads", cfg.kv_heads), ("embedding width", cfg.n_embd), ("vocab size", cfg.vocab_size),
            ("positions", cfg.positions), ("norm", cfg.norm), ("mlp", f"{cfg.mlp} (hidden {cfg.hidden_dim})"),
            ("tied embeddings", cfg.tie_embeddings), ("dropout", cfg.dropout)]
    lines = ["| model | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows + arch]
    return "\n".join(lines)


def token_label(text: str) -> str:
    """A short, visible label for one token: whitespace spelled out."""
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423")
    return text if len(text) <= 8 else text[:7] + "\u2026"


@dataclass
class Limits:
    """Bounds on every request."""

    max_prompt_chars: int
    block_size: int

    @property
    def max_new_tokens(self) -> int:
        return self.block_size


class App:
    """The request handlers behind the page, callable directly (tests, notebooks) as well as from Gradio."""

    def __init__(self, loaded: LoadedCheckpoint, scheduler: Scheduler, max_prompt_chars: int = 2000) -> None:
        if max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be >= 1, got {max_prompt_chars}")
        self.loaded = loaded
        self.scheduler = scheduler
        self.limits = Limits(max_prompt_chars, loaded.model.config.block_size)
        self.chat = loaded.template is not None  # prompts are instructions, answered through the template
        self.device = next(loaded.model.parameters()).device

    # -- validation ----------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | None) -> list[int]:
        """Token ids of a prompt that is non-empty, within the character cap and within the context."""
        if prompt is None or prompt == "":
            raise ValueError("the prompt is empty: type some text to continue (e.g. ROMEO:)")
        if len(prompt) > self.limits.max_prompt_chars:
            raise ValueError(f"the prompt has {len(prompt)} characters; the limit is {self.limits.max_prompt_chars}")
        if self.chat:
            ids, _ = self.loaded.template.encode([{"role": "user", "content": prompt}], self.loaded.tokenizer,
                                                 add_generation_prompt=True)
        else:
            ids = self.loaded.tokenizer.encode(prompt)
        if len(ids) > self.limits.block_size:
            raise ValueError(f"the prompt is {len(ids)} tokens but the model's context is {self.limits.block_size}: "
                             "shorten it")
        return ids

    def settings(self, max_new_tokens, temperature, top_k, top_p, seed) -> GenerationSettings:
        """GenerationSettings from the page's controls; ValueError naming the allowed range otherwise."""
        values = {"max new tokens": max_new_tokens, "temperature": temperature}
        for name, value in values.items():
            if value is None or not math.isfinite(float(value)):
                raise ValueError(f"{name} must be a number")
        if float(max_new_tokens) != int(max_new_tokens) or not 1 <= int(max_new_tokens) <= self.limits.max_new_tokens:
            raise ValueError(f"max new tokens must be a whole number from 1 to {self.limits.max_new_tokens} "
                             "(the model's context)")
        top_k = None if top_k is None or top_k == 0 else top_k
        if top_k is not None and (float(top_k) != int(top_k) or top_k < 1):
            raise ValueError(f"top-k must be a whole number >= 1 (0 = no limit), got {top_k}")
        top_p = None if top_p is None or top_p == 1 else float(top_p)
        if seed is not None and float(seed) != int(seed):
            raise ValueError(f"seed must be a whole number >= 0 (empty = random), got {seed}")
        return GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                  top_k=None if top_k is None else int(top_k), top_p=top_p,
                                  seed=None if seed is None else int(seed))

    # -- handlers ------------------------------------------------------------------------------------------

    async def generate(self, prompt, max_new_tokens, temperature, top_k, top_p, seed) -> AsyncIterator[tuple[str, str]]:
        """Yield (prompt + completion so far, or a chat model's answer, status) as the text streams; a bad request
        yields one message.

        Past the end of the context the window slides, as `generate` does. Stopping the iteration (the Stop button,
        a closed page) frees the request's slot.
        """
        shown = "" if self.chat else prompt or ""
        text = shown
        try:
            ids = self.encode_prompt(prompt)
            settings = self.settings(max_new_tokens, temperature, top_k, top_p, seed)
            eot_id = self.loaded.tokenizer.eot_id if settings.stop_at_eot else None
            handle = self.scheduler.submit(Request(ids, settings, eot_id=eot_id, slide=True),
                                           asyncio.get_running_loop())
        except (ValueError, Busy) as err:
            yield text, self.fail(err)
            return
        completion = CompletionText(self.loaded.tokenizer, settings)
        try:
            yield text, "generating..."
            async for event in handle:
                if isinstance(event, Token):
                    piece = completion.add(event.id)
                    if piece:
                        text += piece
                        yield text, "generating..."
                    if completion.stopped:
                        break
                elif isinstance(event, Failed):
                    yield text, self.fail(f"generation did not finish ({event.message})")
                    return
                elif isinstance(event, Finished):
                    break
            text += completion.end()
            yield text, f"done: {len(text) - len(shown)} characters generated"
        finally:
            handle.cancel()

    @torch.inference_mode()
    def next_token_top(self, prompt: str, n: int = TOP_N) -> list[tuple[str, float]]:
        """The `n` most likely next tokens after `prompt` and their probabilities, most likely first."""
        ids = self.encode_prompt(prompt)
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        probs = self.loaded.model(idx)[0, -1].float().softmax(dim=-1)
        top = torch.topk(probs, min(n, probs.numel()))
        return [(self.loaded.tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]

    @torch.inference_mode()
    def attention_weights(self, prompt: str, layer: int, head: int) -> tuple[list[str], torch.Tensor]:
        """Token labels and one head's attention matrix (T, T) over the prompt."""
        cfg = self.loaded.model.config
        for name, value, count in (("layer", layer, cfg.n_layer), ("head", head, cfg.n_head)):
            if value is None or float(value) != int(value) or not 0 <= int(value) < count:
                raise ValueError(f"{name} must be a whole number from 0 to {count - 1}, got {value}")
        ids = self.encode_prompt(prompt)
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        maps = self.loaded.model.attention_maps(idx)  # (n_layer, 1, H, T, T)
        labels = [token_label(self.loaded.tokenizer.decode([i])) for i in ids]
        return labels, maps[int(layer), 0, int(head)].float().cpu()

    def attention(self, prompt, layer, head):
        """(heatmap figure, top-10 bar figure, top-10 rows, status) for the page; figures are None on error."""
        try:
            labels, weights = self.attention_weights(prompt, layer, head)
            top = self.next_token_top(prompt)
            rows = [[token_label(tok), round(p, 4)] for tok, p in top]
            return (heatmap_figure(labels, weights, int(layer), int(head)), top_figure(top), rows,
                    f"{len(labels)} prompt tokens; next-token top-{len(top)} holds {sum(p for _, p in top):.1%}")
        except ValueError as err:
            return None, None, [], self.fail(err)
        except Exception as err:  # noqa: BLE001
            log.exception("attention view failed")
            return None, None, [], self.fail(f"internal error ({type(err).__name__}); the app is still running")

    @staticmethod
    def fail(err: Exception | str) -> str:
        """The one-line message a failed request shows, also raised as a Gradio warning toast in the page."""
        import gradio as gr

        message = f"error: {err}"
        try:
            gr.Warning(str(err))
        except Exception:  # noqa: BLE001 - outside a request there is no page to warn
            pass
        return message


# --- figures --------------------------------------------------------------------------------------------------


def heatmap_figure(labels: list[str], weights: torch.Tensor, layer: int, head: int) -> Figure:
    """Attention weights (query rows attend to key columns) with token labels on both axes."""
    from matplotlib.figure import Figure  # not pyplot: no global state shared between concurrent requests

    T = len(labels)
    size = min(10.0, max(4.0, 0.28 * T + 2))
    fig = Figure(figsize=(size, size * 0.9), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    step = max(1, math.ceil(T / MAX_LABELLED_TOKENS))
    ticks = list(range(0, T, step))
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=8)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=8)
    ax.set_xlabel("attended-to token (key)")
    ax.set_ylabel("token attending (query)")
    ax.set_title(f"layer {layer}, head {head}")
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention weight")
    return fig


def top_figure(top: list[tuple[str, float]]) -> Figure:
    """Horizontal bars of the next-token probabilities, most likely at the top."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), layout="constrained")
    ax = fig.add_subplot()
    names = [repr(token_label(tok)) for tok, _ in top]
    probs = [p for _, p in top]
    ax.barh(range(len(top)), probs, color="tab:blue")
    ax.set_yticks(range(len(top)), names, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, max(probs, default=1.0) * 1.15 or 1.0)
    for i, p in enumerate(probs):
        ax.text(p, i, f" {p:.1%}", va="center", fontsize=8)
    ax.set_xlabel("probability")
    ax.set_title(f"next token: top {len(top)}")
    return fig


# --- the page ---------------------------------------------------------------------------------------------------


def build_app(loaded: LoadedCheckpoint, scheduler: Scheduler, *, max_prompt_chars: int = 2000) -> gr.Blocks:
    """The Gradio page for `loaded`, generating through `scheduler`. API names: `generate`, `attention`."""
    import gradio as gr

    app = App(loaded, scheduler, max_prompt_chars=max_prompt_chars)
    cfg = loaded.model.config
    vocab = loaded.tokenizer.vocab_size
    with gr.Blocks(title="GPT playground", analytics_enabled=False) as demo:
        gr.Markdown(f"# GPT playground\nSampling from `{loaded.path.name}`: a {loaded.model.num_params():,}-parameter "
                    f"model with a {cfg.block_size}-token context.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=3):
                    examples = EXAMPLE_INSTRUCTIONS if app.chat else EXAMPLE_PROMPTS
                    prompt = gr.Textbox(label="Instruction" if app.chat else "Prompt", value=examples[0], lines=4,
                                        max_lines=12, max_length=max_prompt_chars, elem_id="prompt",
                                        info=f"at most {max_prompt_chars} characters and {cfg.block_size} tokens")
                    with gr.Row():
                        run = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                        stop = gr.Button("Stop", variant="stop")
                    gr.Examples(examples=[[p] for p in examples], inputs=[prompt], label="TinyShakespeare prompts")
                    output = gr.Textbox(label="Answer" if app.chat else "Prompt + completion", lines=12, max_lines=30,
                                        elem_id="output", interactive=False)
                    status = gr.Textbox(label="Status", interactive=False, elem_id="status", max_lines=2)
                with gr.Column(scale=2):
                    max_new_tokens = gr.Slider(1, app.limits.max_new_tokens, value=min(100, app.limits.max_new_tokens),
                                               step=1, label="Max new tokens", info="capped by the model's context")
                    temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature", info="0 = greedy")
                    top_k = gr.Slider(0, vocab, value=min(200, vocab), step=1, label="Top-k", info="0 = no limit")
                    top_p = gr.Slider(0.01, 1.0, value=1.0, step=0.01, label="Top-p", info="1 = no limit")
                    seed = gr.Number(value=1337, precision=0, minimum=0, label="Seed", info="empty = random")
                    with gr.Accordion("Model", open=True):
                        gr.Markdown(model_card(loaded), elem_id="model-card")
            # no limit of Gradio's own on generation: the scheduler admits (or refuses) every request
            event = run.click(app.generate, [prompt, max_new_tokens, temperature, top_k, top_p, seed],
                              [output, status], api_name="generate", concurrency_limit=None)
            prompt.submit(app.generate, [prompt, max_new_tokens, temperature, top_k, top_p, seed], [output, status],
                          api_visibility="private", concurrency_limit=None)
            stop.click(None, None, None, cancels=[event])
        with gr.Tab("Attention"):
            with gr.Row():
                att_prompt = gr.Textbox(label="Prompt", value="ROMEO:\nBut soft", lines=3, max_length=max_prompt_chars,
                                        scale=3)
                with gr.Column(scale=1):
                    layer = gr.Dropdown(list(range(cfg.n_layer)), value=0, label="Layer")
                    head = gr.Dropdown(list(range(cfg.n_head)), value=0, label="Head")
                    show = gr.Button("Show attention", variant="primary")
            att_status = gr.Textbox(label="Status", interactive=False, max_lines=2)
            with gr.Row():
                heatmap = gr.Plot(label="Attention weights over the prompt", format="png")
                with gr.Column():
                    bars = gr.Plot(label="Next-token probabilities", format="png")
                    table = gr.Dataframe(headers=["token", "probability"], label="Top 10", interactive=False)
            show.click(app.attention, [att_prompt, layer, head], [heatmap, bars, table, att_status], api_name="attention")
    demo.queue(default_concurrency_limit=ATTENTION_CONCURRENCY)
    demo.app_handlers = app  # the handlers, for tests and notebooks
    return demo
