"""README.md is exact: every command it shows is run here, in README order, in a scratch folder laid out as this
repository (configs/, data/, ../shared/data), or is checked another way when it cannot run on a CPU without a
network. Each command is classified by the rules below; one that no rule covers fails the test, so a command added
to the README is picked up by itself.

- `python -m project ...`: run in this process. The LightningCLI commands get TINY appended (a 1-layer model, two
  steps), so every run, resume and sample of the README is real but quick. Commands that need GPUs, several
  processes or nodes, the Hugging Face Hub, a server open to the network, or minutes (`guide`, a folder of texts to
  `prepare`) are parsed instead, with `--print_config`, which checks every flag and value and stops.
- `python -c ...`, the Python blocks (the OpenAI client, against a real `serve` of the README's own command on a
  free port), `tensorboard` (until it listens): run.
- Installation (`pip`, `python -m venv`, `apt-get`) and `python -m pytest`: checked against what `.ci/run` does.
- `ollama`: not installed here; the Modelfile it reads is checked (the GGUF file beside it, num_ctx = the context,
  num_predict half of it).
- The example of what `fit` prints (the `text` block after the quick start) is matched, line by line, against what
  the quick start's own `fit` printed, numbers aside.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import REPO, SHARED_DATA, free_port, run_main

README = REPO / "README.md"
TINY = ["--model.config.n_layer", "1", "--model.config.n_head", "2", "--model.config.n_kv_head", "2",
        "--model.config.n_embd", "32", "--model.config.block_size", "128", "--data.batch_size", "2",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--samples.max_new_tokens", "2", "--trainer.enable_progress_bar", "false"]
LIGHTNING = ("fit", "validate", "test", "predict")
# `finetune fit|validate|test|predict`: the model is the README's base (its tiny version), so only the run is shortened
FINETUNE_TINY = ["--data.batch_size", "2", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                 "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
                 "--trainer.limit_predict_batches", "1", "--trainer.enable_progress_bar", "false"]
PARSE_ONLY = [  # (why, pattern on the project command's words): checked with --print_config, not run
    ("needs a GPU", r"--trainer\.accelerator gpu|gpt2-124m"),
    ("needs several processes or nodes", r"--trainer\.devices [2-9]|--trainer\.num_nodes"),
    ("needs the Hugging Face Hub", r"^evaluate .*--tasks"),
    ("opens a server to the network", r"^serve .*--host (?!127\.0\.0\.1)"),
    ("needs a distributed run's checkpoint folder", r"^consolidate "),
    ("needs a folder of texts and takes minutes", r"^prepare |--data\.streaming_dir"),
    ("executes every notebook (tests/test_guide.py runs it)", r"^guide "),
]


@dataclass
class Command:
    """One command of the README: its words (after environment assignments), the environment it sets, its text."""

    text: str
    words: list[str]
    line: int  # commands of one line (an `&&` chain) share a shell, and so a `cd`
    env: dict[str, str] = field(default_factory=dict)
    python: str | None = None  # the code of a Python block


def readme_commands(text: str) -> list[Command]:
    """The bash lines (continuations joined, comments dropped, `&&` chains split) and Python blocks, in order."""
    commands = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if lang == "python":
            commands.append(Command("python block", [], len(commands), python=body))
        if lang != "bash":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            number = len(commands)
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                part, words = words[:cut], words[cut + 1:]
                env = {}
                while part and re.fullmatch(r"[A-Z_]+=.*", part[0]):
                    key, value = part.pop(0).split("=", 1)
                    env[key] = value
                shown = " ".join(shlex.quote(w) for w in [*(f"{k}={v}" for k, v in env.items()), *part])
                commands.append(Command(shown, part, number, env))
    return commands


def project_words(words: list[str]) -> list[str] | None:
    """The arguments after `python -m project` (or torchrun's / srun's `-m project`), or None."""
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] == "project":
            return words[i + 2:]
    return None


def parse_only_reason(args: list[str]) -> str | None:
    line = " ".join(args)
    return next((why for why, pattern in PARSE_ONLY if re.search(pattern, line)), None)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def sandbox(tmp_path, shakespeare_path, monkeypatch):
    """A folder laid out as the repository: configs/, the corpus already downloaded into data/, and
    ../shared/data beside it (the workplace layout the README's offline commands name)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "configs").symlink_to(REPO / "configs")
    (repo / "data" / "tinyshakespeare").mkdir(parents=True)
    shutil.copy(shakespeare_path, repo / "data" / "tinyshakespeare" / "input.txt")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA.resolve())
    monkeypatch.chdir(repo)
    return repo


@pytest.mark.slow
def test_every_readme_command_runs_or_parses(sandbox, capsys, monkeypatch):
    text = README.read_text(encoding="utf-8")
    commands = readme_commands(text)
    ci = (REPO / ".ci" / "run").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    port = free_port()
    server = None
    fit_output = venv = None
    checked = []
    try:
        for command in commands:
            where = f"README command: {command.text or command.python}"
            if checked and command.line != commands[len(checked) - 1].line:
                os.chdir(sandbox)  # a new line: a new shell's directory
            args = project_words(command.words)
            if command.python is not None:  # the OpenAI client, against the server the README started
                assert server is not None, f"{where}: no `serve` before it in the README"
                code = command.python.replace("127.0.0.1:7860", f"127.0.0.1:{port}")
                result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
                assert result.returncode == 0 and result.stdout.strip(), f"{where}\n{result.stderr[-3000:]}"
            elif args is not None and (command.words[0] != "python" or parse_only_reason(args)):
                code, err, out = run_main(capsys, *args, *(TINY if args[0] in LIGHTNING else []), "--print_config",
                                          stdout=True)
                assert code == 0, f"{where} (parsed: {parse_only_reason(args) or 'a launcher'})\n{err[-3000:]}"
            elif args is not None and args[0] == "serve":
                env = {**os.environ, **command.env, "PYTHONPATH": str(REPO)}
                server = subprocess.Popen([sys.executable, "-m", "project", *args, "--port", str(port)], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                deadline = time.monotonic() + 240
                while not listening(port):
                    assert server.poll() is None, f"{where}\n{server.stderr.read()[-3000:]}"
                    assert time.monotonic() < deadline, f"{where}: not listening after 240 s"
                    time.sleep(0.2)
            elif args is not None:
                if args[:1] == ["evaluate"] and "--choices" in args:
                    write_quiz(text, Path(args[args.index("--choices") + 1]))
                extra = TINY if args[0] in LIGHTNING and "--print_config" not in args else []
                extra = FINETUNE_TINY if args[0] == "finetune" else extra
                with monkeypatch.context() as scoped:  # VAR=value before a command sets it for that command only
                    for key, value in command.env.items():
                        scoped.setenv(key, value)
                    code, err, out = run_main(capsys, *args, *extra, stdout=True)
                assert code == 0, f"{where}\n{err[-3000:]}"
                if args[0] == "fit" and fit_output is None:
                    fit_output = out
            elif command.words[:2] == ["python", "-c"]:
                result = subprocess.run([sys.executable, *command.words[1:]], capture_output=True, text=True,
                                        timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
                if "import llama_cpp" in command.words[2] and "No module named 'llama_cpp'" in result.stderr:
                    pytest.fail(f"{where}: llama-cpp-python is not installed (.ci/run installs it)")
                assert result.returncode == 0 and result.stdout.strip(), f"{where}\n{result.stderr[-3000:]}"
            elif command.words[0] == "export":  # export VAR=value for the commands that follow
                key, value = command.words[1].split("=", 1)
                value = value.replace("$PWD", str(sandbox))
                assert Path(value).is_dir(), f"{where}: {value} does not exist in this layout"
                monkeypatch.setenv(key, value)
            elif command.words[0] == "cd":
                monkeypatch.chdir(command.words[1])
            elif command.words[0] == "ollama":  # not installed here: check the Modelfile it reads
                check_modelfile(Path(command.words[command.words.index("-f") + 1]) if "-f" in command.words else None)
            elif command.words[0] == "tensorboard":
                check_tensorboard(command.words)
            elif command.words[:2] == ["pip", "install"] or command.words[:3] == ["python", "-m", "venv"]:
                check_install(command.words, ci, pyproject)
                venv = command.words[3] if command.words[1] == "-m" else venv
            elif command.words[0] == ".":  # activating the environment the README just made
                assert command.words[1] == f"{venv}/bin/activate", where
            elif command.words[:2] == ["apt-get", "install"]:
                assert f"apt-get install -y -qq {command.words[2]}" in ci, f"{where}: .ci/run installs otherwise"
            elif command.words == ["python", "-m", "pytest"]:
                assert "\npython -m pytest\n" in ci, f"{where}: .ci/run does not run it"
            else:
                pytest.fail(f"{where}: no rule checks this command; add one to tests/test_readme.py")
            checked.append(command.text or "python block")
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    assert len(checked) == len(commands) > 40
    check_fit_example(text, fit_output)


def write_quiz(readme: str, path: Path) -> None:
    """The multiple-choice file the README describes, made of its own example line (so the format shown is real)."""
    example = re.search(r'`(\{"question": .*?\})`', readme, flags=re.S).group(1)
    row = json.loads(" ".join(example.split()))
    path.write_text("".join(json.dumps(r) + "\n" for r in [row, {**row, "answer": 1}]), encoding="utf-8")


def check_modelfile(path: Path | None) -> None:
    gguf = pytest.importorskip("gguf")
    modelfile = (path or Path("Modelfile")).read_text()
    model = re.search(r"^FROM (\S+)", modelfile, flags=re.M).group(1)
    reader = gguf.GGUFReader(Path(model))
    arch = reader.get_field("general.architecture").contents()
    context = reader.get_field(f"{arch}.context_length").contents()
    assert f"PARAMETER num_ctx {context}\n" in modelfile and f"PARAMETER num_predict {context // 2}\n" in modelfile


def check_tensorboard(words: list[str]) -> None:
    port = free_port()
    words = [str(port) if previous == "--port" else w for previous, w in zip(["", *words], words)]
    process = subprocess.Popen([sys.executable, "-m", "tensorboard.main", *words[1:]], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not listening(port):
            assert process.poll() is None, process.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "tensorboard did not listen"
            time.sleep(0.2)
    finally:
        process.terminate()
        process.wait()


def check_install(words: list[str], ci: str, pyproject: str) -> None:
    """What the README installs is what CI installs: the same torch pin, and extras that exist."""
    if words[:3] == ["python", "-m", "venv"]:
        assert "python3 -m venv" in ci
        return
    for spec in words[2:]:
        if spec.startswith("torch=="):
            assert f"pip install -q {spec}" in ci
        extras = re.fullmatch(r"\.\[([\w,]+)\]", spec.removeprefix("-e").strip())
        for extra in (extras.group(1).split(",") if extras else []):
            assert re.search(rf"^{extra} = \[", pyproject, flags=re.M), f"pip install: no extra [{extra}]"


def check_fit_example(readme: str, fit_output: str | None) -> None:
    """The example of what `fit` prints has the lines the quick start's `fit` printed, numbers aside."""
    assert fit_output is not None
    example = re.search(r"```text\n(fit: .*?)```", readme, flags=re.S).group(1).strip().splitlines()
    printed = [line for line in fit_output.splitlines() if line.strip()]
    assert len(printed) == len(example), printed
    for shown, line in zip(example, printed):
        parts = re.split(r"(\d[\d,.]*(?: (?:s|min)\b)?)", shown)  # text, number, text, number, ...
        pattern = "".join(re.escape(part) if i % 2 == 0 else r"[\d,.]+ (?:s|min)" if part.endswith(("s", "min"))
                          else r"[\d,.]+" for i, part in enumerate(parts))
        assert re.fullmatch(pattern, line), f"README shows {shown!r}, fit printed {line!r}"


def test_readme_counts_match_the_tree():
    """The figures the README states about the tree itself: the notebooks it lists (all of them, none missing) and
    GPT-2 small's parameter count."""
    import yaml

    from project.formats.checkpoint import WithoutInitialisation
    from project.model import GPT, GPTConfig

    text = README.read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\((notebooks/[\w.-]+\.ipynb)\)", text))
    assert linked == {f"notebooks/{p.name}" for p in (REPO / "notebooks").glob("*.ipynb")}
    chapters = len([p for p in (REPO / "notebooks").glob("[0-9]*.ipynb")])
    words = {6: "Six", 7: "Seven", 8: "Eight", 9: "Nine", 10: "Ten"}
    assert f"{words[chapters]} notebooks build the model" in text
    config = yaml.safe_load((REPO / "configs" / "gpt2-124m.yaml").read_text())["model"]["config"]
    with torch.device("meta"), WithoutInitialisation():
        params = GPT(GPTConfig(**{**config, "vocab_size": 50257})).num_params()
    assert f"GPT-2 small ({params:,} parameters)" in text
