"""Every command of `python -m project`: parse, call one library function, print, exit.

    python -m project fit --config configs/shakespeare.yaml      (fit/validate/test/predict: LightningCLI)
    python -m project generate --ckpt_path runs/.../last.ckpt --prompt "ROMEO:" --stream true
    python -m project CMD --help                                 (the options of one command)

This is the only module that prints results and turns user errors into one `error: ...` line and exit
status 1; the library modules return values and raise exceptions with one-line messages.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import auto_cli
from lightning.fabric.utilities.exceptions import MisconfigurationException

from project.cli import PROG, OneLineErrorParser, run_lightning
from project.data.streaming import prepare_corpus  # imports litdata only when it runs
from project.decoding import Decoder, InferenceDtype, cast_for_inference
from project.formats.checkpoint import consolidate_checkpoint, load_model
from project.formats.gguf import GGUFDtype
from project.generate import GenerationSettings
from project.guide import NOTEBOOK_DIR, build_guide  # imports nbclient/nbconvert only when it runs
from project.training.interrupt import interrupted_step

# errors that carry a message meant for the user: printed as one line, exit status 1 (Lightning raises
# MisconfigurationException for settings it cannot honour)
USER_ERRORS = (ValueError, ConnectionError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
               IsADirectoryError, MisconfigurationException)
UNSTREAMED_TOKEN_LIMIT = 100_000  # `generate` without --stream prints nothing before the end: a count one can wait for
MEMORY_HINT = ("lower --model.config.block_size, n_embd or n_layer, --data.batch_size, or the generation's "
               "--max_new_tokens")


def out_of_memory(err: BaseException) -> bool:
    """A failed allocation: torch's OutOfMemoryError (accelerators) or the CPU allocator's RuntimeError."""
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(err)


def generate_command(*, ckpt_path: str, prompt: str = "\n", generation: GenerationSettings = GenerationSettings(),
                     stream: bool = False, device: str = "cpu", dtype: InferenceDtype = "float32",
                     compile: bool = True) -> None:
    """Generate text from a checkpoint and print it (as it is produced with --stream true).

    Args:
        ckpt_path: a .ckpt written by `python -m project fit`, a distributed checkpoint folder, or a
            transformers directory written by `python -m project export`.
        prompt: text to continue.
        generation: sampling settings (--generation.temperature 0 is greedy).
        stream: print text as it is generated (without it, the whole text once it is complete).
        device: torch device, e.g. cpu or cuda.
        dtype: the weights' precision while generating: float32, bfloat16 (half the bytes; logits within a few
            hundredths of float32's) or float16.
        compile: compile the decoding step first (torch.compile; its time is printed on stderr, seconds once the
            compiler's cache is warm) for the fastest tokens; false starts at once.
    """
    from project.generate import stream as stream_text

    if not stream and generation.max_new_tokens > UNSTREAMED_TOKEN_LIMIT:
        raise ValueError(f"--generation.max_new_tokens {generation.max_new_tokens:,} without --stream true prints "
                         "nothing until every token is sampled, which may never end: pass --stream true, or at "
                         f"most {UNSTREAMED_TOKEN_LIMIT:,} tokens")
    loaded = load_model(ckpt_path, device=device)
    model = cast_for_inference(loaded.model, dtype)
    pieces = stream_text(model, loaded.tokenizer, prompt, generation, compile=compile)  # checks the prompt
    if compile:  # paid before the first token, and said apart from it
        seconds = Decoder(model, slots=1, compile=True).warm_up()
        print(f"compiled the decoding step in {seconds:.1f} s", file=sys.stderr, flush=True)
    first = next(pieces, "")  # checks the prompt and settings before anything is printed
    if not stream:
        pieces = iter(["".join(pieces)])  # the whole text, printed at once
    sys.stdout.write(prompt + first)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def export_command(*, ckpt_path: str, out: str, format: Literal["hf", "gguf"] = "hf", dtype: GGUFDtype = "f32",
                   overwrite: bool = False) -> None:
    """Export a checkpoint to a Hugging Face transformers directory, or to GGUF for llama.cpp and Ollama.

    `--format hf` (GPT-2 or Llama architecture) loads with AutoModelForCausalLM / AutoTokenizer /
    pipeline("text-generation") and gives the same logits as the checkpoint. `--format gguf` writes
    model.gguf and an Ollama Modelfile (project/formats/gguf.py).

    Args:
        ckpt_path: a .ckpt written by `python -m project fit`, a distributed checkpoint folder, or a directory
            written by `python -m project export`.
        out: the directory to write (config.json, model.safetensors, generation_config.json, tokenizer files;
            or model.gguf and Modelfile).
        format: hf (transformers directory) or gguf (one .gguf file for llama.cpp, plus a Modelfile).
        dtype: GGUF weight precision (f32, f16 or q8_0); the hf format is always f32.
        overwrite: replace the files of an existing export.
    """
    from project.formats.gguf import check_gguf_output, export_gguf
    from project.formats.hf import check_export_target, export_hf, hf_architecture

    if format == "gguf":
        check_gguf_output(out, overwrite)  # fail before loading anything
        loaded = load_model(ckpt_path)
        path = export_gguf(loaded.model.float(), loaded.tokenizer, out, dtype=dtype, overwrite=overwrite)
        print(f"exported {ckpt_path} as GGUF ({dtype}) to {path}, with an Ollama Modelfile beside it")
        return
    if dtype != "f32":
        raise ValueError(f"--dtype {dtype} applies to --format gguf only: the hf format is always f32")
    out_path = check_export_target(out, overwrite)  # fail before loading anything
    loaded = load_model(ckpt_path)
    export_hf(loaded.model.float(), loaded.tokenizer, out_path, overwrite=overwrite)
    print(f"exported {ckpt_path} as {hf_architecture(loaded.model.config)} to {out_path}")


@functools.wraps(consolidate_checkpoint)
def consolidate_command(**kwargs) -> None:
    target = consolidate_checkpoint(**kwargs)
    print(f"consolidated {kwargs['ckpt_path']} -> {target}")


def serve_command(
    *,
    ckpt_path: str,
    host: str = "127.0.0.1",
    port: int = 7860,
    api_key: str | None = None,
    model_name: str = "gpt",
    max_prompt_chars: int = 2000,
    slots: int = 8,
    max_queue: int = 32,
    device: str = "cpu",
    dtype: InferenceDtype = "float32",
    compile: bool = True,
) -> None:
    """Serve the Gradio app at / and an OpenAI-compatible API under /v1, on one port.

    Args:
        ckpt_path: a .ckpt written by `python -m project fit`, or a directory written by `python -m project export`.
        host: interface to listen on; 127.0.0.1 keeps the server on this machine. Any other needs an API key.
        port: port to listen on.
        api_key: the key clients must send (`Authorization: Bearer KEY`; the page's password); default: the
            PROJECT_API_KEY environment variable, which keeps it out of the process list.
        model_name: the model's id in the API (`model` in requests, /v1/models).
        max_prompt_chars: longest prompt the page accepts, in characters.
        slots: requests decoded together (the API's and the page's), each with its own KV cache slot.
        max_queue: requests that may wait for a slot; beyond this the API answers 429 with Retry-After and the
            page asks to try again.
        device: torch device, e.g. cpu or cuda.
        dtype: the weights' precision while serving: float32, bfloat16 (half the bytes; logits within a few
            hundredths of float32's) or float16.
        compile: compile the decoding step at start-up (torch.compile; its time is printed) for the fastest tokens.
    """
    from project.serve.server import API_KEY_ENV, build_server, check_can_listen, is_loopback, run_server

    check_can_listen(host, port)  # a busy port or unknown host: one line, before the model is loaded
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is None and not is_loopback(host):
        raise ValueError(f"--host {host} opens the server to the network: set an API key with --api_key or "
                         f"{API_KEY_ENV}, or keep the default --host 127.0.0.1")
    loaded = load_model(ckpt_path, device=device)
    cast_for_inference(loaded.model, dtype)
    server = build_server(loaded, api_key=api_key, model_name=model_name, max_prompt_chars=max_prompt_chars,
                          slots=slots, max_waiting=max_queue, compile=compile)
    scheduler = server.state.scheduler
    if compile:
        print(f"compiled the decoding step in {scheduler.compile_seconds:.1f} s", flush=True)
    print(f"serving {loaded.path} on http://{host}:{port}: the page at /, the OpenAI API at /v1 ({slots} requests "
          f"decoded together, {max_queue} more may wait)", flush=True)
    run_server(server, host, port, scheduler)


def evaluate_command(
    *,
    ckpt_path: str,
    text: str | None = None,
    choices: str | None = None,
    tasks: str | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
) -> None:
    """Evaluate a checkpoint with EleutherAI's lm-evaluation-harness (project/evaluate.py) and print the metrics.

    Args:
        ckpt_path: a .ckpt written by `python -m project fit`, or a directory written by `python -m project export`.
        text: a UTF-8 text file: bits per byte, byte perplexity and word perplexity.
        choices: a JSONL file, one {"question": str, "choices": [str, ...], "answer": index} per line: acc, acc_norm.
        tasks: the harness's own tasks, comma-separated (e.g. hellaswag,arc_easy); their datasets come from the Hub.
        limit: at most this many documents per task.
        batch_size: sequences scored per forward pass.
        device: torch device, e.g. cpu or cuda.
    """
    from project.evaluate import check_evaluation, evaluate  # imports lm_eval only when it runs

    names = [name.strip() for name in tasks.split(",") if name.strip()] if tasks else None
    check_evaluation(text=text, choices=choices, tasks=names, limit=limit, batch_size=batch_size)  # before loading
    loaded = load_model(ckpt_path, device=device)
    results = evaluate(loaded.model, loaded.tokenizer, text=text, choices=choices, tasks=names, limit=limit,
                       batch_size=batch_size)
    for task, metrics in results.items():
        for name, value in metrics.items():
            print(f"{task:<20} {name:<16} {value:.4f}")


@functools.wraps(prepare_corpus)
def prepare_command(**kwargs) -> None:
    from project.tokenizer import tokenizer_from_state

    record = prepare_corpus(**kwargs)
    counts = ", ".join(f"{tokens:,} {name}" for name, tokens in record.tokens.items())
    print(f"prepared {kwargs['output_dir']}: {counts} tokens ({tokenizer_from_state(record.tokenizer).describe()})")


def guide_command(
    *,
    out: str = "guide.pdf",
    notebooks: str | None = None,
    notebook_dir: str = str(NOTEBOOK_DIR),
    timeout: int = 600,
    chromium: str | None = None,
) -> None:
    """Execute the guide's notebooks and print them as one PDF (title page, contents, chapters, appendix).

    Args:
        out: the PDF to write (an existing file is never replaced).
        notebooks: a subset, comma-separated names or prefixes, e.g. 03,appendix (default: every notebook, in
            file-name order).
        notebook_dir: the folder of notebooks.
        timeout: seconds each cell may run.
        chromium: the Chromium executable that prints the pages (default: chromium on PATH).
    """
    def done(chapter) -> None:
        print(f"{chapter.notebook.name}: {chapter.pages} pages, executed in {chapter.execute_seconds:.0f} s",
              file=sys.stderr)

    names = [name.strip() for name in notebooks.split(",") if name.strip()] if notebooks else None
    report = build_guide(Path(out), Path(notebook_dir), names, timeout, chromium, on_chapter=done)
    print(f"wrote {report.out}: {report.pages} pages, {len(report.chapters)} chapters "
          f"(executed in {report.execute_seconds:.0f} s, printed in {report.render_seconds:.0f} s)")


def train_tokenizer_command(*, path: str, out: str, vocab_size: int = 4096) -> None:
    """Train a byte-level BPE tokenizer on a text file, for `--data.tokenizer OUT`.

    Args:
        path: the UTF-8 corpus to learn the merges from (train on training text only, not validation).
        out: the folder to create (it holds tokenizer.json); it must not exist.
        vocab_size: tokens in the vocabulary: 256 bytes + end-of-text + merges (257 to 65536).
    """
    from project.data.corpus import train_tokenizer
    from project.tokenizer import tokenizer_spec

    tokenizer = train_tokenizer(path, vocab_size, out)
    print(f"trained a byte-level BPE of {tokenizer.vocab_size} tokens on {path} -> {out} "
          f"(use --data.tokenizer {tokenizer_spec(out)})")


# the project's own commands, beside LightningCLI's fit/validate/test/predict
COMMANDS: dict[str, Callable[..., None]] = {
    "generate": generate_command,
    "export": export_command,  # checkpoint -> transformers directory (project/formats/hf.py) or GGUF (gguf_export.py)
    "consolidate": consolidate_command,  # DCP folder (ModelParallelStrategy) -> single .ckpt
    "serve": serve_command,  # Gradio app + OpenAI-compatible /v1 API on one port (project/serve/page.py, openai_api.py)
    "evaluate": evaluate_command,  # lm-evaluation-harness on the model in memory (project/evaluate.py)
    "prepare": prepare_command,  # folder of .txt/.parquet -> litdata token chunks for --data.streaming_dir
    "train-tokenizer": train_tokenizer_command,  # text file -> byte-level BPE folder for --data.tokenizer
    "guide": guide_command,  # notebooks/ executed and printed as one PDF (project/guide.py)
}


def summary(fn: Callable) -> str:
    """The first line of a function's docstring: the one-line description of its command."""
    return (inspect.getdoc(fn) or "").splitlines()[0]


# LightningCLI's commands (their options: `python -m project fit --help`); Trainer's docstrings are too generic
LIGHTNING_SUMMARIES = {
    "fit": "Train a GPT from a config (any Trainer flag; --ckpt_path last resumes the newest run).",
    "validate": "Compute the validation loss of a checkpoint.",
    "test": "Compute the loss of a checkpoint on the test split.",
    "predict": "Complete --data.prompts with a checkpoint, writing JSON lines.",
}


def overview() -> str:
    """`python -m project --help`: every command with its one-line summary."""
    summaries = {**LIGHTNING_SUMMARIES, **{name: summary(fn) for name, fn in COMMANDS.items()}}
    width = max(map(len, summaries))
    lines = [f"usage: {PROG} COMMAND [options]       ({PROG} COMMAND --help: the options of one command)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in summaries.items()]
    return "\n".join(lines)


class ConsoleHandler(logging.StreamHandler):
    """Log lines as plain text on the console stream named `target` ("stdout" or "stderr"), looked up at each
    line, so a redirected or captured stream gets them."""

    def __init__(self, target: str) -> None:
        self.target = target
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self.target)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it; the console stream is looked up instead
        pass


def configure_logging() -> None:
    """The library's log lines (project.*: resumed from, saved, rebuilt) on stderr, `predict`'s completions on
    stdout. Library code only logs; the command line decides where lines go."""
    for name, target in (("project", "stderr"), ("project.completions", "stdout")):
        logger = logging.getLogger(name)
        if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
            handler = ConsoleHandler(target)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m project` and of the `gpt` script."""
    words = sys.argv[1:] if argv is None else argv
    configure_logging()
    try:
        if not words or words[0] in ("-h", "--help"):
            print(overview())
            sys.exit(0 if words else 2)
        if words[0] in COMMANDS:
            auto_cli(COMMANDS[words[0]], args=words[1:], prog=f"{PROG} {words[0]}", parser_class=OneLineErrorParser)
        elif words[0] in LIGHTNING_SUMMARIES or words[0].startswith("-"):
            trainer = run_lightning(argv)  # None: LightningCLI reads sys.argv itself
            if interrupted_step(trainer) is not None:
                sys.exit(130)  # stopped by Ctrl-C (after saving last.ckpt): the shell's status for SIGINT
        else:
            raise ValueError(f"unknown command {words[0]!r}: use one of {', '.join([*LIGHTNING_SUMMARIES, *COMMANDS])} "
                             f"({PROG} --help)")
    except USER_ERRORS as err:
        if os.environ.get("PROJECT_DEBUG"):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(1)
    except (RuntimeError, MemoryError) as err:
        if not out_of_memory(err) or os.environ.get("PROJECT_DEBUG"):
            raise  # our bug: the traceback is the report
        print(f"error: not enough memory ({one_line(err)[:160]}): {MEMORY_HINT}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C (serve re-raises it once its requests are ended): no traceback
        sys.exit(128 + signal.SIGINT)
    except SystemExit as err:
        # Lightning ends a fit stopped by SIGTERM (last.ckpt saved) with SIGTERMException, a SystemExit of status 0;
        # the shell convention for "terminated" is 128 + 15 (the module is loaded if Lightning ran at all)
        lightning_exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
        if lightning_exceptions is not None and isinstance(err, lightning_exceptions.SIGTERMException):
            sys.exit(128 + signal.SIGTERM)
        raise


def one_line(err: BaseException) -> str:
    """An exception's message as one line (library messages sometimes span several)."""
    return " ".join(str(err).split()) or type(err).__name__
