"""The scheduler (project/serve/scheduler.py): requests joining and leaving a shared decoding loop get the tokens they
get alone; the queue's bound, cancelling and closing."""

from __future__ import annotations

import pytest

from conftest import LLAMA_STYLE, tiny_gpt
from project.generate import GenerationSettings
from project.serve.scheduler import Busy, Failed, Finished, Request, Scheduler, Token


@pytest.fixture(scope="module")
def model():
    return tiny_gpt(50, spread=0.3, **LLAMA_STYLE)


def tokens(handle) -> tuple[list[int], str]:
    """A request's token ids and how it ended."""
    ids, end = [], None
    for event in handle:
        if isinstance(event, Token):
            ids.append(event.id)
        else:
            end = event.reason if isinstance(event, Finished) else event.message
    return ids, end


def requests() -> list[Request]:
    """Greedy and seeded requests of different lengths; the last four slide past the 16-token context."""
    out = []
    for i in range(7):
        settings = GenerationSettings(max_new_tokens=5 + 3 * i, temperature=0 if i % 2 else 1.0, top_k=None,
                                      seed=i)
        out.append(Request([1 + i] * (1 + i), settings, eot_id=None, top_logprobs=2 if i == 3 else None,
                           slide=i >= 3))
    return out


def test_requests_decoded_together_get_what_they_get_alone(model):
    with_others = Scheduler(model, slots=4).start()
    alone = Scheduler(model, slots=4).start()
    try:
        handles = [with_others.submit(r) for r in requests()]  # 7 requests, 4 slots: three join as others leave
        together = [tokens(h) for h in handles]
        assert together == [tokens(alone.submit(r)) for r in requests()]
        assert [end for _, end in together] == ["length"] * 7
        assert [len(ids) for ids, _ in together] == [5 + 3 * i for i in range(7)]  # sliding past the context
        assert with_others.stats.rows > with_others.stats.steps  # steps were shared
    finally:
        with_others.close()
        alone.close()


def test_a_request_without_sliding_ends_at_the_context():
    scheduler = Scheduler(tiny_gpt(50), slots=1).start()
    try:
        ids, end = tokens(scheduler.submit(Request([1] * 10, GenerationSettings(max_new_tokens=20, temperature=0))))
        assert (len(ids), end) == (7, "length")  # positions 10..15 hold six, the seventh is read from the last
    finally:
        scheduler.close()


def test_the_queue_is_bounded_and_closing_fails_what_waits(model):
    scheduler = Scheduler(model, slots=2, max_waiting=1)  # not started: nothing leaves the queue
    request = Request([1, 2], GenerationSettings(max_new_tokens=3))
    handles = [scheduler.submit(request) for _ in range(3)]  # two for the free slots, one waiting
    with pytest.raises(Busy) as caught:
        scheduler.submit(request)
    assert caught.value.retry_after >= 1 and scheduler.stats.refused == 1
    scheduler.close()
    for handle in handles:
        assert [type(e) for e in handle] == [Failed]
    with pytest.raises(Busy, match="shutting down"):
        scheduler.submit(request)


def test_a_cancelled_request_frees_its_slot(model):
    scheduler = Scheduler(model, slots=1).start()
    try:
        endless = scheduler.submit(Request([1], GenerationSettings(max_new_tokens=10_000), slide=True))
        next(iter(endless))  # it has a slot and decodes
        endless.cancel()
        ids, end = tokens(scheduler.submit(Request([2], GenerationSettings(max_new_tokens=3))))
        assert (len(ids), end) == (3, "length")
        assert tokens(endless)[1] == "cancelled"
    finally:
        scheduler.close()
