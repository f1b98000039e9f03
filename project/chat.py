"""The prompt template of an instruction-tuned model: one dataclass, rendered four ways.

A conversation is a list of messages, `{"role": "system" | "user" | "assistant", "content": str}`. The template
says what text surrounds each message; the model learns to answer in that shape, so everything that talks to it
afterwards must build prompts exactly so. One `PromptTemplate`, stored in the fine-tuned checkpoint as plain
strings, is the single source of:

- token ids and loss mask for training (`encode`: prompt tokens get label -100, replies and their end-of-text are
  learned), and prompts for `generate --chat`, `finetune predict`, the page and `/v1/chat/completions`;
- plain text (`render`), what the other renderings are checked against;
- Jinja (`jinja`): transformers' `chat_template` and GGUF's `tokenizer.chat_template` (llama.cpp);
- Go text/template (`go`): the `TEMPLATE` of an Ollama Modelfile.

The default, `alpaca`, is the prompt of the Alpaca data set (and of the book this project's guide follows):

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}[\\n\\n### Input:\\n{input}]

    ### Response:
    {output}<|endoftext|>

Ids are made from whole runs of text, never from pieces: GPT-2's pre-tokenizer splits trailing whitespace
differently at the end of a string than in the middle, so each maximal run of prompt text is encoded as one
string, each reply as one string, and the end-of-text token is inserted by id. That gives the ids transformers and
llama.cpp make from the rendered text, because every prompt run ends with `assistant_prefix`, which ends in a newline.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from project.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # the label of a token the loss skips (F.cross_entropy's default ignore_index)
ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")


@dataclass(frozen=True)
class PromptTemplate:
    """The text around each message of a conversation. All fields are plain strings (stored in checkpoints).

    Args:
        name: a label for people (`alpaca`, `instruct`, or your own).
        system: the system text used when the conversation has no system message ("" = none).
        system_prefix: text before the system text.
        system_suffix: text after the system text.
        user_prefix: text before each user message.
        user_suffix: text after each user message.
        assistant_prefix: text before each reply; also the generation prompt. Must end with a newline.
        assistant_suffix: text after each reply, before the end-of-text token.
        input_prefix: joins an Alpaca record's optional `input` to its instruction.
    """

    name: str = "alpaca"
    system: str = ALPACA_SYSTEM
    system_prefix: str = ""
    system_suffix: str = "\n\n"
    user_prefix: str = "### Instruction:\n"
    user_suffix: str = "\n\n"
    assistant_prefix: str = "### Response:\n"
    assistant_suffix: str = ""
    input_prefix: str = "\n\n### Input:\n"

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), str):
                raise ValueError(f"prompt template field {f.name} must be a string, got {getattr(self, f.name)!r}")
            if '"""' in getattr(self, f.name):  # the Modelfile quotes the template with """
                raise ValueError(f'prompt template field {f.name} contains """, which an Ollama Modelfile cannot quote')
        if not self.assistant_prefix.endswith("\n"):
            raise ValueError(f"prompt template assistant_prefix must end with a newline (got "
                             f"{self.assistant_prefix!r}), so a reply's tokens are the same alone as after the prompt")

    def to_dict(self) -> dict[str, str]:
        """Plain strings, as stored in a checkpoint's hyperparameters."""
        return asdict(self)

    # --- messages --------------------------------------------------------------------------------------

    def record_messages(self, instruction: str, input: str = "", output: str | None = None) -> list[dict]:
        """An Alpaca record (instruction, optional input, output) as messages: a user turn and, with an output, a reply."""
        messages = [{"role": "user", "content": instruction + (self.input_prefix + input if input else "")}]
        if output is not None:
            messages.append({"role": "assistant", "content": output})
        return messages

    def segments(self, messages: list[dict], add_generation_prompt: bool) -> list[tuple[str | None, bool]]:
        """The conversation as (text, learned) pieces in order; None stands for the end-of-text token.

        System messages, wherever they are, are joined with a blank line and come first (as Ollama's `.System`);
        without one, the template's own `system` text does. Each reply and its end-of-text are learned.
        """
        systems = [m["content"] for m in messages if m["role"] == "system"]
        system = "\n\n".join(systems) if systems else self.system
        pieces: list[tuple[str | None, bool]] = []
        if system:
            pieces.append((self.system_prefix + system + self.system_suffix, False))
        for message in messages:
            if message["role"] == "user":
                pieces.append((self.user_prefix + message["content"] + self.user_suffix, False))
            elif message["role"] == "assistant":
                pieces += [(self.assistant_prefix, False), (message["content"] + self.assistant_suffix, True),
                           (None, True)]
        if add_generation_prompt:
            pieces.append((self.assistant_prefix, False))
        return pieces

    # --- renderings ----------------------------------------------------------------------------------------

    def render(self, messages: list[dict], eot_text: str, add_generation_prompt: bool = True) -> str:
        """The conversation as plain text, `eot_text` where the end-of-text token goes."""
        return "".join(eot_text if text is None else text for text, _ in self.segments(messages, add_generation_prompt))

    def encode(self, messages: list[dict], tokenizer: Tokenizer,
               add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, labels): the conversation's token ids, and the same ids where the model learns (replies and their
        end-of-text) or IGNORE_INDEX where it only reads (system, user turns, prefixes)."""
        if tokenizer.eot_id is None:
            raise ValueError(f"a prompt template needs a tokenizer with an end-of-text token, and "
                             f"{tokenizer.describe()} has none: use gpt2 or bpe:N")
        ids: list[int] = []
        labels: list[int] = []
        pending = ""  # consecutive prompt text, encoded whole (see the module docstring)

        def flush() -> None:
            nonlocal pending
            if pending:
                ids.extend(tokenizer.encode(pending))
                labels.extend([IGNORE_INDEX] * (len(ids) - len(labels)))
                pending = ""

        for text, learned in self.segments(messages, add_generation_prompt):
            if not learned:
                pending += text
                continue
            flush()
            piece = [tokenizer.eot_id] if text is None else tokenizer.encode(text)
            ids.extend(piece)
            labels.extend(piece)
        flush()
        return ids, labels

    def jinja(self, eot_text: str) -> str:
        """The template as a Jinja chat template (transformers' `chat_template`, GGUF's `tokenizer.chat_template`).

        On one line, so transformers' and llama.cpp's whitespace options (trim_blocks, lstrip_blocks) change
        nothing; the end-of-text is a literal, as llama.cpp passes an empty `eos_token` to some templates.
        """
        q = jinja_string
        default = f"{{% else %}}{{{{ {q(self.system_prefix + self.system + self.system_suffix)} }}}}" if self.system else ""
        return (
            "{% set ns = namespace(system='') %}"
            "{% for message in messages %}{% if message['role'] == 'system' %}"
            "{% set ns.system = ns.system + ('\\n\\n' if ns.system else '') + message['content'] %}"
            "{% endif %}{% endfor %}"
            f"{{% if ns.system %}}{{{{ {q(self.system_prefix)} + ns.system + {q(self.system_suffix)} }}}}{default}"
            "{% endif %}"
            "{% for message in messages %}"
            f"{{% if message['role'] == 'user' %}}"
            f"{{{{ {q(self.user_prefix)} + message['content'] + {q(self.user_suffix)} }}}}"
            f"{{% elif message['role'] == 'assistant' %}}"
            f"{{{{ {q(self.assistant_prefix)} + message['content'] + {q(self.assistant_suffix + eot_text)} }}}}"
            "{% endif %}{% endfor %}"
            f"{{% if add_generation_prompt %}}{{{{ {q(self.assistant_prefix)} }}}}{{% endif %}}"
        )

    def go(self, eot_text: str) -> str:
        """The template as Go text/template, an Ollama Modelfile's TEMPLATE (always ending in the generation prompt).

        Ollama passes the joined system messages as `.System` and every message in `.Messages` (system ones too,
        skipped here). It merges consecutive messages of one role with a blank line; `render` does not.
        """
        def g(text: str) -> str:  # a Go string-literal action; a JSON string is a valid Go literal
            return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""

        default = f"{{{{ else }}}}{g(self.system_prefix + self.system + self.system_suffix)}" if self.system else ""
        return (
            f"{{{{ if .System }}}}{g(self.system_prefix)}{{{{ .System }}}}{g(self.system_suffix)}{default}{{{{ end }}}}"
            "{{ range .Messages }}"
            f'{{{{ if eq .Role "user" }}}}{g(self.user_prefix)}{{{{ .Content }}}}{g(self.user_suffix)}'
            f'{{{{ else if eq .Role "assistant" }}}}{g(self.assistant_prefix)}{{{{ .Content }}}}'
            f"{g(self.assistant_suffix + eot_text)}"
            "{{ end }}{{ end }}"
            f"{g(self.assistant_prefix)}"
        )


def jinja_string(text: str) -> str:
    """`text` as a Jinja string literal (Jinja reads JSON's escapes)."""
    return json.dumps(text, ensure_ascii=False)


# the presets `--model.template NAME` chooses; `instruct` drops Alpaca's 37-token preamble, which matters when the
# context is short
TEMPLATES = {
    "alpaca": PromptTemplate(),
    "instruct": PromptTemplate(name="instruct", system=""),
}


def prompt_template(value: str | dict | PromptTemplate) -> PromptTemplate:
    """A template from a preset name, a dict of fields (as stored in a checkpoint) or a template."""
    if isinstance(value, PromptTemplate):
        return value
    if isinstance(value, str):
        if value not in TEMPLATES:
            raise ValueError(f"unknown prompt template {value!r}: choose one of {', '.join(TEMPLATES)}, or give its "
                             "fields (name, system, user_prefix, ...)")
        return TEMPLATES[value]
    if isinstance(value, dict):
        unknown = sorted(set(value) - {f.name for f in fields(PromptTemplate)})
        if unknown:
            raise ValueError(f"prompt template has unknown fields {unknown}: the fields are "
                             f"{', '.join(f.name for f in fields(PromptTemplate))}")
        return PromptTemplate(**value)
    raise ValueError(f"a prompt template is a preset name or a dict of fields, got {type(value).__name__}")


def check_messages(messages: object) -> list[dict]:
    """`messages` if it is a conversation (a list of {"role", "content"} with known roles and string contents),
    else ValueError naming the first problem."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"} or "content" not in message:
            raise ValueError(f"message {i} must be an object with role and content")
        if message.get("role") not in ROLES:
            raise ValueError(f"message {i} has role {message.get('role')!r}: use one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise ValueError(f"message {i} content must be a string")
    return messages
