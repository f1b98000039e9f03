"""The decoder (project/decoding.py): KV-cache slots at their own positions, exact rows alone and batched, moves,
the start-up check, dtypes."""

from __future__ import annotations

import pytest
import torch

from conftest import GPT2_STYLE, LLAMA_STYLE, tiny_gpt
from project.decoding import ROW_MULTIPLE, Decoder, cast_for_inference

CONFIGS = {"gpt2": GPT2_STYLE, "llama": dict(LLAMA_STYLE, n_kv_head=2)}


def model_of(kind: str):
    return tiny_gpt(50, spread=0.3, **CONFIGS[kind])


def start(decoder: Decoder, slot: int, ids: list[int]) -> torch.Tensor:
    """Prefill `ids` into `slot` and feed its greedy next token; the prefill's last logits."""
    logits = decoder.prefill(slot, torch.tensor([ids]))[0]
    decoder.tokens[slot] = logits.argmax()
    return logits


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_slots_at_their_own_positions_match_the_full_forward(kind):
    model = model_of(kind)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    decoder = Decoder(model, slots=3)
    sequences = []
    for slot, ids in enumerate(prompts):
        logits = start(decoder, slot, ids)
        sequences.append(ids + [int(logits.argmax())])
    for _ in range(6):
        greedy, logits = decoder.step(3)
        with torch.inference_mode():
            expected = torch.stack([model(torch.tensor([seq]))[0, -1] for seq in sequences])
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(greedy, logits.argmax(-1)) and torch.equal(decoder.tokens[:3], greedy)
        for seq, token in zip(sequences, greedy.tolist()):
            seq.append(token)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_sequence_gets_the_same_bits_alone_and_beside_others(kind):
    """Padded to a multiple of ROW_MULTIPLE rows, a row's logits do not depend on its slot or its neighbours."""
    model = model_of(kind)
    ids = [3, 1, 4, 1, 5]

    def run(decoder: Decoder, slot: int, busy: int, others: dict[int, list[int]]) -> list[torch.Tensor]:
        for other, other_ids in others.items():
            start(decoder, other, other_ids)
        start(decoder, slot, ids)
        return [decoder.step(busy)[1][slot].clone() for _ in range(8)]

    alone = run(Decoder(model, slots=8, row_multiple=ROW_MULTIPLE), 0, 1, {})
    beside = run(Decoder(model, slots=8, row_multiple=ROW_MULTIPLE), 5, 7,
                 {0: [9, 9], 1: [8] * 10, 2: [7], 3: [6, 5, 4], 4: [2] * 12, 6: [1, 1, 1]})
    assert all(torch.equal(a, b) for a, b in zip(alone, beside))


def test_a_moved_sequence_goes_on_as_before():
    model = model_of("gpt2")
    decoder, reference = (Decoder(model, slots=4, row_multiple=ROW_MULTIPLE) for _ in range(2))
    for d in (decoder, reference):
        start(d, 0, [1, 2])
        start(d, 3, [5, 6, 7])
        d.step(4)
    decoder.move(3, 1, length=4)  # three prompt tokens and one step
    expected = reference.step(4)[1][3]  # both steps run 4 rows: the same kernels
    assert torch.equal(decoder.step(2)[1][1], expected)


def test_prefill_checks_its_slots():
    decoder = Decoder(model_of("gpt2"), slots=2)
    with pytest.raises(ValueError, match="not all in this decoder's 0..1"):
        decoder.prefill(1, torch.zeros(2, 3, dtype=torch.long))


def test_rows_are_independent_sees_a_row_that_depends_on_its_slot():
    decoder = Decoder(model_of("gpt2"), slots=8, row_multiple=ROW_MULTIPLE)
    assert decoder.rows_are_independent()
    step = decoder.step_function

    def uneven(model, cache, tokens, positions):  # what a kernel that treats row 1 differently would do
        greedy, logits = step(model, cache, tokens, positions)
        return greedy, logits + torch.nn.functional.one_hot(torch.tensor(1), logits.size(0))[:, None] * 1e-6

    decoder.step_function = uneven
    assert not decoder.rows_are_independent()
    assert not decoder.cache.k.any() and not decoder.positions.any()  # left clean for the first request


def test_bfloat16_logits_stay_close_to_float32():
    model = tiny_gpt(50)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.inference_mode():
        expected = model(ids)[0, -1]
    decoder = Decoder(cast_for_inference(model, "bfloat16"), slots=1)
    assert decoder.cache.k.dtype == torch.bfloat16
    logits = decoder.prefill(0, ids)[0]
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - expected).abs().max() < 0.05


@pytest.mark.slow
def test_compiled_rows_are_exact_alone_and_beside_others():
    model = model_of("llama")
    decoder = Decoder(model, slots=8, compile=True, row_multiple=ROW_MULTIPLE)
    assert decoder.warm_up() > 0 and decoder.compiled_rows == {4, 8}
    assert decoder.rows_are_independent()
    start(decoder, 6, [1, 2, 3])
    for slot in range(6):
        start(decoder, slot, [slot + 1] * (slot + 2))
    beside = decoder.step(7)[1][6].clone()
    decoder.reset()
    start(decoder, 0, [1, 2, 3])
    assert torch.equal(decoder.step(1)[1][0], beside)
