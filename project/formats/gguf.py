"""GGUF export: a GPT and its tokenizer as one `.gguf` file for llama.cpp, plus an Ollama `Modelfile` beside it.

    python -m project export --ckpt_path runs/.../last.ckpt --out gguf_model --format gguf [--dtype f32|f16|q8_0]

The two recipes `project.formats.hf` exports map onto llama.cpp architectures of the same name:

- GPT-2 (learned positions, layernorm, tanh GELU, bias, MHA) -> `gpt2`: q, k, v are fused into one `attn_qkv`
  (our nn.Linear weights are already llama.cpp's (out, in) layout; only HF's Conv1D needed a transpose).
- Llama (rope, rmsnorm, swiglu, any n_kv_head, optional biases) -> `llama`: llama.cpp rotates interleaved pairs
  (x[2i], x[2i+1]) where we rotate halves (x[i], x[i + D/2]), so the rows of q and k are permuted, per head,
  into that order; q.k dot products, and so the attention, are unchanged.

Tensor names come from the `gguf` package's own name table (`gguf.TENSOR_NAMES`); `GPT2_TENSORS` and
`LLAMA_TENSORS` say which of our parameters fill which tensor, and how. A tied head is not written: llama.cpp
reads `token_embd` as the output matrix when `output` is absent.

Tokenizer: BPE vocabularies (GPT-2's, or any byte-level BPE whose tokenizer.json the tokenizer's `hf_backend`
builds) are written as llama.cpp's `gpt2` tokenizer: the vocabulary, merges and token types of that
tokenizer.json. The character tokenizer becomes llama.cpp's `rwkv` tokenizer (greedy longest match over raw
bytes, no special tokens): every character is one token, so the ids are exactly ours. A BPE-style `gpt2`
vocabulary would not do: llama.cpp then treats token 11 as end-of-text, and one character would stop generation.

Context: the file states the context the model was trained with (`<arch>.context_length` = block_size); the
Modelfile sets Ollama's `num_ctx` to it and caps a reply at half of it (`num_predict`). Nothing may run past it: a
model with learned positions (gpt2) has no position embedding beyond its context, and llama.cpp reads past the
table and aborts the process (GGML_ASSERT). `n_ctx` does not prevent that: llama.cpp rounds it up to a multiple of
256, so a 128-token model runs with 256 (tests/test_gguf.py). Only prompt + max tokens within the context do.

Precision (`dtype`): f32 keeps every tensor; f16 and q8_0 convert the matrices (1-D norms and biases, and the
learned position table, stay f32, as llama.cpp's own converter does). q8_0 needs rows of a multiple of 32
values; a matrix whose rows are not falls back to f16.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from project.chat import PromptTemplate
from project.generate import GenerationSettings
from project.extras import require_extra
from project.files import atomic_path, atomic_write
from project.formats.hf import hf_family
from project.model import GPT, GPTConfig
from project.tokenizer import Tokenizer

GGUFDtype = Literal["f32", "f16", "q8_0"]  # weight precisions written
GGUF_DTYPES = get_args(GGUFDtype)
GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"


def _require_gguf():
    return require_extra("gguf", "export", "GGUF export")


# --- architecture mapping -------------------------------------------------------------------------------


def gguf_architecture(config: GPTConfig) -> str:
    """'gpt2' or 'llama': the llama.cpp architecture that computes exactly what `config` does, else ValueError."""
    family = hf_family(config)  # the same recipes as the transformers export, with the same one-line refusal
    if family == "gpt2" and config.gelu_approximate != "tanh":
        raise ValueError("llama.cpp's gpt2 architecture uses the tanh GELU, this model the exact (erf) one "
                         "(gelu_approximate=none): train with gelu_approximate=tanh, or export with --format hf")
    return family


def interleave_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection (weight or bias) reordered per head from rotate-half order (i, i + D/2)
    to llama.cpp's interleaved pairs (2i, 2i + 1)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class TensorRule:
    """Which of our modules fill one GGUF tensor kind (`.weight`, and `.bias` where we have one).

    Several sources are concatenated along the rows (GPT-2's fused qkv); `transform` reorders the result.
    "{i}" in a source name is the block index.
    """

    sources: tuple[str, ...]
    target: str  # a gguf.MODEL_TENSOR member name; gguf.TENSOR_NAMES gives its file name, e.g. "blk.{bid}.attn_q"
    transform: Callable[[torch.Tensor, GPTConfig], torch.Tensor] | None = None


def rule(source: str | tuple[str, ...], target: str, transform=None) -> TensorRule:
    return TensorRule((source,) if isinstance(source, str) else source, target, transform)


GPT2_TENSORS = (
    rule("wte", "TOKEN_EMBD"),
    rule("wpe", "POS_EMBD"),
    rule("blocks.{i}.norm1", "ATTN_NORM"),
    rule(("blocks.{i}.attn.q_proj", "blocks.{i}.attn.k_proj", "blocks.{i}.attn.v_proj"), "ATTN_QKV"),
    rule("blocks.{i}.attn.proj", "ATTN_OUT"),
    rule("blocks.{i}.norm2", "FFN_NORM"),
    rule("blocks.{i}.mlp.fc", "FFN_UP"),
    rule("blocks.{i}.mlp.proj", "FFN_DOWN"),
    rule("norm", "OUTPUT_NORM"),
    rule("lm_head", "OUTPUT"),  # untied heads only
)
LLAMA_TENSORS = (
    rule("wte", "TOKEN_EMBD"),
    rule("blocks.{i}.norm1", "ATTN_NORM"),
    rule("blocks.{i}.attn.q_proj", "ATTN_Q", lambda w, c: interleave_rope_rows(w, c.n_head)),
    rule("blocks.{i}.attn.k_proj", "ATTN_K", lambda w, c: interleave_rope_rows(w, c.kv_heads)),
    rule("blocks.{i}.attn.v_proj", "ATTN_V"),
    rule("blocks.{i}.attn.proj", "ATTN_OUT"),
    rule("blocks.{i}.norm2", "FFN_NORM"),
    rule("blocks.{i}.mlp.gate", "FFN_GATE"),
    rule("blocks.{i}.mlp.fc", "FFN_UP"),
    rule("blocks.{i}.mlp.proj", "FFN_DOWN"),
    rule("norm", "OUTPUT_NORM"),
    rule("lm_head", "OUTPUT"),  # untied heads only
)
TENSOR_RULES = {"gpt2": GPT2_TENSORS, "llama": LLAMA_TENSORS}


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's tensor names and layouts (float32, CPU), in file order."""
    gguf = _require_gguf()
    config = model.config
    arch = gguf_architecture(config)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for entry in TENSOR_RULES[arch]:
        if entry.target == "OUTPUT" and config.tie_embeddings:
            continue
        template = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[entry.target]]
        blocks = range(config.n_layer) if "{i}" in entry.sources[0] else [None]
        for i in blocks:
            for kind in ("weight", "bias"):
                names = [f"{s.format(i=i)}.{kind}" for s in entry.sources]
                if names[0] not in state:
                    continue
                tensor = torch.cat([state[n] for n in names]) if len(names) > 1 else state[names[0]]
                if entry.transform is not None:
                    tensor = entry.transform(tensor, config)
                out[f"{template.format(bid=i)}.{kind}"] = tensor.contiguous()
    return out


# --- tokenizer -------------------------------------------------------------------------------------------


@dataclass
class GGUFVocab:
    """The tokenizer as llama.cpp reads it from `tokenizer.ggml.*`."""

    model: Literal["gpt2", "rwkv"]
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    merges: list[str]  # "left right" pairs in rank order (BPE only)
    pre: str | None = None  # llama.cpp pre-tokenizer name (BPE only)
    eos_id: int | None = None


# text whose pre-tokenization shows whether a tokenizer splits words as GPT-2 does (what llama.cpp's "gpt-2"
# pre-tokenizer implements): contractions, letters, digits, punctuation and runs of whitespace
PRE_TOKENIZER_PROBE = "It's 2024, they'll  say:\n\n\tCafé naïve 日本語 🙂 x1y22 --?!  \n end   "


def rwkv_escape(text: str) -> str:
    """A token text in the escaped form llama.cpp's rwkv tokenizer reads back to raw bytes."""
    escaped = []
    for ch in text:
        if ch == "\\":
            escaped.append("\\\\")
        elif ch in "\t\n\r":
            escaped.append({"\t": "\\t", "\n": "\\n", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            escaped.append(f"\\x{ord(ch):02x}")
        else:
            escaped.append(ch)  # other characters are copied byte for byte (UTF-8)
    return "".join(escaped)


def char_vocab(tokenizer: Tokenizer, vocab_size: int) -> GGUFVocab:
    """Each token's own text, escaped as llama.cpp's rwkv tokenizer reads it (one character per token)."""
    gguf = _require_gguf()
    tokens = [rwkv_escape(tokenizer.decode([i])) for i in range(tokenizer.vocab_size)]
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    return _padded(GGUFVocab("rwkv", tokens, types, []), vocab_size)


def bpe_vocab(tokenizer: Tokenizer, vocab_size: int) -> GGUFVocab:
    """Vocabulary, merges and token types of the tokenizer's Hugging Face backend (its tokenizer.json)."""
    gguf = _require_gguf()
    backend = tokenizer.hf_backend()
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"cannot export tokenizer {type(tokenizer).__name__} to GGUF: llama.cpp reads byte-level "
                         f"BPE (and characters), this one is {model.get('type')!r}")
    if spec.get("normalizer") is not None:
        raise ValueError("cannot export a BPE tokenizer with a normalizer to GGUF: llama.cpp's gpt2 tokenizer has none")
    from tokenizers import pre_tokenizers

    gpt2_split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    ours = backend.pre_tokenizer
    if ours is None or ours.pre_tokenize_str(PRE_TOKENIZER_PROBE) != gpt2_split.pre_tokenize_str(PRE_TOKENIZER_PROBE):
        raise ValueError("cannot export this BPE tokenizer to GGUF: it splits words unlike GPT-2, and llama.cpp "
                         "knows only fixed pre-tokenizers (the gpt-2 one is used here)")
    by_id = {i: t for t, i in model["vocab"].items()}
    special = set()
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        if added.get("special"):
            special.add(added["id"])
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError("cannot export this BPE tokenizer to GGUF: its token ids are not 0..N-1")
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return _padded(GGUFVocab("gpt2", tokens, types, merges, pre="gpt-2", eos_id=tokenizer.eot_id), vocab_size)


def _padded(vocab: GGUFVocab, vocab_size: int) -> GGUFVocab:
    """Rows of the model past the tokenizer's vocabulary get placeholder tokens that no text encodes to."""
    gguf = _require_gguf()
    if len(vocab.tokens) > vocab_size:
        raise ValueError(f"tokenizer has {len(vocab.tokens)} tokens but the model only {vocab_size}")
    for i in range(len(vocab.tokens), vocab_size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.token_types.append(int(gguf.TokenType.UNUSED))
    return vocab


VOCAB_BUILDERS = {"rwkv": char_vocab, "gpt2": bpe_vocab}  # llama.cpp tokenizer model -> how to write it


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> GGUFVocab:
    """The tokenizer in llama.cpp's terms, by the model that reproduces its ids (`Tokenizer.gguf_model`)."""
    return VOCAB_BUILDERS[tokenizer.gguf_model](tokenizer, vocab_size)


# --- writing ---------------------------------------------------------------------------------------------


def tensor_data(name: str, tensor: torch.Tensor, dtype: str):
    """(array, GGML type) of one tensor at the requested precision; vectors and position tables stay f32."""
    gguf = _require_gguf()
    array = tensor.numpy()
    if dtype == "f32" or array.ndim == 1 or name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD]):
        return array, gguf.GGMLQuantizationType.F32
    if dtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        if array.shape[-1] % block == 0:
            return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def write_gguf(model: GPT, tokenizer: Tokenizer, path: str | Path, dtype: str = "f32", name: str = "project-gpt",
               template: PromptTemplate | None = None) -> Path:
    """Write `model` and `tokenizer` as one GGUF file at `path` (replaced if it exists); an instruction-tuned
    model's `template` as `tokenizer.chat_template`, which llama.cpp applies to chat requests."""
    gguf = _require_gguf()
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}: choose one of {', '.join(GGUF_DTYPES)}")
    config = model.config
    arch = gguf_architecture(config)
    vocab = gguf_vocab(tokenizer, config.vocab_size)  # refuses an unsupported tokenizer before any writing
    tensors = gguf_tensors(model)
    with atomic_path(path) as staging:  # a failure never leaves a half-written file at `path`
        chat_template = None if template is None else template.jinja(tokenizer.eot_text)
        _write_contents(gguf.GGUFWriter(staging, arch), arch, config, vocab, tensors, dtype, name, chat_template)
    return Path(path)


def _write_contents(writer, arch: str, config: GPTConfig, vocab: GGUFVocab, tensors: dict[str, torch.Tensor],
                    dtype: str, name: str, chat_template: str | None) -> None:
    """Hyperparameters, tokenizer and tensors through an open GGUFWriter, which is closed at the end."""
    gguf = _require_gguf()
    try:
        writer.add_name(name)
        writer.add_file_type(int(gguf.LlamaFileType[FILE_TYPES[dtype]]))
        if dtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(config.block_size)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.hidden_dim)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_head_count_kv(config.kv_heads)
        writer.add_vocab_size(config.vocab_size)
        if arch == "gpt2":
            writer.add_layer_norm_eps(config.norm_eps)
        else:
            writer.add_layer_norm_rms_eps(config.norm_eps)
            writer.add_rope_dimension_count(config.head_dim)
            writer.add_rope_freq_base(float(config.rope_base))
        writer.add_tokenizer_model(vocab.model)
        if vocab.pre is not None:
            writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.token_types)
        if vocab.merges:
            writer.add_token_merges(vocab.merges)
        if vocab.eos_id is not None:
            writer.add_bos_token_id(vocab.eos_id)  # GPT-2 has one end-of-text token for both
            writer.add_eos_token_id(vocab.eos_id)
        writer.add_add_bos_token(False)  # our models were trained without a start token
        if chat_template is not None:
            writer.add_chat_template(chat_template)
        for tensor_name, tensor in tensors.items():
            data, ggml_type = tensor_data(tensor_name, tensor, dtype)
            writer.add_tensor(tensor_name, data, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def modelfile_text(gguf_name: str, config: GPTConfig, eot_text: str | None,
                   template: PromptTemplate | None = None) -> str:
    """An Ollama Modelfile: a base model gets the prompt as it is; an instruction-tuned one its chat template."""
    settings = GenerationSettings()  # the project's own sampling defaults
    lines = [
        "# Ollama: ollama create NAME -f Modelfile, then ollama run NAME \"ROMEO:\"",
        f"# the model's context is {config.block_size} tokens: prompt and reply together must fit in it (a model with",
        "# learned positions has none beyond it), so a reply is capped at half of it, leaving the rest for the prompt",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{"{{ .Prompt }}" if template is None else template.go(eot_text)}"""',
        f"PARAMETER num_ctx {config.block_size}",
        f"PARAMETER num_predict {config.block_size // 2}",
        f"PARAMETER temperature {settings.temperature}",
        f"PARAMETER top_k {settings.top_k}",
    ]
    if eot_text is not None:
        lines.append(f'PARAMETER stop "{eot_text}"')
    return "\n".join(lines) + "\n"


def gguf_outputs(out: str | Path) -> tuple[Path, Path]:
    """The two files an export to directory `out` writes: the .gguf and the Modelfile."""
    out = Path(out)
    return out / GGUF_FILE, out / MODELFILE


def check_gguf_output(out: str | Path, overwrite: bool = False) -> None:
    """FileExistsError (or NotADirectoryError) unless `out` can take the export's files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file: pass a directory path")
    existing = [p for p in gguf_outputs(out) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists: pass --overwrite true to replace it, or another --out")


def export_gguf(model: GPT, tokenizer: Tokenizer, out: str | Path, *, dtype: str = "f32",
                overwrite: bool = False, template: PromptTemplate | None = None) -> Path:
    """Write `out`/model.gguf (weights at `dtype`, tokenizer, hyperparameters, chat template) and `out`/Modelfile
    for Ollama.

    Returns the .gguf path. Existing files in `out` are replaced only with `overwrite`.
    """
    check_gguf_output(out, overwrite)
    gguf_path, modelfile_path = gguf_outputs(out)
    write_gguf(model, tokenizer, gguf_path, dtype=dtype, name=Path(out).resolve().name, template=template)
    atomic_write(modelfile_path, modelfile_text(gguf_path.name, model.config, tokenizer.eot_text, template))
    return gguf_path
