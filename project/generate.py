"""Sampling from a GPT: KV-cached decoding, greedy/temperature/top-k/top-p, stop conditions, streaming.

Every caller (CLI `generate`, `predict`, TensorBoard samples, the Gradio app, notebooks) goes through
`generate` (token ids in, token ids out) or `stream` (text in, text pieces out).

Context overflow: the prompt must fit the model's context (`block_size`), else ValueError. When prompt +
new tokens outgrow the context, the window slides: each further token is predicted from the most recent
`block_size` tokens, exactly as the no-cache path crops its input (so both paths agree token for token).
"""

from __future__ import annotations

import bisect
import codecs
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from project.decoding import Decoder
from project.model import GPT
from project.tokenizer import Tokenizer


class InvalidSetting(ValueError):
    """A sampling value out of range; `field` names the GenerationSettings field (the API maps it to its param)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


MAX_SEED = 2**64 - 1  # torch generators take seeds from 0 to this


@dataclass
class GenerationSettings:
    """Sampling controls shared by `generate`, `predict`, the TensorBoard samples, the app and the API.

    Checked when made: a value out of range raises InvalidSetting (a ValueError) naming the allowed range.

    Args:
        max_new_tokens: tokens to generate at most.
        temperature: 0 = greedy; below 1 sharper, above 1 flatter.
        top_k: sample among the k most likely tokens (null = all).
        top_p: sample within the smallest set of tokens with this much probability (null = all).
        seed: fixes the sampled text (null = random).
        stop: end the text at the first of these strings (not included).
        stop_at_eot: end the text at the end-of-text token, when the vocabulary has one.
    """

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_at_eot: bool = True

    def __post_init__(self) -> None:
        def whole(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not whole(self.max_new_tokens) or self.max_new_tokens < 0:
            raise InvalidSetting("max_new_tokens", f"max_new_tokens must be a whole number >= 0, got {self.max_new_tokens}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            raise InvalidSetting("temperature", f"temperature must be a number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and (not whole(self.top_k) or self.top_k < 1):
            raise InvalidSetting("top_k", f"top_k must be >= 1 (or None for no limit), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise InvalidSetting("top_p", f"top_p must be in (0, 1] (or None for no limit), got {self.top_p}")
        if self.seed is not None and (not whole(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidSetting("seed", f"seed must be a whole number from 0 to {MAX_SEED} (or None for random), "
                                 f"got {self.seed}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidSetting("stop", f"stop strings must not be empty (an empty one stops at once), got {self.stop!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but the k largest logits of each row (..., V) to -inf."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to at least p (nucleus).

    Tokens tied with the least likely kept one are kept too (as `top_k_filter` does), so the result does
    not depend on how the sort orders ties. p >= 1 keeps every token.
    """
    if p >= 1.0:  # cumulative sums may round past 1 before the last token: keep everything explicitly
        return logits
    sorted_logits = torch.sort(logits, descending=True, dim=-1).values
    probs = sorted_logits.softmax(dim=-1)
    cumulative = probs.cumsum(dim=-1)
    # probability of all strictly more likely tokens: an exclusive cumsum (monotone, exactly 0 at the top)
    mass_before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
    n_keep = (mass_before < p).sum(dim=-1, keepdim=True).clamp_(min=1)  # a prefix of the sorted tokens
    threshold = sorted_logits.gather(-1, n_keep - 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def is_greedy(settings: GenerationSettings) -> bool:
    """Whether `settings` always pick the most likely token (no randomness)."""
    return settings.temperature == 0 or settings.top_k == 1


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row from last-position logits (B, V).

    Draws from softmax(top_p_filter(top_k_filter(logits / temperature))). With top_k, only the k best
    tokens are carried on: drawing among k probabilities instead of the whole vocabulary's saves ~1.4 ms
    a token on CPU (a third of a decode step for the default model).
    """
    if temperature == 0 or top_k == 1:  # greedy: as is_greedy
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    candidates = None
    if top_k is not None and top_k < logits.size(-1):
        logits, candidates = torch.topk(logits, top_k, dim=-1)  # (B, k) best logits and their token ids
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    choice = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)  # (B, 1)
    return (choice if candidates is None else candidates.gather(-1, choice)).squeeze(-1)


def validate_prompt(idx: torch.Tensor, block_size: int) -> None:
    """Raise ValueError unless idx is a non-empty (B, T) batch of token ids that fits the context."""
    if idx.dim() != 2 or idx.size(0) == 0 or idx.size(1) == 0:
        raise ValueError(f"prompt must be a non-empty (B, T) tensor of token ids, got shape {tuple(idx.shape)}")
    if idx.size(1) > block_size:
        raise ValueError(f"prompt has {idx.size(1)} tokens but the model's context is {block_size}: shorten the prompt")


def generate_tokens(model: GPT, idx: torch.Tensor, settings: GenerationSettings, *, use_kv_cache: bool = True,
                    compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time, up to `settings.max_new_tokens`: the building block of
    `generate` and `stream` (sampling only: end-of-text and stop strings are theirs).

    Decoding runs through a `Decoder` with a slot per row (project/decoding.py): the server's path, so a prompt
    gets the same logits here as from the server. `compile` compiles its step (needs the KV cache). The prompt is
    checked when called (ValueError), before the first token is produced. Close the iterator (or exhaust it) to
    restore the model's train/eval mode.
    """
    validate_prompt(idx, model.config.block_size)
    if compile and not use_kv_cache:
        raise ValueError("compile needs the KV cache (its fixed shape is what makes one graph): keep use_kv_cache")
    return _generate_tokens(model, idx, settings, use_kv_cache, compile)


@torch.inference_mode()
def _generate_tokens(model: GPT, idx: torch.Tensor, settings: GenerationSettings, use_kv_cache: bool,
                     compile: bool) -> Iterator[torch.Tensor]:
    block_size, max_new_tokens = model.config.block_size, settings.max_new_tokens
    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(settings.seed)
    if max_new_tokens == 0:  # before eval(): nothing runs, so the caller's train/eval mode stays as it was
        return
    was_training = model.training
    model.eval()
    batch, prompt_len = idx.shape
    greedy = is_greedy(settings)
    # the sequence so far, preallocated (no per-step concatenation) but never longer than 2 * block_size past
    # the prompt: once the context is full only the last block_size tokens are read, so they move to the front
    capacity = prompt_len + min(max_new_tokens, 2 * block_size)
    seq = torch.empty(batch, capacity, dtype=idx.dtype, device=idx.device)
    seq[:, :prompt_len] = idx
    length = total = prompt_len  # tokens held in seq; tokens of the whole sequence
    try:
        decoder = Decoder(model, batch, compile=compile) if use_kv_cache else None
        for _ in range(max_new_tokens):
            stepped = False
            if decoder is None:
                logits = model(seq[:, max(0, length - block_size) : length], last_only=True)[:, -1]
            elif total == prompt_len or total > block_size:  # the prompt, or the last block_size tokens (slid)
                logits = decoder.prefill(0, seq[:, max(0, length - block_size) : length])
            else:  # one new token per row, attending to the cache
                greedy_ids, logits = decoder.step(batch)
                stepped = True
            if greedy and stepped:
                next_ids = greedy_ids  # the step has fed them back already
            else:
                next_ids = sample_next(logits, settings.temperature, settings.top_k, settings.top_p, generator)
                if decoder is not None:
                    decoder.tokens[:batch] = next_ids
            if length == capacity:  # only reached past the context: keep the last block_size tokens
                seq[:, :block_size] = seq[:, length - block_size : length].clone()
                length = block_size
            seq[:, length] = next_ids
            length, total = length + 1, total + 1
            yield next_ids
    finally:
        model.train(was_training)


def generate(model: GPT, idx: torch.Tensor, settings: GenerationSettings, *, tokenizer: Tokenizer | None = None,
             use_kv_cache: bool = True, compile: bool = False) -> torch.Tensor:
    """The prompt ids (B, T) followed by up to `settings.max_new_tokens` generated ids: (B, T + new).

    With a `tokenizer`, generation ends early once every row has produced its end-of-text token (when
    `settings.stop_at_eot`) or one of `settings.stop`; rows that finish first are padded with end-of-text (or 0),
    so the batch stays rectangular. Stop strings need the tokenizer.
    """
    if settings.stop and tokenizer is None:
        raise ValueError("stop strings need the tokenizer to decode the output")
    eot_id = tokenizer.eot_id if tokenizer is not None and settings.stop_at_eot else None
    steps = generate_tokens(model, idx, settings, use_kv_cache=use_kv_cache, compile=compile)
    pad = eot_id if eot_id is not None else 0
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    new: list[torch.Tensor] = []
    check_done = eot_id is not None or bool(settings.stop)  # else no per-step .all() sync: run to the end
    try:
        for next_ids in steps:
            if check_done:
                next_ids = next_ids.masked_fill(done, pad)
            new.append(next_ids)
            if eot_id is not None:
                done |= next_ids == eot_id
            if settings.stop:
                text_rows = [tokenizer.decode(row.tolist()) for row in torch.stack(new, dim=1)]
                done |= torch.tensor([any(s in text for s in settings.stop) for text in text_rows], device=idx.device)
            if check_done and bool(done.all()):
                break
    finally:
        steps.close()
    if not new:
        return idx
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1)


class CompletionText:
    """The text of generated tokens, fed one at a time (`add`), ended at end-of-text (when `settings.stop_at_eot`)
    and cut before the first stop string: the one place where a completion's text is made.

    Bytes are decoded incrementally, so a multi-byte character split across BPE tokens comes out whole once
    complete; text that might be the start of a stop string is held back until known. `tokens` are the ids fed
    until the text ended (the end-of-text or stop-completing one included: what `usage` counts), and
    `starts[i]` is where token i's text begins in the completion: the tokens whose text is shown are those that
    begin before its end (the end-of-text token and the tokens of a stop string are not).
    """

    def __init__(self, tokenizer: Tokenizer, settings: GenerationSettings) -> None:
        self.tokenizer, self.settings = tokenizer, settings
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.holdback = max((len(s) for s in settings.stop), default=1) - 1
        self.text = ""  # decoded so far (a stop string and what follows are cut off when found)
        self.emitted = 0  # characters of text returned by add/end so far
        self.tokens: list[int] = []
        self.starts: list[int] = []
        self.stopped = False  # an end-of-text token or a stop string ended the text

    def add(self, token: int) -> str:
        """Feed the next generated token; return the text it makes safe to show (often "", never after a stop)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        self.starts.append(len(self.text))
        if self.settings.stop_at_eot and token == self.tokenizer.eot_id:
            return self._stop(len(self.text))
        self.text += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        cut = min((self.text.find(s) for s in self.settings.stop if s in self.text), default=-1)
        if cut >= 0:  # a stop string appeared: show what precedes it, then end
            return self._stop(cut)
        return self._show(len(self.text) - self.holdback)

    def end(self) -> str:
        """No more tokens: the text still held back (and any incomplete character, as U+FFFD)."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._show(len(self.text))

    def shown_tokens(self) -> int:
        """How many of `tokens` begin in the text shown so far."""
        return bisect.bisect_left(self.starts, self.emitted)

    def _stop(self, cut: int) -> str:
        self.stopped = True
        self.text = self.text[:cut]
        return self._show(cut)

    def _show(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted : upto], upto
        return piece


def text_pieces(tokens: Iterable[int], tokenizer: Tokenizer, settings: GenerationSettings) -> Iterator[str]:
    """The text of generated `tokens`, piece by piece (see `CompletionText`)."""
    text = CompletionText(tokenizer, settings)
    for token in tokens:
        piece = text.add(token)
        if piece:
            yield piece
        if text.stopped:
            return
    piece = text.end()
    if piece:
        yield piece


def completion_text(tokens: Iterable[int], tokenizer: Tokenizer, settings: GenerationSettings) -> str:
    """The whole text of generated `tokens` (see `text_pieces`)."""
    return "".join(text_pieces(tokens, tokenizer, settings))


def encode_prompt(model: GPT, tokenizer: Tokenizer, prompt: str | list[int]) -> torch.Tensor:
    """A prompt (text, or token ids such as a chat template makes) as a (1, T) batch of ids on the model's device;
    ValueError for an empty prompt."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("prompt is empty: give at least one character")
    return torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)


def stream(model: GPT, tokenizer: Tokenizer, prompt: str | list[int], settings: GenerationSettings | None = None, *,
           use_kv_cache: bool = True, compile: bool = False) -> Iterator[str]:
    """Yield the completion of `prompt` as text, piece by piece, as tokens are sampled (see `text_pieces`).

    The prompt is checked when called, so a bad one fails before any text is printed.
    """
    settings = settings or GenerationSettings()
    steps = generate_tokens(model, encode_prompt(model, tokenizer, prompt), settings, use_kv_cache=use_kv_cache,
                            compile=compile)
    return _stream_text(steps, tokenizer, settings)


def _stream_text(steps: Iterator[torch.Tensor], tokenizer: Tokenizer, settings: GenerationSettings) -> Iterator[str]:
    try:
        yield from text_pieces((int(ids[0]) for ids in steps), tokenizer, settings)
    finally:  # however the consumer stops, free the cache and restore the model's mode now
        steps.close()


def complete_batch(model: GPT, tokenizer: Tokenizer, prompts: list[str] | list[list[int]],
                   settings: GenerationSettings) -> list[str]:
    """Completions of several prompts, texts or token ids (batched when they have the same token length), trimmed
    at stops."""
    encoded = [encode_prompt(model, tokenizer, p) for p in prompts]
    completions: dict[int, str] = {}
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(ids.size(1), []).append(i)
    for length, rows in by_length.items():
        out = generate(model, torch.cat([encoded[i] for i in rows]), settings, tokenizer=tokenizer)
        for i, row in zip(rows, out[:, length:].tolist()):
            completions[i] = completion_text(row, tokenizer, settings)
    return [completions[i] for i in range(len(prompts))]
