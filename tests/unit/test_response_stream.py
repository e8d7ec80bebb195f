"""router/response_stream.py: the engine thread's responses reach each stream in order, in few
event-loop wake-ups, and a lagging stream's queued tokens go out as one message."""

from __future__ import annotations

import asyncio
import threading

from router.engine_events import EngineUnavailable
from router.response_stream import ResponseOutbox, coalesce, drain
from shared.proto import generation_pb2 as gen


def _token(token_id: int, text: str, logprob: float | None = None) -> gen.GenerateResponse:
    response = gen.GenerateResponse(token_ids=[token_id], text=text, request_id="r")
    if logprob is not None:
        response.logprobs.add(token_id=token_id, logprob=logprob)
    return response


def test_coalesce_merges_each_run_of_token_responses_in_order() -> None:
    final = gen.GenerateResponse(token_ids=[9], text="!", finish_reason=gen.FINISH_REASON_LENGTH)
    items = [_token(1, "a", -0.1), _token(2, "b", -0.2), _token(3, "c", -0.3), final, None]
    out = list(coalesce(items))
    assert len(out) == 3 and out[1] is final and out[2] is None
    merged = out[0]
    assert list(merged.token_ids) == [1, 2, 3] and merged.text == "abc" and merged.request_id == "r"
    assert [(lp.token_id, round(lp.logprob, 3)) for lp in merged.logprobs] == [(1, -0.1), (2, -0.2), (3, -0.3)]
    assert not merged.finish_reason


def test_coalesce_keeps_an_end_between_runs_and_passes_singles_through() -> None:
    failure = EngineUnavailable("stage 1 failed")
    single = _token(4, "d")
    out = list(coalesce([_token(1, "a"), failure, single]))
    assert [type(o) for o in out] == [gen.GenerateResponse, EngineUnavailable, gen.GenerateResponse]
    assert out[1] is failure and out[2] is single and list(out[0].token_ids) == [1]
    assert list(coalesce([])) == []


def test_outbox_delivers_a_burst_in_order_with_one_wake_up() -> None:
    async def main() -> tuple[list, list, int]:
        loop = asyncio.get_running_loop()
        outbox = ResponseOutbox(loop)
        wake_ups = 0
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counting(*args):
            nonlocal wake_ups
            wake_ups += 1
            return call_soon_threadsafe(*args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        a: asyncio.Queue = asyncio.Queue()
        b: asyncio.Queue = asyncio.Queue()

        def engine_step() -> None:  # what the engine thread does for one step's results
            for i in range(100):
                outbox.put(a if i % 2 == 0 else b, _token(i, str(i)))
            outbox.put(a, None)

        thread = threading.Thread(target=engine_step)
        thread.start()
        thread.join()  # the whole burst is queued before the loop runs again
        first_a = await a.get()
        got_a = drain(a, first_a)
        got_b = drain(b, await b.get())
        return got_a, got_b, wake_ups

    got_a, got_b, wake_ups = asyncio.run(main())
    assert wake_ups == 1
    assert [r.token_ids[0] for r in got_a[:-1]] == list(range(0, 100, 2)) and got_a[-1] is None
    assert [r.token_ids[0] for r in got_b] == list(range(1, 100, 2))


def test_outbox_after_the_loop_closed_drops_quietly() -> None:
    loop = asyncio.new_event_loop()
    outbox = ResponseOutbox(loop)
    loop.close()
    outbox.put(asyncio.Queue(), None)  # the router is shutting down: no one reads; no exception
