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

from project.threads import configure_threads  # first: its clock starts with the command

# what the commands' signatures name; none of it imports Lightning (fit/validate/test/predict import it, through
# project.cli, when they run), so `--help` and the commands that do not train start in seconds
from project.data.corpus import TextPart
from project.data.streaming import prepare_corpus  # imports litdata only when it runs
from project.data.shakespeare_tasks import build_finetune_data
from project.decoding import Decoder, InferenceDtype, cast_for_inference
from project.formats.checkpoint import consolidate_checkpoint, load_model, save_merged
from project.formats.gguf import GGUFDtype
from project.formats.runs import resolve_checkpoint
from project.generate import GenerationSettings
from project.guide import NOTEBOOK_DIR, build_guide  # imports nbclient/nbconvert only when it runs

PROG = "python -m project"  # the name usage lines show (the `gpt` script runs the same commands)
# errors that carry a message meant for the user: printed as one line, exit status 1 (and Lightning's
# MisconfigurationException, for settings it cannot honour: see `user_errors`)
USER_ERRORS = (ValueError, ConnectionError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
               IsADirectoryError)
# new tokens from which `generate` compiles its step by default: a compiled step saves about a millisecond a token on
# a CPU, and compiling costs seconds with a warm inductor cache (benchmarks/README.md, "Generation")
COMPILE_PAYS_FROM = 4_000
UNSTREAMED_TOKEN_LIMIT = 100_000  # `generate` without --stream prints nothing before the end: a count one can wait for
MEMORY_HINT = ("lower --model.config.block_size, n_embd or n_layer, --data.batch_size, or the generation's "
               "--max_new_tokens")


def user_errors() -> tuple[type[BaseException], ...]:
    """USER_ERRORS, and Lightning's MisconfigurationException once Lightning is imported (only it raises one)."""
    lightning = sys.modules.get("lightning.fabric.utilities.exceptions")
    return USER_ERRORS + ((lightning.MisconfigurationException,) if lightning is not None else ())


def out_of_memory(err: BaseException) -> bool:
    """A failed allocation: torch's OutOfMemoryError (accelerators) or the CPU allocator's RuntimeError."""
    import torch

    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(err)


def generate_command(*, ckpt_path: str, prompt: str = "\n", chat: bool = False,
                     generation: GenerationSettings = GenerationSettings(), stream: bool = False,
                     device: str = "cpu", dtype: InferenceDtype = "float32", compile: bool | None = None) -> None:
    """Generate text from a checkpoint and print it (as it is produced with --stream true).

    Args:
        ckpt_path: `last` or `best` (the newest run's, under runs/), a .ckpt written by `python -m project fit` or
            `finetune fit`, a distributed checkpoint folder, or a transformers directory written by `python -m
            project export`.
        prompt: text to continue; with --chat true, the instruction to answer.
        chat: answer `prompt` as an instruction-tuned model does, through its prompt template, and print the answer.
        generation: sampling settings (--generation.temperature 0 is greedy).
        stream: print text as it is generated (without it, the whole text once it is complete).
        device: torch device, e.g. cpu or cuda.
        dtype: the weights' precision while generating: float32, bfloat16 (half the bytes; logits within a few
            hundredths of float32's) or float16.
        compile: compile the decoding step first (torch.compile; its time is printed on stderr, seconds once the
            compiler's cache is warm) for the fastest tokens; false starts at once. Default: compile when
            --generation.max_new_tokens is at least COMPILE_PAYS_FROM, where the faster steps repay the compilation.
    """
    from project.generate import stream as stream_text

    if not stream and generation.max_new_tokens > UNSTREAMED_TOKEN_LIMIT:
        raise ValueError(f"--generation.max_new_tokens {generation.max_new_tokens:,} without --stream true prints "
                         "nothing until every token is sampled, which may never end: pass --stream true, or at "
                         f"most {UNSTREAMED_TOKEN_LIMIT:,} tokens")
    configure_threads()
    loaded = load_model(resolve_checkpoint(ckpt_path), device=device)
    shown: str | list[int] = prompt
    if chat:
        if loaded.template is None:
            raise ValueError(f"{ckpt_path} has no prompt template (it was not instruction-tuned: python -m project "
                             "finetune): drop --chat to continue the prompt as text")
        shown = ""
        prompt, _ = loaded.template.encode([{"role": "user", "content": prompt}], loaded.tokenizer,
                                           add_generation_prompt=True)
    model = cast_for_inference(loaded.model, dtype)
    if compile is None:
        compile = generation.max_new_tokens >= COMPILE_PAYS_FROM
    pieces = stream_text(model, loaded.tokenizer, prompt, generation, compile=compile)  # checks the prompt
    if compile:  # paid before the first token, and said apart from it
        seconds = Decoder(model, slots=1, compile=True).warm_up()
        print(f"compiled the decoding step in {seconds:.1f} s", file=sys.stderr, flush=True)
    first = next(pieces, "")  # checks the prompt and settings before anything is printed
    if not stream:
        pieces = iter(["".join(pieces)])  # the whole text, printed at once
    sys.stdout.write(shown + first)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def export_command(*, ckpt_path: str, out: str, format: Literal["hf", "gguf", "peft"] = "hf", dtype: GGUFDtype = "f32",
                   overwrite: bool = False) -> None:
    """Export a checkpoint to a Hugging Face transformers directory, to GGUF for llama.cpp and Ollama, or its LoRA
    adapters to PEFT.

    `--format hf` (GPT-2 or Llama architecture) loads with AutoModelForCausalLM / AutoTokenizer /
    pipeline("text-generation") and gives the same logits as the checkpoint. `--format gguf` writes
    model.gguf and an Ollama Modelfile (project/formats/gguf.py). An instruction-tuned model carries its prompt
    template into both, and LoRA adapters are merged in. `--format peft` writes a LoRA checkpoint's adapters alone,
    for PEFT on the transformers export of its base (project/formats/peft.py).

    Args:
        ckpt_path: `last` or `best` (the newest run's, under runs/), a .ckpt written by `python -m project fit` or
            `finetune fit`, a distributed checkpoint folder, or a directory written by `python -m project export`.
        out: the directory to write (config.json, model.safetensors, generation_config.json, tokenizer files;
            model.gguf and Modelfile; or adapter_config.json and adapter_model.safetensors).
        format: hf (transformers directory), gguf (one .gguf file for llama.cpp, plus a Modelfile) or peft.
        dtype: GGUF weight precision (f32, f16 or q8_0); the other formats are always f32.
        overwrite: replace the files of an existing export.
    """
    from project.formats.gguf import MODELFILE, check_gguf_output, export_gguf, gguf_architecture
    from project.formats.hf import check_export_target, export_hf, hf_architecture

    if format == "gguf":
        check_gguf_output(out, overwrite)  # fail before loading anything
        loaded = load_model(resolve_checkpoint(ckpt_path))
        path = export_gguf(loaded.model.float(), loaded.tokenizer, out, dtype=dtype, overwrite=overwrite,
                           template=loaded.template)
        context = loaded.model.config.block_size
        print(f"exported {loaded.path} to {path} ({dtype}, {size_of(path)}, llama.cpp architecture "
              f"{gguf_architecture(loaded.model.config)}, context {context} tokens) and {path.parent / MODELFILE} "
              f"(num_ctx {context}, num_predict {context // 2})\n"
              f"  keep prompt + new tokens within {context}: past the context a model with learned positions makes "
              "llama.cpp abort, whatever n_ctx says\n"
              f"  try: python -c \"import llama_cpp; print(llama_cpp.Llama('{path}', n_ctx=0, verbose=False)"
              f".create_completion('ROMEO:', max_tokens={context // 2})['choices'][0]['text'])\"")
        return
    if dtype != "f32":
        raise ValueError(f"--dtype {dtype} applies to --format gguf only: the {format} format is always f32")
    out_path = check_export_target(out, overwrite)  # fail before loading anything
    if format == "peft":
        export_adapters(resolve_checkpoint(ckpt_path), out_path, overwrite)
        return
    loaded = load_model(resolve_checkpoint(ckpt_path))
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards" for a one-file model; the line below says it
    export_hf(loaded.model.float(), loaded.tokenizer, out_path, overwrite=overwrite, template=loaded.template)
    files = ", ".join(f"{p.name} ({size_of(p)})" for p in sorted(out_path.iterdir()) if p.is_file())
    print(f"exported {loaded.path} as {hf_architecture(loaded.model.config)} to {out_path}: {files}\n"
          f"  load with: AutoModelForCausalLM.from_pretrained({str(out_path)!r}), AutoTokenizer.from_pretrained(...)")


def size_of(path: Path) -> str:
    """A file's size for people: 812 KB, 23.4 MB."""
    size = path.stat().st_size
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} KB" if size >= 1e3 else f"{size} bytes"


def export_adapters(ckpt_path: str, out: Path, overwrite: bool) -> None:
    """`export --format peft`: a LoRA checkpoint's adapters, for PEFT on the transformers export of its base."""
    from project.formats.checkpoint import load_checkpoint
    from project.formats.peft import export_peft

    loaded = load_checkpoint(ckpt_path, merge=False)
    if loaded.lora is None:
        raise ValueError(f"checkpoint {ckpt_path} holds no LoRA adapters: export the model itself (--format hf)")
    base = loaded.base
    hf_base = base if (Path(base) / "config.json").is_file() else None  # a transformers folder PEFT can load
    export_peft(loaded.model.float(), loaded.lora, out, base=hf_base, overwrite=overwrite)
    where = hf_base or f"the export of {base} (python -m project export --ckpt_path {base} --out BASE)"
    print(f"exported the LoRA adapters of {ckpt_path} to {out}: load them with PeftModel.from_pretrained("
          f"AutoModelForCausalLM.from_pretrained(BASE), {str(out)!r}), BASE being {where}")


def merge_lora_command(*, ckpt_path: str, out: str) -> None:
    """Merge a LoRA checkpoint's adapters into its base, as one checkpoint that no longer needs the base.

    Args:
        ckpt_path: a LoRA checkpoint written by `python -m project finetune fit` (with --model.lora).
        out: the .ckpt file to write; an existing file is never overwritten.
    """
    target = save_merged(ckpt_path, out)
    print(f"merged the LoRA adapters of {ckpt_path} into its base -> {target}")


@functools.wraps(build_finetune_data)
def finetune_data_command(**kwargs) -> None:
    meta = build_finetune_data(**kwargs)
    counts = "; ".join(f"{name}: " + ", ".join(f"{n:,} {split}" for split, n in splits.items())
                       for name, splits in meta["counts"].items())
    print(f"wrote {kwargs['out']}: {counts} (meta.json says how)")


@functools.wraps(consolidate_checkpoint)
def consolidate_command(*, ckpt_path: str, out: str) -> None:
    source = resolve_checkpoint(ckpt_path)
    target = consolidate_checkpoint(ckpt_path=source, out=out)
    print(f"consolidated {source} into {target} ({size_of(target)}: weights, optimizer state, schedule and loop "
          f"state, tokenizer): sample with `{PROG} generate --ckpt_path {target}`, resume on one device with "
          f"`{PROG} fit --config ... --ckpt_path {target}`")


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
        ckpt_path: `last` or `best` (the newest run's, under runs/), a .ckpt written by `python -m project fit`, or
            a directory written by `python -m project export`.
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
    configure_threads()
    loaded = load_model(resolve_checkpoint(ckpt_path), device=device)
    cast_for_inference(loaded.model, dtype)
    url = f"http://{host}:{port}"
    server = build_server(loaded, api_key=api_key, model_name=model_name, max_prompt_chars=max_prompt_chars,
                          slots=slots, max_waiting=max_queue, compile=compile,
                          on_page_ready=lambda: print(f"the page is ready at {url}/", flush=True))
    scheduler = server.state.scheduler
    if compile:
        print(f"compiled the decoding step in {scheduler.compile_seconds:.1f} s", flush=True)
    print(f"serving {loaded.path} on {url}: the OpenAI API at /v1 now, the page at / in a few seconds ({slots} "
          f"requests decoded together, {max_queue} more may wait)", flush=True)
    run_server(server, host, port, scheduler)


def evaluate_command(
    *,
    ckpt_path: str,
    text: str | None = None,
    part: TextPart = "all",
    choices: str | None = None,
    tasks: str | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
) -> None:
    """Evaluate a checkpoint with EleutherAI's lm-evaluation-harness (project/evaluate.py) and print the metrics.

    Args:
        ckpt_path: `last` or `best` (the newest run's, under runs/), a .ckpt written by `python -m project fit`, or
            a directory written by `python -m project export`.
        text: a UTF-8 text file: bits per byte, byte perplexity and word perplexity.
        part: score all of --text, or its train, val or test part, cut as the checkpoint's training cut its corpus
            (`--part test` of the training corpus is text the model never saw).
        choices: a JSONL file, one {"question": str, "choices": [str, ...], "answer": index} per line: acc, acc_norm.
        tasks: the harness's own tasks, comma-separated (e.g. hellaswag,arc_easy); their datasets come from the Hub.
        limit: at most this many documents per task.
        batch_size: sequences scored per forward pass.
        device: torch device, e.g. cpu or cuda.
    """
    from project.data.corpus import Split
    from project.data.overlap import MIN_LINE_CHARS, overlap
    from project.evaluate import check_evaluation, evaluate, scored_text  # imports lm_eval only when it runs

    names = [name.strip() for name in tasks.split(",") if name.strip()] if tasks else None
    check_evaluation(text=text, choices=choices, tasks=names, limit=limit, batch_size=batch_size)  # before loading
    configure_threads()
    loaded = load_model(resolve_checkpoint(ckpt_path), device=device)
    split = Split(**loaded.split)
    where = "" if part == "all" else f", its {part} part (cut as the model's training split its corpus: {split})"
    if text is not None:
        content = scored_text(text, part, split)
        seen = overlap(content, loaded.training_lines) if loaded.training_lines is not None else None
        if seen is not None and seen.share >= 0.05:
            print(f"warning: {seen.share:.0%} of the lines of {text}{where} are in the model's training text "
                  f"({seen.found:,} of {seen.compared:,} lines of {MIN_LINE_CHARS} or more characters): its scores "
                  "are not those of unseen text; score --part test (or val) of the training corpus, or another file",
                  file=sys.stderr)
    import datasets

    datasets.disable_progress_bars()  # the harness loads local files through `datasets`: our bar shows the scoring
    with ProgressBar() as progress:
        results = evaluate(loaded.model, loaded.tokenizer, text=text, choices=choices, tasks=names, limit=limit,
                           batch_size=batch_size, part=part, split=split, progress=progress)
    print(f"evaluate: {loaded.path} ({loaded.model.num_params() / 1e6:.2f} M parameters, "
          f"{loaded.tokenizer.describe()}, context {loaded.model.config.block_size} tokens), lm-evaluation-harness")
    sources = {"project_text": f"{text}{where}", "project_choices": str(choices)}
    rows = [(sources.get(task, task), name, value) for task, metrics in results.items()
            for name, value in metrics.items()]
    width = max([len("scored"), *(len(source) for source, _, _ in rows)])
    print(f"  {'scored':<{width}}  {'metric':<16} {'value':>10}")
    for source, name, value in rows:
        print(f"  {source:<{width}}  {name:<16} {value:>10.4f}")


class ProgressBar:
    """A tqdm bar on stderr for a library's `progress(what, done, total)` callback: one bar per `what`."""

    def __enter__(self):
        self.bar, self.what = None, None
        return self

    def __call__(self, what: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if what != self.what:
            self.close()
            self.bar, self.what = tqdm(total=total, desc=f"scoring {what}", unit="", leave=False), what
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __exit__(self, *exc) -> None:
        self.close()


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
    from project.data.corpus import read_text, train_tokenizer
    from project.tokenizer import TOKENIZER_FILE, tokenizer_spec

    tokenizer = train_tokenizer(path, vocab_size, out)
    text = read_text(path)
    tokens = len(tokenizer.encode(text))
    print(f"trained a byte-level BPE of {tokenizer.vocab_size:,} tokens on {path} ({len(text):,} characters) and wrote "
          f"{Path(out) / TOKENIZER_FILE}: it cuts that text into {tokens:,} tokens, {len(text) / tokens:.2f} "
          f"characters each\n  use it: {PROG} fit --config ... --data.tokenizer {tokenizer_spec(out)}")


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
    "finetune-data": finetune_data_command,  # TinyShakespeare -> instruction and classification sets (JSONL, CSV)
    "merge-lora": merge_lora_command,  # LoRA checkpoint + its base -> one self-contained checkpoint
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
    "finetune": "Fine-tune a pretrained model (instructions or classification, full or LoRA): finetune fit|validate|"
                "test|predict.",
}


def overview() -> str:
    """`python -m project --help`: every command with its one-line summary."""
    summaries = {**LIGHTNING_SUMMARIES, **{name: summary(fn) for name, fn in COMMANDS.items()}}
    width = max(map(len, summaries))
    lines = [f"usage: {PROG} COMMAND [options]       ({PROG} COMMAND --help: the options of one command)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in summaries.items()]
    return "\n".join(lines)


class OneLineErrors:
    """Argument errors as one line (`error: Parser key "max_new_tokens": Expected ...`), mixed into the parser of
    the project's commands (`command_parser`) and into LightningCLI's (project.cli.OneLineErrorParser)."""

    def error(self, message: str, ex: Exception | None = None):
        return super().error(" ".join(str(message).split()), ex)

    def print_usage(self, file=None) -> None:
        """One usage line before the error (the options are in --help)."""
        (file or sys.stderr).write(f"usage: {self.prog} [options]\n")


def command_parser() -> type:
    """jsonargparse's ArgumentParser with OneLineErrors, made when a command runs (`--help` needs no jsonargparse)."""
    from jsonargparse import ArgumentParser

    return type("CommandParser", (OneLineErrors, ArgumentParser), {})


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

    def emit(self, record: logging.LogRecord) -> None:
        """Between progress-bar redraws when a bar is on screen (tqdm.write), so a line is never glued to one."""
        tqdm = sys.modules.get("tqdm")
        if tqdm is None:
            return super().emit(record)
        try:
            tqdm.tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 (logging's own contract: report, never raise)
            self.handleError(record)


def configure_logging() -> None:
    """The library's log lines (project.*: resumed from, saved, rebuilt) and Python warnings on stderr, `predict`'s
    completions on stdout. Library code only logs; the command line decides where lines go."""
    logging.captureWarnings(True)  # warnings as log lines, so they too are written between progress-bar redraws
    for name, target in (("project", "stderr"), ("project.completions", "stdout"), ("py.warnings", "stderr")):
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
            from jsonargparse import auto_cli

            auto_cli(COMMANDS[words[0]], args=words[1:], prog=f"{PROG} {words[0]}", parser_class=command_parser())
        elif words[0] == "finetune":
            finetune_command(words[1:], from_argv=argv is None)
        elif words[0] in LIGHTNING_SUMMARIES or words[0].startswith("-"):
            fit_command(argv)
        else:
            known = ", ".join([*LIGHTNING_SUMMARIES, *COMMANDS])
            raise ValueError(f"unknown command {words[0]!r}: use one of {known} ({PROG} --help)")
    except Exception as err:  # noqa: BLE001 (re-raised below unless it is the user's mistake or memory)
        if isinstance(err, user_errors()) and not os.environ.get("PROJECT_DEBUG"):
            print(f"error: {one_line(err)}", file=sys.stderr)
            sys.exit(1)
        if not (isinstance(err, (RuntimeError, MemoryError)) and out_of_memory(err)) or os.environ.get("PROJECT_DEBUG"):
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


def fit_command(argv: list[str] | None) -> None:
    """fit/validate/test/predict through LightningCLI (project/cli.py, which imports Lightning); `fit` ends with
    what happened (`describe_fit`)."""
    from project.cli import run_lightning
    from project.training.interrupt import interrupted_step
    from project.training.report import fit_report

    descriptions = {name: text for name, text in LIGHTNING_SUMMARIES.items() if name != "finetune"}  # its own CLI
    trainer = run_lightning(argv, descriptions=descriptions)  # None: LightningCLI reads sys.argv itself
    if trainer.state.fn == "fit" and trainer.is_global_zero:
        print("\n".join(describe_fit(fit_report(trainer))))
    if interrupted_step(trainer) is not None:
        sys.exit(130)  # stopped by Ctrl-C (after saving last.ckpt): the shell's status for SIGINT


def finetune_command(args: list[str], from_argv: bool) -> None:
    """`finetune fit|validate|test|predict` through LightningCLI (project/cli.py's FinetuneCLI)."""
    from project.cli import run_finetune
    from project.training.interrupt import interrupted_step

    if from_argv:  # LightningCLI reads sys.argv itself (and warns when also given arguments): the finetune CLI's own
        sys.argv = [sys.argv[0], *args]
    trainer = run_finetune(None if from_argv else args)
    if interrupted_step(trainer) is not None:
        sys.exit(130)  # stopped by Ctrl-C (after saving last.ckpt): the shell's status for SIGINT


def describe_fit(report) -> list[str]:
    """`fit`'s closing lines (a project.training.report.FitReport): why it stopped, the last validation's figures,
    the checkpoints, and what to run next."""
    took = f" in {duration(report.train_s)}" if report.train_s is not None else ""
    of = f" of {report.max_steps:,}" if report.max_steps else ""
    why = {"max_steps": f"reached max_steps ({report.max_steps:,}){took}",
           "max_time": f"stopped by max_time ({duration(report.max_time_s or 0)}) at step {report.step:,}{of}; the "
                       "learning rate followed the time budget to its floor",
           "max_epochs": f"reached max_epochs at step {report.step:,}{took}",
           "interrupted": f"interrupted (Ctrl-C) at step {report.step:,}{of}{took}; to continue, run the same "
                          "command with --ckpt_path last",
           }.get(report.stopped_by, f"stopped by a callback (e.g. early stopping) at step {report.step:,}{took}")
    lines = [f"fit: {why}"]
    if report.metrics:
        figures = ", ".join(f"{name} {value:.4f}" for name, value in report.metrics.items())
        lines.append(f"  last validation (step {report.validated_at:,}): {figures}")
    else:
        lines.append("  no validation ran (--trainer.val_check_interval is larger than the run)")
    if report.best is not None:
        score = f" (val/loss {report.best_score:.4f})" if report.best_score is not None else ""
        lines.append(f"  best checkpoint: {report.best}{score}")
    if report.last is not None:
        lines.append(f"  last checkpoint: {report.last}")
    if report.run_dir is not None:
        lines.append(f"  curves: tensorboard --logdir {report.run_dir}")
    sample = report.best or report.last
    if sample is not None:
        plain = (report.prompt or "").strip() and "\n" not in report.prompt  # else generate's default prompt
        prompt = f" --prompt {shell_quote(report.prompt)}" if plain else ""
        lines.append(f"next: {PROG} generate --ckpt_path {shell_quote(str(sample))}{prompt} --stream true")
    return lines


def duration(seconds: float) -> str:
    """Seconds for people: 12 s, 9.5 min."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def shell_quote(text: str) -> str:
    """`text` as one shell word (quoted only when it needs to be)."""
    import shlex

    return shlex.quote(text)


def one_line(err: BaseException) -> str:
    """An exception's message as one line (library messages sometimes span several)."""
    return " ".join(str(err).split()) or type(err).__name__
