"""A decoder-only transformer (GPT) in plain PyTorch.

One config dataclass switches between the GPT-2 recipe (learned positions, LayerNorm, GELU, tied head)
and the Llama recipe (rotary positions, RMSNorm, SwiGLU, grouped-query attention). Nothing here imports
Lightning, so the model can be used from notebooks, export code and tests on its own.

Shapes: B batch, T sequence length, C = n_embd, H = n_head, Hkv = n_kv_head, D = head_dim, V = vocab.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    """Every architectural choice of the model. The defaults are the GPT-2 recipe."""

    vocab_size: int = 50257  # tokens in the vocabulary; normally linked from the data module
    block_size: int = 256  # context length: the most positions the model ever sees
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # query heads per attention layer
    n_embd: int = 384  # residual stream width; must divide evenly into n_head heads
    n_kv_head: int | None = None  # key/value heads: None = n_head (MHA), 1 = multi-query, else grouped-query
    # dropout on attention weights and residual branches (0 for short runs); a training setting, not architecture
    dropout: float = field(default=0.0, metadata={"architecture": False})
    bias: bool = True  # biases in linear layers and LayerNorm, as GPT-2; Llama uses none
    positions: Literal["learned", "rope"] = "learned"  # learned absolute embeddings or rotary (RoPE)
    rope_base: float = 10000.0  # RoPE frequency base (theta)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "gelu"
    mlp_hidden: int | None = None  # MLP width: None = 4*n_embd for GELU, ~8/3*n_embd (rounded) for SwiGLU
    gelu_approximate: Literal["none", "tanh"] = "tanh"  # GPT-2 (and its transformers port) uses tanh
    tie_embeddings: bool = True  # share the token embedding with the LM head

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):  # before any division by them
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be >= 1 (or null for the default width), got {self.mlp_hidden}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                f"choose n_embd as a multiple of n_head (e.g. {self.n_head * max(1, self.n_embd // self.n_head)})"
            )
        if self.kv_heads < 1 or self.n_head % self.kv_heads != 0:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must be >= 1 and divide n_head ({self.n_head})")
        if self.positions == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"RoPE needs an even head_dim, got n_embd/n_head = {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hidden_dim(self) -> int:
        """MLP hidden width. SwiGLU has three matrices instead of two, so 2/3 of 4*C keeps the count level."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        multiple = 64
        return multiple * math.ceil(int(2 * 4 * self.n_embd / 3) / multiple)

    def to_dict(self) -> dict:
        return asdict(self)


def architecture_fields() -> tuple[str, ...]:
    """The GPTConfig fields that define the network's function (all but training settings such as dropout)."""
    return tuple(f.name for f in fields(GPTConfig) if f.metadata.get("architecture", True))


class RMSNorm(nn.Module):
    """Root-mean-square norm (no mean subtraction, no bias), as in Llama."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # compute in float32 for stability under bf16 autocast
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_cache(config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (block_size, head_dim) for rotary embeddings, in the "rotate half" layout."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, half, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D): the same angle for element i and i + D/2
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) of x (B, H, T, D) by position-dependent angles; cos/sin are (T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class KVCache(nn.Module):
    """What decoding keeps between steps, for `slots` sequences of up to block_size tokens: the keys and values of
    every layer at past positions, and (on a CPU) the output layer's weight laid out (C, V).

    Passed to `GPT.forward` as `kv_cache`, it is not part of the model: one model can serve several caches (the
    server's scheduler owns one, a `generate` call another) and training never sees one. CPU matrix-vector kernels
    read the head's (C, V) layout about 3.7x faster than the weight's own (V, C) at GPT-2's vocabulary (measured
    in benchmarks/generate.py); the copy is made once per cache, so the weights must not change while it is used.
    """

    def __init__(self, model: GPT, slots: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        cfg, weight = model.config, model.lm_head.weight
        if slots < 1:
            raise ValueError(f"a KV cache needs at least one slot, got {slots}")
        shape = (cfg.n_layer, slots, cfg.kv_heads, cfg.block_size, cfg.head_dim)
        dtype = dtype or weight.dtype
        # zeros, not empty: masked cells are multiplied by an attention weight of exactly 0, which keeps a finite
        # value out of the result but not a NaN
        self.register_buffer("k", torch.zeros(shape, device=weight.device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=weight.device, dtype=dtype), persistent=False)
        head_t = weight.detach().t().contiguous() if weight.device.type == "cpu" else None
        self.register_buffer("head_t", head_t, persistent=False)

    @property
    def slots(self) -> int:
        return self.k.size(1)

    def write(self, layer: int, slot: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write layer `layer`'s new keys and values k, v (B, Hkv, T, D) for slots slot..slot+B-1 and return what
        they attend to.

        A single new token (T = 1) goes to each row's own position, pos (B,) (or one position for every row, (1,)),
        and the whole preallocated cache comes back: a fixed shape that a compiled step reuses at every position
        (the caller masks what lies past each row's position). T > 1 tokens go to the ascending, consecutive
        positions pos (T,) of every row, and the cache up to pos[-1] comes back.
        """
        B, T = k.size(0), k.size(2)
        if T == 1:  # decoding: no Python int from pos, so torch.compile sees one static graph
            rows = torch.arange(slot, slot + B, device=k.device)
            where = (torch.full_like(rows, layer), rows, slice(None), pos)  # (layer, row, :, pos[row]) for each row
            # one scatter into the whole cache, not into a view of it: compiled, it writes in place (into a view,
            # inductor copies the whole cache at every step)
            self.k[where] = k[:, :, 0].to(self.k.dtype)
            self.v[where] = v[:, :, 0].to(self.v.dtype)
            return self.k[layer, slot : slot + B], self.v[layer, slot : slot + B]
        start, end = int(pos[0]), int(pos[-1]) + 1
        self.k[layer, slot : slot + B, :, start:end] = k.to(self.k.dtype)  # a slice copy: ~15x cheaper on CPU
        self.v[layer, slot : slot + B, :, start:end] = v.to(self.v.dtype)  # than an index scatter
        return self.k[layer, slot : slot + B, :, :end], self.v[layer, slot : slot + B, :, :end]

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of slot `source` into slot `target` (keeps busy slots packed)."""
        self.k[:, target, :, :length] = self.k[:, source, :, :length]
        self.v[:, target, :, :length] = self.v[:, source, :, :length]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with optional grouped-query heads, RoPE and a KV cache."""

    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.layer = layer  # this layer's index in a KV cache
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        # separate projections (not one fused qkv) so tensor parallelism can shard each by heads
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def qkv_heads(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        """Project x (B, T, C) to q (B, H, T, D) and k, v (B, Hkv, T, D), rotated when RoPE is on."""
        B, T, _ = x.shape
        # view with -1 heads (not self.n_head) so tensor-parallel shards holding fewer heads still work
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        input_pos: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        slot: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_heads(x, rope)
        if input_pos is None:  # training / full forward: plain causal attention
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0, enable_gqa=q.size(1) != k.size(1)
            )
        else:  # cached decoding: attend to every cached position up to each query's own position
            if kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: pass kv_cache=KVCache(model, slots)")
            k, v = kv_cache.write(self.layer, slot, input_pos, k, v)  # (B, Hkv, T_cache, D)
            gqa = q.size(1) != k.size(1)
            k, v = k.to(q.dtype), v.to(q.dtype)
            if T == 1:  # one new token per row: explicit matmuls, as SDPA's CPU flash kernel is slow for a single query.
                # T_cache is the whole cache: positions after each row's input_pos are masked. Query heads grouped
                # per kv head: (B, Hkv, H/Hkv, D)
                qg = q.view(B, k.size(1), -1, self.head_dim)
                att = (qg @ k.transpose(-2, -1)).mul_(1.0 / math.sqrt(self.head_dim))  # (B, Hkv, H/Hkv, T_cache)
                # (B or 1, 1, 1, T_cache): each row's own position
                future = torch.arange(k.size(2), device=x.device) > input_pos.view(-1, 1, 1, 1)
                att = att.masked_fill_(future, float("-inf")).softmax(dim=-1)
                y = (att @ v).view(B, -1, 1, self.head_dim)
            elif T == k.size(2):  # prefill from position 0 (input_pos ascending): plain causal
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            else:
                mask = torch.arange(k.size(2), device=x.device)[None, :] <= input_pos[:, None]  # (T, T_cache)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, H, T, D) -> (B, T, H*D)
        return self.resid_dropout(self.proj(y))

    def attention_weights(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The softmax attention pattern (B, H, T, T) for inspection; the textbook formula, not the fast path."""
        q, k, _ = self.qkv_heads(x, rope)
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        T = x.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (GPT-2) or SwiGLU (Llama)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.hidden_dim
        self.swiglu = config.mlp == "swiglu"
        self.approximate = config.gelu_approximate
        self.fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        if self.swiglu:
            self.gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            h = F.silu(self.gate(x)) * self.fc(x)
        else:
            h = F.gelu(self.fc(x), approximate=self.approximate)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, input_pos=None, kv_cache=None, slot=0):
        x = x + self.attn(self.norm1(x), rope, input_pos, kv_cache, slot)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """The language model: token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        # the one random draw that decides the initial weights (see initial_weights), taken before anything else
        self.init_seed = int(torch.randint(2**62, (1,), device="cpu"))
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.positions == "rope":
            cos, sin = rope_cache(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False  # recompute each block in backward instead of storing its activations
        if self.wte.weight.device.type != "meta":  # on the meta device the caller materialises it (GPTModule)
            self.init_weights(self.init_seed)

    def initial_weights(self, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
        """GPT-2 initialisation, one parameter at a time: (name, full float32 CPU tensor), in named_parameters order.

        N(0, 0.02) for matrices and embeddings, the residual projections scaled by 1/sqrt(2 * n_layer) (each block
        adds two branches to the residual stream: this keeps its variance from growing with depth), norms at 1,
        biases at 0. Every value comes from one generator seeded with `seed`, whole parameter by whole parameter,
        so the weights do not depend on the device or on how the parameters are split across devices: a sharded
        model keeps its own slice of each (project/training/parallel.py) and equals the one-device model.
        """
        generator = torch.Generator().manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():  # a tied head is listed once, as wte.weight
            module = self.get_submodule(name.rpartition(".")[0])
            value = torch.empty(param.shape, dtype=torch.float32)  # the full shape, also for a sharded parameter
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                value.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                value.zero_()
            else:
                std = residual_std if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else 0.02
                value.normal_(0.0, std, generator=generator)
            yield name, value

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Set every parameter to `initial_weights(seed)` (a model of plain tensors, on any device)."""
        params = dict(self.named_parameters())
        for name, value in self.initial_weights(seed):
            params[name].copy_(value)

    def tie_weights(self) -> None:
        """Share the token embedding with the LM head again when tie_embeddings is set. Moving meta parameters
        to a device (`to_empty`) or splitting them (tensor parallelism) makes new Parameter objects for each name."""
        if self.config.tie_embeddings and self.lm_head.weight is not self.wte.weight:
            self.lm_head.weight = self.wte.weight

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the RoPE tables (buffers outside the state dict), e.g. after `to_empty` left them unset."""
        if self.config.positions == "rope":
            cos, sin = rope_cache(self.config)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, last_only: bool = False,
                kv_cache: KVCache | None = None, slot: int = 0) -> torch.Tensor:
        """Logits (B, T, V) for token ids idx (B, T).

        With `input_pos`, the KV cache `kv_cache` is read and written, in its slots slot..slot+B-1: `input_pos` (T,)
        holds the positions of the T tokens of every row; for a single token per row (T = 1) it may hold each row's
        own position instead, (B,). `last_only` computes the logits of the last position only, (B, 1, V): all that
        sampling needs.
        """
        x = self.hidden(idx, input_pos, last_only, kv_cache, slot)
        if kv_cache is not None and kv_cache.head_t is not None:
            return x @ kv_cache.head_t  # (B, T, C) @ (C, V): the same logits, read in a faster layout
        return self.lm_head(x)  # (B, T, V)

    def hidden(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, last_only: bool = False,
               kv_cache: KVCache | None = None, slot: int = 0) -> torch.Tensor:
        """The final hidden states (B, T, C), after the last norm: what the LM head (or a classifier) reads."""
        B, T = idx.shape
        if input_pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)
        else:
            # (a compiled decode step cannot read a tensor's value: its caller keeps positions in range there)
            if not torch.compiler.is_compiling() and int(input_pos.max()) >= self.config.block_size:
                raise ValueError(f"position {int(input_pos.max())} is past block_size {self.config.block_size}")
            pos = input_pos.view(-1, 1) if T == 1 else input_pos  # (B or 1, 1) per row, or (T,) for every row
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:  # (T, D) -> (1, T, D), or (B, 1, D) -> (B, 1, 1, D): broadcast over the heads of q, k (B, H, T, D)
            rope = (self.rope_cos[pos].unsqueeze(-3).to(x.dtype), self.rope_sin[pos].unsqueeze(-3).to(x.dtype))
        x = self.drop(x)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, input_pos, kv_cache, slot, use_reentrant=False)
            else:
                x = block(x, rope, input_pos, kv_cache, slot)
        if last_only:
            x = x[:, -1:]
        return self.norm(x)


    # --- inspection --------------------------------------------------------------------------------

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> torch.Tensor:
        """Attention weights of every layer and head, (n_layer, B, H, T, T), for visualisation."""
        T = idx.size(1)
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        maps = []
        for block in self.blocks:
            maps.append(block.attn.attention_weights(block.norm1(x), rope))
            x = block(x, rope)
        return torch.stack(maps)

    # --- accounting --------------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors once). `non_embedding` drops the lookup tables (wte when untied, wpe)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6 per matmul weight plus attention's 12*L*C*T."""
        T = seq_len or self.config.block_size
        cfg = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T
