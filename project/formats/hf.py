"""Hugging Face compatibility: export a GPT (and its tokenizer) to a transformers directory, and back.

    python -m project export --ckpt_path runs/.../last.ckpt --out hf_model

The directory loads offline with `AutoModelForCausalLM.from_pretrained(DIR)`, `AutoTokenizer.from_pretrained(DIR)`
and `transformers.pipeline("text-generation", model=DIR)`, with the same logits as the original model.

Two recipes map exactly onto a transformers architecture; any other combination of options is refused:

- GPT-2 (learned positions, layernorm, gelu, bias, MHA) -> `GPT2LMHeadModel`. Its Conv1D weights are stored
  (in, out), so linear weights are transposed, and q, k, v are concatenated into one `c_attn`.
- Llama (rope, rmsnorm, swiglu, any n_kv_head) -> `LlamaForCausalLM`. Our rotary layout (rotate-half) is the
  one transformers uses, so q/k need no permutation; gate -> gate_proj, fc -> up_proj, proj -> down_proj.

Weights are written and read with safetensors only: nothing is ever unpickled. transformers is imported
lazily, so the rest of the project does not need it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from project.chat import PromptTemplate, prompt_template
from project.extras import require_extra
from project.files import remove_path, remove_stale_temporaries, set_default_modes, temporary_path
from project.model import GPT, GPTConfig, architecture_fields
from project.tokenizer import Tokenizer, tokenizer_from_hf_file

TEMPLATE_FILE = "prompt_template.json"  # an instruction-tuned model's PromptTemplate fields (project/chat.py)
GPT2_ACTIVATIONS = {"tanh": "gelu_pytorch_tanh", "none": "gelu"}  # ours -> transformers, bit-identical ops
GPT2_ACTIVATIONS_IN = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}


@dataclass(frozen=True)
class WeightNames:
    """How our module names map onto one transformers architecture; export and import both read it."""

    top: dict[str, str]  # modules outside the blocks: ours -> theirs
    block_prefix: str  # theirs, for block i (ours is "blocks.{i}.")
    block: dict[str, str]  # modules inside each block: ours -> theirs
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)  # theirs -> ours, concatenated on dim 0
    conv1d: bool = False  # their linear weights inside blocks are stored (in, out): transposed from ours


WEIGHT_NAMES = {
    "gpt2": WeightNames(
        top={"wte": "transformer.wte", "wpe": "transformer.wpe", "norm": "transformer.ln_f", "lm_head": "lm_head"},
        block_prefix="transformer.h.{i}.",
        block={"norm1": "ln_1", "norm2": "ln_2", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc",
               "mlp.proj": "mlp.c_proj"},
        fused={"attn.c_attn": ("attn.q_proj", "attn.k_proj", "attn.v_proj")},
        conv1d=True,
    ),
    "llama": WeightNames(  # our rotate-half rotary layout is transformers' too: q/k need no permutation
        top={"wte": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"},
        block_prefix="model.layers.{i}.",
        block={"norm1": "input_layernorm", "norm2": "post_attention_layernorm", "attn.q_proj": "self_attn.q_proj",
               "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj", "attn.proj": "self_attn.o_proj",
               "mlp.gate": "mlp.gate_proj", "mlp.fc": "mlp.up_proj", "mlp.proj": "mlp.down_proj"},
    ),
}


def _require_transformers():
    return require_extra("transformers", "hf", "Hugging Face export and import")


# --- architecture mapping -------------------------------------------------------------------------------


def hf_family(config: GPTConfig) -> str:
    """'gpt2' or 'llama': the transformers architecture that represents `config` exactly, else ValueError."""
    if config.positions == "learned":
        family, problems = "gpt2", []
        if config.norm != "layernorm":
            problems.append(f"learned positions with {config.norm} cannot be represented (GPT-2 uses layernorm)")
        if config.mlp != "gelu":
            problems.append(f"learned positions with {config.mlp} cannot be represented (GPT-2 uses gelu)")
        if not config.bias:
            problems.append("learned positions with bias=false cannot be represented (GPT-2 has biases)")
        if config.kv_heads != config.n_head:
            problems.append(f"learned positions with n_kv_head={config.n_kv_head} cannot be represented "
                            f"(GPT-2 has no grouped-query attention)")
    else:
        family, problems = "llama", []
        if config.norm != "rmsnorm":
            problems.append(f"rope with {config.norm} cannot be represented (Llama uses rmsnorm)")
        if config.mlp != "swiglu":
            problems.append(f"rope with {config.mlp} cannot be represented (Llama uses swiglu)")
    if problems:
        raise ValueError(
            "; ".join(problems) + ". Exportable recipes: GPT-2 (positions=learned, norm=layernorm, mlp=gelu, "
            "bias=true, n_kv_head=null) or Llama (positions=rope, norm=rmsnorm, mlp=swiglu)"
        )
    return family


def hf_config(config: GPTConfig, eos_token_id: int | None = None):
    """The transformers config (GPT2Config or LlamaConfig) equivalent to `config`."""
    transformers = _require_transformers()
    family = hf_family(config)
    common = dict(vocab_size=config.vocab_size, tie_word_embeddings=config.tie_embeddings,
                  bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=None)
    if family == "gpt2":
        return transformers.GPT2Config(
            n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
            n_inner=config.hidden_dim, activation_function=GPT2_ACTIVATIONS[config.gelu_approximate],
            resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
            layer_norm_epsilon=config.norm_eps, architectures=["GPT2LMHeadModel"], **common,
        )
    return transformers.LlamaConfig(
        hidden_size=config.n_embd, intermediate_size=config.hidden_dim, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, num_key_value_heads=config.kv_heads, head_dim=config.head_dim,
        hidden_act="silu", max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_base)},
        attention_bias=config.bias, mlp_bias=config.bias, attention_dropout=config.dropout,
        architectures=["LlamaForCausalLM"], **common,
    )


def config_from_hf(hf) -> GPTConfig:
    """Our GPTConfig for a transformers GPT2Config or LlamaConfig (ValueError for anything else)."""
    model_type = getattr(hf, "model_type", None)
    if model_type == "gpt2":
        act = GPT2_ACTIVATIONS_IN.get(hf.activation_function)
        problems = []
        if act is None:
            problems.append(f"activation_function={hf.activation_function!r} (supported: {sorted(GPT2_ACTIVATIONS_IN)})")
        if not hf.scale_attn_weights or hf.scale_attn_by_inverse_layer_idx:
            problems.append("non-standard attention scaling")
        if problems:
            raise ValueError(f"cannot import this GPT-2 variant: {'; '.join(problems)}")
        return GPTConfig(
            vocab_size=hf.vocab_size, block_size=hf.n_positions, n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd,
            bias=True, positions="learned", norm="layernorm", norm_eps=hf.layer_norm_epsilon, mlp="gelu",
            mlp_hidden=hf.n_inner or 4 * hf.n_embd, gelu_approximate=act, tie_embeddings=bool(hf.tie_word_embeddings),
        )
    if model_type == "llama":
        rope = getattr(hf, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        problems = []
        if hf.hidden_act != "silu":
            problems.append(f"hidden_act={hf.hidden_act!r} (need 'silu')")
        if rope_type != "default":
            problems.append(f"rope_type={rope_type!r} (need 'default')")
        if head_dim * hf.num_attention_heads != hf.hidden_size:
            problems.append(f"head_dim={head_dim} != hidden_size / num_attention_heads")
        if bool(getattr(hf, "attention_bias", False)) != bool(getattr(hf, "mlp_bias", False)):
            problems.append("attention_bias and mlp_bias differ")
        if problems:
            raise ValueError(f"cannot import this Llama variant: {'; '.join(problems)}")
        return GPTConfig(
            vocab_size=hf.vocab_size, block_size=hf.max_position_embeddings, n_layer=hf.num_hidden_layers,
            n_head=hf.num_attention_heads, n_embd=hf.hidden_size, n_kv_head=hf.num_key_value_heads,
            bias=bool(getattr(hf, "attention_bias", False)), positions="rope", rope_base=float(theta), norm="rmsnorm",
            norm_eps=hf.rms_norm_eps, mlp="swiglu", mlp_hidden=hf.intermediate_size,
            tie_embeddings=bool(hf.tie_word_embeddings),
        )
    raise ValueError(f"cannot import model_type {model_type!r}: only 'gpt2' and 'llama' directories are supported")


# --- weights ---------------------------------------------------------------------------------------------


def weight_pairs(names: WeightNames, n_layer: int) -> Iterator[tuple[str, str, bool]]:
    """(our tensor name, theirs, in Conv1D layout?) for every weight and bias the table maps one to one."""
    modules = [(ours, theirs, False) for ours, theirs in names.top.items()]
    for i in range(n_layer):
        prefix = names.block_prefix.format(i=i)
        modules += [(f"blocks.{i}.{ours}", prefix + theirs, names.conv1d) for ours, theirs in names.block.items()]
    for ours, theirs, conv1d in modules:
        yield f"{ours}.weight", f"{theirs}.weight", conv1d
        yield f"{ours}.bias", f"{theirs}.bias", False


def fused_groups(names: WeightNames, n_layer: int) -> Iterator[tuple[str, list[str]]]:
    """(their fused tensor name, our tensor names it concatenates) for each weight and bias of each block."""
    for i in range(n_layer):
        for theirs, ours in names.fused.items():
            for kind in ("weight", "bias"):
                yield f"{names.block_prefix.format(i=i)}{theirs}.{kind}", [f"blocks.{i}.{o}.{kind}" for o in ours]


def conv1d_layout(tensor: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """A linear weight transposed between (out, in) and Conv1D's (in, out), when `conv1d`; vectors as they are.
    The transpose is its own inverse, so export and import both call this."""
    return tensor.t() if conv1d and tensor.ndim == 2 else tensor


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under transformers names and layouts (tied lm_head left out, as transformers saves it)."""
    cfg = model.config
    names = WEIGHT_NAMES[hf_family(cfg)]
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        del sd["lm_head.weight"]
    out = {theirs: conv1d_layout(sd[ours], conv1d)
           for ours, theirs, conv1d in weight_pairs(names, cfg.n_layer) if ours in sd}
    for theirs, ours in fused_groups(names, cfg.n_layer):
        if ours[0] in sd:
            out[theirs] = conv1d_layout(torch.cat([sd[o] for o in ours], 0), names.conv1d)
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict from transformers weights (GPT-2 keys with or without the `transformer.` prefix)."""
    family = hf_family(config)
    names = WEIGHT_NAMES[family]
    if family == "gpt2":  # GPT2Model (no LM head) saves its keys without the prefix
        state = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in state.items()}
    out = {ours: conv1d_layout(state[theirs], conv1d)
           for ours, theirs, conv1d in weight_pairs(names, config.n_layer) if theirs in state}
    for theirs, ours in fused_groups(names, config.n_layer):
        if theirs in state:
            out.update(zip(ours, conv1d_layout(state[theirs], names.conv1d).chunk(len(ours), 0)))
    if config.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def read_hf_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers directory's safetensors file(s); pickled .bin weights are refused."""
    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_safetensors(path / shard))
        return state
    if any(path.glob("*.bin")):
        raise ValueError(f"{path} holds only pickled .bin weights, which are never loaded here: convert them to "
                         f"safetensors first (model.save_pretrained(dir, safe_serialization=True))")
    raise FileNotFoundError(f"{path} has no model.safetensors: pass a transformers model directory")


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; a truncated or foreign file is a one-line ValueError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except SafetensorError as err:
        raise ValueError(f"{file} is truncated or not a safetensors file ({err}): export or download it again") from None


def read_hf_config(path: str | Path):
    """The transformers config of a local directory (offline)."""
    transformers = _require_transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a transformers model directory (no config.json): pass a folder "
                                "written by `python -m project export`, or copy its config.json back")
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({err}): export or download it again") from None
    return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)


def weight_defining_values(config: GPTConfig) -> dict:
    """The architecture values two configs must share for one's weights to load into the other: every
    architecture field with defaults resolved, except block_size (a shorter context may load a longer one's
    weights) and the options the recipe does not use (rope_base without rope, gelu_approximate without gelu)."""
    values = {name: getattr(config, name) for name in architecture_fields() if name != "block_size"}
    values.update(n_kv_head=config.kv_heads, mlp_hidden=config.hidden_dim)
    if config.positions != "rope":
        del values["rope_base"]
    if config.mlp != "gelu":
        del values["gelu_approximate"]
    return values


def check_hf_config(path: str | Path, ours: GPTConfig) -> GPTConfig:
    """The GPTConfig of a local transformers directory (its config.json only), or a ValueError naming what differs
    from `ours` when its weights cannot load into a model of `ours`. block_size may be shorter than the
    directory's with learned positions (the first block_size position embeddings are kept); rotary positions
    have no weights."""
    theirs = config_from_hf(read_hf_config(path))
    mine, other = weight_defining_values(ours), weight_defining_values(theirs)
    diffs = [f"{name}={mine.get(name)!r} (HF: {other.get(name)!r})" for name in mine | other
             if mine.get(name) != other.get(name)]
    if ours.positions == theirs.positions == "learned" and ours.block_size > theirs.block_size:
        diffs.append(f"block_size={ours.block_size} (HF has only {theirs.block_size} positions)")
    if diffs:
        summary = ", ".join(f"{k}={v}" for k, v in theirs.to_dict().items() if k not in ("dropout",))
        raise ValueError(f"init_from {path} does not match the model config: {'; '.join(diffs)}. "
                         f"The HF model is: {summary}")
    return theirs


def hf_weights(path: str | Path, ours: GPTConfig) -> dict[str, torch.Tensor]:
    """Every weight of a model of `ours` (by GPT parameter name, a tied head once) from a local transformers
    directory whose architecture matches (`check_hf_config`)."""
    theirs = check_hf_config(path, ours)
    state = from_hf_state_dict(read_hf_weights(path), theirs)
    if "wpe.weight" in state:
        state["wpe.weight"] = state["wpe.weight"][: ours.block_size]
    if ours.tie_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):  # names only
        expected = {name for name, _ in GPT(ours).named_parameters()}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"weights in {path} do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return state


def load_hf_weights(model: GPT, path: str | Path) -> None:
    """Copy the weights of a local transformers GPT-2/Llama directory into `model`, whose architecture must match."""
    model.load_state_dict(hf_weights(path, model.config), strict=False)  # strict=False: a tied lm_head.weight


def gpt_from_hf(path: str | Path) -> GPT:
    """A GPT with the architecture and weights of a local transformers GPT-2 or Llama directory (eval mode)."""
    model = GPT(config_from_hf(read_hf_config(path)))
    load_hf_weights(model, path)
    return model.eval()


def read_hf_directory(path: Path) -> tuple[GPT, Tokenizer]:
    """The model (eval mode, on the CPU) and tokenizer of a transformers directory: the tokenizer from its
    tokenizer.json alone (characters or a byte-level BPE, as `export` writes them; no tiktoken cache needed)."""
    model = gpt_from_hf(path)
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{tok_file} is missing: pass a directory written by `python -m project export`")
    tokenizer = tokenizer_from_hf_file(tok_file)
    if not tokenizer.fits_model(model.config.vocab_size):
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model {model.config.vocab_size}")
    return model, tokenizer


def read_prompt_template(path: Path) -> PromptTemplate | None:
    """The prompt template an export of an instruction-tuned model holds (prompt_template.json), else None."""
    file = path / TEMPLATE_FILE
    if not file.is_file():
        return None
    try:
        return prompt_template(json.loads(file.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        raise ValueError(f"{file} is not a prompt template of this project ({err}): export the model again") from None


# --- tokenizers ------------------------------------------------------------------------------------------


def hf_tokenizer(tokenizer: Tokenizer, model_max_length: int | None = None):
    """A transformers fast tokenizer encoding text to the same ids as `tokenizer` (its `hf_backend`)."""
    transformers = _require_transformers()
    special = {}
    if tokenizer.eot_text is not None:  # GPT-2's one end-of-text token serves as all three
        special = {"bos_token": tokenizer.eot_text, "eos_token": tokenizer.eot_text, "unk_token": tokenizer.eot_text}
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf_backend(),
                                                clean_up_tokenization_spaces=False, **special, **extra)


# --- export ----------------------------------------------------------------------------------------------


def to_hf_model(model: GPT, eos_token_id: int | None = None):
    """A transformers model (eval, float32 on CPU) holding exactly `model`'s weights."""
    transformers = _require_transformers()
    config = hf_config(model.config, eos_token_id)
    cls = getattr(transformers, hf_architecture(model.config))
    hf = cls(config)
    state = {k: v.to("cpu", torch.float32) for k, v in to_hf_state_dict(model).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"export mapping incomplete (missing {missing[:3]}, unexpected {unexpected[:3]})")
    hf.generation_config = transformers.GenerationConfig(bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                                                         pad_token_id=eos_token_id)
    return hf.eval()


@torch.no_grad()
def check_parity(model: GPT, hf_model, tokens: int = 8, atol: float = 1e-4) -> float:
    """Max |logit difference| between `model` and `hf_model` on random ids; RuntimeError above `atol`."""
    T = min(tokens, model.config.block_size)
    idx = torch.randint(model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    ours = model.eval()(idx.to(next(model.parameters()).device)).float().cpu()
    model.train(was_training)
    diff = (hf_model(idx).logits.float() - ours).abs().max().item()
    if diff > atol:
        raise RuntimeError(f"exported model disagrees with the original (max logit difference {diff:.2e})")
    return diff


def _patch_json(path: Path, **values) -> None:
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def check_export_target(out: str | Path, overwrite: bool) -> Path:
    """`out` as a Path, checked to be a directory to write into: absent, empty, or `overwrite` allowed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file: pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} is not empty: pass --overwrite true to replace its contents")
    return out


def hf_architecture(config: GPTConfig) -> str:
    """The transformers model class an export of `config` uses: GPT2LMHeadModel or LlamaForCausalLM."""
    return "GPT2LMHeadModel" if hf_family(config) == "gpt2" else "LlamaForCausalLM"


def export_hf(model: GPT, tokenizer: Tokenizer, out: str | Path, *, overwrite: bool = False,
              template: PromptTemplate | None = None) -> Path:
    """Write `model` and `tokenizer` as a transformers directory: config.json, model.safetensors,
    generation_config.json and tokenizer files. An existing non-empty `out` needs `overwrite`.

    An instruction-tuned model's `template` becomes the tokenizer's `chat_template` (in tokenizer_config.json, so
    `tokenizer.apply_chat_template` prompts it as it was trained), and its fields prompt_template.json."""
    out = check_export_target(out, overwrite)
    hf_family(model.config)  # refuse an unsupported architecture before any work
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
    hf_model = to_hf_model(model, tokenizer.eot_id)
    if next(model.parameters()).dtype == torch.float32:  # lower precisions would differ by rounding alone
        check_parity(model, hf_model)
    hf_tok = hf_tokenizer(tokenizer, model_max_length=model.config.block_size)
    if template is not None:
        hf_tok.chat_template = template.jinja(tokenizer.eot_text)
    # write everything to a staging folder beside `out` first (`.NAME.PID.tmp`, removed on failure and cleared as
    # stale when its process is gone), so a failure never leaves a half-written export behind
    remove_stale_temporaries(out.parent, out.name)  # what killed exports to `out` left
    staging = temporary_path(out)
    remove_path(staging)
    staging.mkdir(parents=True)
    try:
        hf_model.save_pretrained(staging, safe_serialization=True)
        hf_tok.save_pretrained(staging, save_jinja_files=False)  # the chat template inside tokenizer_config.json
        if template is not None:
            (staging / TEMPLATE_FILE).write_text(json.dumps(template.to_dict(), indent=2) + "\n", encoding="utf-8")
        if not (staging / "generation_config.json").is_file():
            hf_model.generation_config.save_pretrained(staging)
        _patch_json(staging / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")  # 4.x readers too
        if model.config.positions == "rope":  # transformers 4.x reads rope_theta, 5.x rope_parameters
            _patch_json(staging / "config.json", rope_theta=float(model.config.rope_base))
        set_default_modes(staging)  # safetensors writes its file 0600
        out.mkdir(exist_ok=True)
        for stale in ("model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                      TEMPLATE_FILE, "chat_template.jinja"):
            (out / stale).unlink(missing_ok=True)
        for stale in out.glob("model-*-of-*.safetensors"):
            stale.unlink()
        for item in staging.iterdir():  # each file replaced whole; other files in `out` are left alone
            remove_path(out / item.name)
            os.replace(item, out / item.name)
    finally:
        remove_path(staging)
    return out
