"""Fast decoding: a model's KV cache for several sequences ("slots") and one step that moves them all a token on.

`generate` (the CLI, predict, the training samples) runs a `Decoder` with one slot per row of its batch; the server's
scheduler (project/serve/scheduler.py) runs one for the whole process, its requests joining and leaving slots
between steps. The model is not changed: a Decoder only reads its weights, so several can share one model.

A request's logits are the same, bit for bit, whether it decodes alone or beside others, in whatever slot:
- its prompt is prefilled at batch 1 (`prefill`), whatever else runs;
- a step runs the busy slots 0..n-1 padded to a multiple of ROW_MULTIPLE rows (`step`): the CPU's matrix products
  give a row the same bits whatever the other rows hold and whichever row it is, at 4, 8, 12, 16... rows, but not
  at 1-3 rows (another kernel) nor, with 2 threads, at 5-7 or 9-11 rows. That is a property of the machine's
  kernels, not a promise, so `rows_are_independent` checks it where the decoder runs.
- greedy ids are taken inside the step; sampled ids come from each request's own generator over its own row.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Literal

import torch

from project.model import GPT, KVCache

ROW_MULTIPLE = 4  # a step's row count is a multiple of this (see the module docstring)
InferenceDtype = Literal["float32", "bfloat16", "float16"]

StepFunction = Callable[[GPT, KVCache, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def cast_for_inference(model: GPT, dtype: InferenceDtype) -> GPT:
    """`model` with its weights (and so its KV caches and logits) in `dtype`, in place, for `generate` and `serve`.

    bfloat16 halves the bytes each token reads, which pays on GPUs; on a CPU, torch's one-row bfloat16 matrix
    products can be slower than float32's even with bfloat16 instructions (see benchmarks/README.md), and float16
    runs through slow fallbacks on most CPUs. Logits move from float32's by the amounts measured in
    benchmarks/README.md; sampling and log-probabilities are computed in float32 from them.
    """
    return model.to(getattr(torch, dtype))


def decode_step(model: GPT, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One new token for each of the cache's first M slots: `tokens` (M,) at `positions` (M,) -> (greedy ids (M,),
    logits (M, V)).

    Moves the slots on in place: `tokens` becomes the greedy ids (overwrite a row to sample it instead) and
    `positions` the next cell, held at the last one (block_size - 1): a sequence that fills the context must be
    prefilled again with its last block_size tokens before its next step (see `Decoder.prefill`).
    """
    logits = model(tokens[:, None], positions, last_only=True, kv_cache=cache)[:, 0]
    greedy = logits.argmax(dim=-1)
    tokens.copy_(greedy)
    positions.add_(1).clamp_(max=model.config.block_size - 1)
    return greedy, logits


@functools.cache
def compiled_decode_step(device_type: str) -> StepFunction:
    """`decode_step` under torch.compile: one graph per model and row count, whatever the positions (the cache has a
    fixed shape), with no Python between its kernels on a CPU (inductor's C++ wrapper)."""
    options = {"cpp_wrapper": True} if device_type == "cpu" else None
    return torch.compile(decode_step, fullgraph=True, dynamic=False, options=options)


class Decoder:
    """`model` ready to decode up to `slots` sequences at once: their KV cache, their last tokens and positions, and
    the step that moves every busy slot on by one token.

    The caller keeps the busy slots packed at 0..n-1 (`move` fills a gap) and each sequence's tokens (a sequence
    that fills the context is prefilled again with its last block_size tokens: `prefill`). With `compile`, steps
    run through `compiled_decode_step`, compiled for each row count on first use (`warm_up` pays that up front).
    """

    def __init__(self, model: GPT, slots: int, *, compile: bool = False, row_multiple: int = 1) -> None:
        if slots < 1:
            raise ValueError(f"a decoder needs at least one slot, got {slots}")
        self.model = model
        self.slots = slots
        self.row_multiple = row_multiple
        self.block_size = model.config.block_size
        device = model.lm_head.weight.device
        rows = self.rows_for(slots)
        # plain tensors (not inference tensors), written in place under inference mode: a compiled step sees the
        # same kind of input at every call, so it never recompiles for it
        self.cache = KVCache(model, rows)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)  # each slot's last token
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)  # where each slot's next token goes
        self.compiled = compile
        self.step_function = compiled_decode_step(device.type) if compile else decode_step
        self.compiled_rows: set[int] = set()  # row counts whose step is compiled

    def rows_for(self, count: int) -> int:
        """The rows a step over `count` busy slots computes: `count` rounded up to a multiple of `row_multiple`."""
        return -(-count // self.row_multiple) * self.row_multiple

    @torch.inference_mode()
    def prefill(self, slot: int, ids: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
        """Write the KV cache of prompts `ids` (B, T) into slots slot..slot+B-1 (positions 0..T-1) and return the
        logits of their last position (B, V), or of every position (B, T, V) with `all_logits`.

        The caller sets `tokens[slot]` to the token it samples from them. Prefilling again with a sequence's last
        block_size tokens is how a sequence goes on past the context (the window slides, as `generate` does).
        """
        B, T = ids.shape
        if slot < 0 or slot + B > self.slots:
            raise ValueError(f"slots {slot}..{slot + B - 1} are not all in this decoder's 0..{self.slots - 1}")
        positions = torch.arange(T, device=ids.device)
        logits = self.model(ids, input_pos=positions, last_only=not all_logits, kv_cache=self.cache, slot=slot)
        self.positions[slot : slot + B] = min(T, self.block_size - 1)
        return logits if all_logits else logits[:, -1]

    @torch.inference_mode()
    def step(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Move slots 0..count-1 on by one token: (greedy ids (count,), logits (count, V)); see `decode_step`."""
        rows = self.rows_for(count)
        tokens, positions = self.tokens[:rows], self.positions[:rows]
        if rows in self.compiled_rows:
            # once compiled for this row count, nothing that the guards check changes from step to step (same model,
            # cache and shapes), so only the guards that tell the compiled graphs apart are run: the rest cost
            # about as much as a layer's matrix products
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                greedy, logits = self.step_function(self.model, self.cache, tokens, positions)
        else:
            greedy, logits = self.step_function(self.model, self.cache, tokens, positions)
            if self.compiled:
                self.compiled_rows.add(rows)
        return (greedy, logits) if rows == count else (greedy[:count], logits[:count])

    @torch.inference_mode()
    def move(self, source: int, target: int, length: int) -> None:
        """Move the sequence of slot `source` (its first `length` cached positions) into slot `target`."""
        self.cache.move(source, target, length)
        self.tokens[target] = self.tokens[source]
        self.positions[target] = self.positions[source]

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Run one step at every row count the slots can need (compiling them when `compile`); the seconds it took.
        Leaves the cache zeroed."""
        start = time.perf_counter()
        for count in range(self.row_multiple, self.rows_for(self.slots) + 1, self.row_multiple):
            self.step(count)
        self.reset()
        return time.perf_counter() - start

    @torch.inference_mode()
    def reset(self) -> None:
        """Zero the cache, tokens and positions (masked cells must hold finite values: see KVCache)."""
        self.cache.k.zero_()
        self.cache.v.zero_()
        self.tokens.zero_()
        self.positions.zero_()

    @torch.inference_mode()
    def rows_are_independent(self) -> bool:
        """Whether a step gives a row the same logits whichever row it is in and whatever the row count: the property
        that makes a request's answer the same alone and beside others (see the module docstring). One step per row
        count, on the same token and cached values in every row; leaves the cache zeroed."""
        generator = torch.Generator(device=self.cache.k.device).manual_seed(0)
        first_row = self.cache.k[:, :1]
        fill = torch.randn(first_row.shape, generator=generator, device=first_row.device).to(first_row.dtype)
        reference = None
        try:
            for count in range(self.row_multiple, self.rows_for(self.slots) + 1, self.row_multiple):
                self.cache.k.copy_(fill.expand_as(self.cache.k))
                self.cache.v.copy_(fill.expand_as(self.cache.v))
                self.tokens.fill_(1)
                self.positions.fill_(self.block_size // 2)
                _, logits = self.step(count)
                reference = logits[0].clone() if reference is None else reference
                if not all(torch.equal(row, reference) for row in logits):
                    return False
            return True
        finally:
            self.reset()
