"""The prompt template (project/chat.py): one source, and every rendering of it equal — the Python text and token
ids, transformers' chat_template, llama.cpp's GGUF chat template and Ollama's Go TEMPLATE."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import LLAMA_STYLE, tiny_gpt
from project.chat import IGNORE_INDEX, TEMPLATES, PromptTemplate, prompt_template
from project.tokenizer import TiktokenTokenizer, train_bpe

CONVERSATIONS = [
    [{"role": "user", "content": "Who speaks?"}],
    [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "Speak, {{friend}} \"quoted\" {% raw %}"}],
    [{"role": "user", "content": "Continue: O Romeo,"}, {"role": "assistant", "content": " Romeo! wherefore art thou"},
     {"role": "user", "content": "And then?\n\n"}],
    [{"role": "system", "content": "a"}, {"role": "user", "content": "café — naïve 😀\ttab \\ back"},
     {"role": "assistant", "content": "x\n"}, {"role": "system", "content": "b"}, {"role": "user", "content": "ok"}],
]


@pytest.fixture(scope="module")
def bpe(shakespeare_path):
    return train_bpe(shakespeare_path.read_text()[:100_000], 400)


def test_alpaca_is_the_books_prompt():
    """Alpaca's template, the prompt of the book's chapter 7 (format_input + the response) and its end-of-text."""
    def format_input(entry):  # the book's, verbatim
        instruction_text = (f"Below is an instruction that describes a task. "
                            f"Write a response that appropriately completes the request."
                            f"\n\n### Instruction:\n{entry['instruction']}")
        input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
        return instruction_text + input_text

    alpaca = TEMPLATES["alpaca"]
    for entry in ({"instruction": "Rewrite.", "input": "Thou art", "output": "You are"},
                  {"instruction": "Name a play.", "input": "", "output": "Hamlet"}):
        messages = alpaca.record_messages(entry["instruction"], entry["input"], entry["output"])
        expected = format_input(entry) + f"\n\n### Response:\n{entry['output']}<|endoftext|>"
        assert alpaca.render(messages, "<|endoftext|>", add_generation_prompt=False) == expected


def test_encode_learns_replies_and_their_end_only(bpe):
    template = TEMPLATES["alpaca"]
    messages = CONVERSATIONS[2][:2] + [{"role": "user", "content": "More"}, {"role": "assistant", "content": "Yes"}]
    ids, labels = template.encode(messages, bpe)
    assert len(ids) == len(labels)
    learned = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in learned)
    # the learned tokens are exactly each reply followed by end-of-text, in order
    replies = bpe.encode(" Romeo! wherefore art thou") + [bpe.eot_id] + bpe.encode("Yes") + [bpe.eot_id]
    assert [ids[i] for i in learned] == replies
    # and the prompt tokens, decoded, are the rendered prompt text
    prompt_ids = [ids[i] for i in range(len(ids)) if labels[i] == IGNORE_INDEX]
    text = template.render(messages, bpe.eot_text, add_generation_prompt=False)
    assert bpe.decode(ids) == text
    assert bpe.decode(prompt_ids).startswith(template.system)
    # a generation prompt ends with the reply's prefix and learns nothing
    ids, labels = template.encode(messages[:1], bpe, add_generation_prompt=True)
    assert set(labels) == {IGNORE_INDEX} and bpe.decode(ids).endswith(template.assistant_prefix)


def test_a_tokenizer_without_end_of_text_is_refused(chars):
    with pytest.raises(ValueError, match="end-of-text token.*gpt2 or bpe:N"):
        TEMPLATES["alpaca"].encode(CONVERSATIONS[0], chars)


@pytest.mark.parametrize("preset", TEMPLATES)
@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_transformers_chat_template_renders_and_tokenizes_alike(preset, kind, bpe):
    """tokenizer.apply_chat_template with the exported Jinja gives our text and our ids, for prompts and training
    conversations, with GPT-2's tiktoken BPE and a trained one."""
    from project.formats.hf import hf_tokenizer

    tokenizer = TiktokenTokenizer("gpt2") if kind == "gpt2" else bpe
    template = TEMPLATES[preset]
    hf = hf_tokenizer(tokenizer)
    hf.chat_template = template.jinja(tokenizer.eot_text)
    for messages in CONVERSATIONS:
        assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            template.render(messages, tokenizer.eot_text)
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert ids == template.encode(messages, tokenizer, add_generation_prompt=True)[0]
    trained = CONVERSATIONS[2][:2]  # ending with a reply: the training form
    ids = hf.apply_chat_template(trained, tokenize=True, add_generation_prompt=False)["input_ids"]
    assert ids == template.encode(trained, tokenizer)[0]


def go_render(template: str, messages: list[dict]) -> str:
    """Ollama's Go text/template for the subset `PromptTemplate.go` writes: {{ "literal" }}, {{ .System }},
    {{ .Content }}, if / else if / else / end on .System or `eq .Role "x"`, and range .Messages. As Ollama does,
    .System is the system messages joined by a blank line, and .Messages holds every message."""
    actions = re.findall(r"\{\{ (.*?) \}\}(?=\{\{|$)", template)
    assert "".join(f"{{{{ {a} }}}}" for a in actions) == template, "text outside actions"

    def parse(pos: int) -> tuple[list, int]:
        """Nodes from `pos` up to the next else / else if / end (or the end), and where they stop."""
        nodes = []
        while pos < len(actions) and actions[pos] != "end" and not actions[pos].startswith("else"):
            action = actions[pos]
            if action.startswith("if "):
                branches, condition = [], action[3:]
                while True:
                    body, pos = parse(pos + 1)
                    branches.append((condition, body))
                    if actions[pos] == "end":
                        break
                    condition = actions[pos].removeprefix("else").removeprefix(" if ") or None  # None: else
                nodes.append(("if", branches))
            elif action == "range .Messages":
                body, pos = parse(pos + 1)
                nodes.append(("range", body))
            else:
                nodes.append(("value", action))
            pos += 1  # past the value, or the `end` of a block
        return nodes, pos

    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")

    def holds(condition: str | None, message: dict | None) -> bool:
        if condition is None or condition == ".System":
            return condition is None or bool(system)
        return message["role"] == re.fullmatch(r'eq \.Role "(\w+)"', condition).group(1)

    def execute(nodes: list, message: dict | None, out: list[str]) -> None:
        for kind, value in nodes:
            if kind == "value":
                out.append(json.loads(value) if value.startswith('"') else
                           system if value == ".System" else message["content"])
            elif kind == "range":
                for each in messages:
                    execute(value, each, out)
            else:
                body = next((body for condition, body in value if holds(condition, message)), [])
                execute(body, message, out)

    nodes, _ = parse(0)
    out: list[str] = []
    execute(nodes, None, out)
    return "".join(out)


def test_ollama_template_renders_like_python():
    tricky = PromptTemplate(name="tricky", system="Be {{ brief }}.", user_prefix="<u \"q\">\n", assistant_suffix="\\",
                            assistant_prefix="{{ .Response }}\n")
    for template in [*TEMPLATES.values(), tricky]:
        go = template.go("<|endoftext|>")
        for messages in CONVERSATIONS:
            assert go_render(go, messages) == template.render(messages, "<|endoftext|>")


def test_modelfile_template_golden():
    assert TEMPLATES["instruct"].go("<|endoftext|>") == (
        '{{ if .System }}{{ .System }}{{ "\\n\\n" }}{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}'
        '{{ "### Instruction:\\n" }}{{ .Content }}{{ "\\n\\n" }}{{ else if eq .Role "assistant" }}'
        '{{ "### Response:\\n" }}{{ .Content }}{{ "<|endoftext|>" }}{{ end }}{{ end }}{{ "### Response:\\n" }}')


@pytest.mark.parametrize("fields, message", [
    ({"assistant_prefix": "### Response:"}, "must end with a newline"),
    ({"system": 'say """hi"""'}, "Modelfile cannot quote"),
    ({"user_prefix": 3}, "must be a string"),
])
def test_bad_templates_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        PromptTemplate(**fields)


def test_templates_from_names_and_fields():
    assert prompt_template("instruct") is TEMPLATES["instruct"]
    assert prompt_template(TEMPLATES["alpaca"].to_dict()) == TEMPLATES["alpaca"]
    with pytest.raises(ValueError, match="unknown prompt template 'chatml'"):
        prompt_template("chatml")
    with pytest.raises(ValueError, match="unknown fields \\['bos'\\]"):
        prompt_template({"bos": "<s>"})


def test_gguf_carries_the_template_and_llama_cpp_prompts_as_we_do(bpe, tmp_path):
    """llama.cpp reads tokenizer.chat_template and picks it as the chat format; the prompt its Jinja renderer makes
    (with an empty eos_token, as llama.cpp's server passes) tokenizes to our ids, and it continues them greedily
    with our tokens."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (../shared/wheels) is not installed")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from project.formats.gguf import export_gguf
    from project.generate import GenerationSettings, generate

    template = TEMPLATES["instruct"]
    model = tiny_gpt(bpe.vocab_size, spread=0.2, block_size=64, n_embd=64, n_kv_head=2, **LLAMA_STYLE)
    path = export_gguf(model, bpe, tmp_path / "gguf", template=template)
    assert 'TEMPLATE """' + template.go(bpe.eot_text) + '"""' in (tmp_path / "gguf" / "Modelfile").read_text()
    messages = [{"role": "user", "content": "Which character speaks these lines?"}]
    ids, _ = template.encode(messages, bpe, add_generation_prompt=True)
    ours = generate(model, torch.tensor([ids]), GenerationSettings(max_new_tokens=4, temperature=0, stop_at_eot=False))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False)
    try:
        assert llm.metadata["tokenizer.chat_template"] == template.jinja(bpe.eot_text)
        assert llm.chat_format == "chat_template.default"
        for conversation in CONVERSATIONS:
            prompt = Jinja2ChatFormatter(template.jinja(bpe.eot_text), eos_token="", bos_token="")(
                messages=conversation).prompt
            assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == \
                template.encode(conversation, bpe, add_generation_prompt=True)[0]
        theirs = []
        for token in llm.generate(ids, temp=0.0, top_k=1):
            theirs.append(token)
            if len(theirs) == 4:
                break
        reply = llm.create_chat_completion(messages, temperature=0.0, max_tokens=4)
    finally:
        llm.close()
    assert theirs == ours[0, len(ids):].tolist()
    assert reply["usage"]["prompt_tokens"] == len(ids)
