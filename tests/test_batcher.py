"""The service's adaptive batcher (``serving.service.AdaptiveBatcher``) on its own event loop: requests that
arrive together are answered by one call, up to the batch limit; an error reaches every request of its batch and
no other; a request whose client gave up is left out of the call."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nextbest.serving.service import AdaptiveBatcher


class Recorder:
    """``answer_many`` that records each call's requests and answers ``request * 10``; fails on a request 'bad'."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []

    def __call__(self, requests: list[Any]) -> list[Any]:
        self.calls.append(list(requests))
        if "bad" in requests:
            raise ValueError("a bad request in the batch")
        return [r * 10 for r in requests]


def test_requests_that_arrive_together_are_answered_by_one_call():
    answer = Recorder()

    async def main() -> list[Any]:
        batcher = AdaptiveBatcher(answer, max_batch=64)
        return await asyncio.gather(*(batcher.submit(k) for k in range(5)))

    assert asyncio.run(main()) == [0, 10, 20, 30, 40]
    assert answer.calls == [[0, 1, 2, 3, 4]]


def test_the_batch_limit_splits_a_crowd_in_arrival_order():
    answer = Recorder()

    async def main() -> list[Any]:
        batcher = AdaptiveBatcher(answer, max_batch=2)
        return await asyncio.gather(*(batcher.submit(k) for k in range(5)))

    assert asyncio.run(main()) == [0, 10, 20, 30, 40]
    assert answer.calls == [[0, 1], [2, 3], [4]]


def test_an_error_reaches_every_request_of_its_batch_and_no_later_one():
    answer = Recorder()

    async def main() -> tuple[list[Any], Any]:
        batcher = AdaptiveBatcher(answer, max_batch=64)
        first = await asyncio.gather(*(batcher.submit(r) for r in (1, "bad", 3)), return_exceptions=True)
        later = await batcher.submit(4)  # the batcher keeps working after a failed call
        return first, later

    first, later = asyncio.run(main())
    assert [type(e) for e in first] == [ValueError] * 3
    assert all(str(e) == "a bad request in the batch" for e in first)
    assert later == 40
    assert answer.calls == [[1, "bad", 3], [4]]


def test_a_request_whose_client_gave_up_is_left_out_of_the_call():
    answer = Recorder()

    async def main() -> list[Any]:
        batcher = AdaptiveBatcher(answer, max_batch=64)
        tasks = [asyncio.ensure_future(batcher.submit(k)) for k in range(3)]
        await asyncio.sleep(0)  # each task has enqueued its request; the flush has not run yet
        tasks[1].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    done = asyncio.run(main())
    assert done[0] == 0 and done[2] == 20
    assert isinstance(done[1], asyncio.CancelledError)
    assert answer.calls == [[0, 2]]


def test_a_batch_whose_clients_all_gave_up_makes_no_call():
    answer = Recorder()

    async def main() -> None:
        batcher = AdaptiveBatcher(answer, max_batch=64)
        tasks = [asyncio.ensure_future(batcher.submit(k)) for k in range(2)]
        await asyncio.sleep(0)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with pytest.raises(asyncio.CancelledError):
                await t
        await asyncio.sleep(0.01)  # the scheduled flush runs and finds nothing to answer
        assert await batcher.submit(7) == 70

    asyncio.run(main())
    assert answer.calls == [[7]]


def test_the_adaptive_batcher_answers_concurrent_requests_with_one_call():
    calls: list[list[int]] = []

    def answer_many(requests: list[int]) -> list[int]:
        calls.append(list(requests))
        return [r * 10 for r in requests]

    async def main() -> tuple[list[int], int]:
        batcher = AdaptiveBatcher(answer_many, max_batch=4)
        alone = await batcher.submit(1)
        together = await asyncio.gather(*(batcher.submit(r) for r in range(2, 8)))
        return [alone, *together], len(calls)

    answers, n_calls = asyncio.run(main())
    assert answers == [10, 20, 30, 40, 50, 60, 70]
    # One call for the lone request; the six concurrent ones in batches of at most four.
    assert calls == [[1], [2, 3, 4, 5], [6, 7]] and n_calls == 3
