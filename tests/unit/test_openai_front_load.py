"""benchmarks/openai_front_load.py's event parsing and arithmetic, without a serving system."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.harness.processes import REPO

_spec = importlib.util.spec_from_file_location("openai_front_load", REPO / "benchmarks" / "openai_front_load.py")
ofl = importlib.util.module_from_spec(_spec)
sys.modules["openai_front_load"] = ofl  # dataclasses look their module up there
_spec.loader.exec_module(ofl)


def test_events_split_across_reads() -> None:
    payloads, rest = ofl.split_events(b'data: {"a":1}\n\ndata: {"b"')
    assert payloads == [b'{"a":1}'] and rest == b'data: {"b"'
    payloads, rest = ofl.split_events(rest + b':2}\n\n: a comment\n\ndata: [DONE]\n\n')
    assert payloads == [b'{"b":2}', b"[DONE]"] and rest == b""


def test_same_router_request_on_both_sides() -> None:
    import json

    body = json.loads(ofl.completion_body("demo-llama", [5, 6, 7], 9))
    request = ofl.grpc_request([5, 6, 7], 9)
    assert body["prompt"] == list(request.prompt_token_ids.ids) and body["max_tokens"] == request.sampling.max_new_tokens
    assert body["temperature"] == request.sampling.temperature == 0 and body["ignore_eos"] and request.sampling.ignore_eos
    assert body["stream"] and body["stream_options"] == {"include_usage": True}


def test_sides_alternate_and_the_ratio_is_of_medians() -> None:
    assert [ofl.side_order(r) for r in range(3)] == [("front", "grpc"), ("grpc", "front"), ("front", "grpc")]
    runs = []
    for round_, (front, direct) in enumerate([(90.0, 100.0), (95.0, 100.0), (100.0, 50.0)]):
        for side, tok_s in (("front", front), ("grpc", direct)):
            run = ofl.Run(side=side, round=round_, wall_s=10.0, streams=4, failed=0, output_tokens=int(tok_s * 10),
                          output_tok_s=tok_s, ttft_p50_ms=1.0, tpot_p50_ms=2.0,
                          cpu_s={"openai": 0.5 if side == "front" else 0.0, "router": 1.0, "stage0": 1.0,
                                 "stage0-rank0": 2.0, "client": 9.0})
            runs.append(run)
    result = ofl.compare(runs)
    # Medians 95 and 100; a round where gRPC was disturbed (50) moves neither median.
    assert result["ratio"] == pytest.approx(0.95)
    assert result["round_ratios"] == pytest.approx([0.9, 0.95, 2.0]) and result["round_ratio_median"] == pytest.approx(0.95)
    # CPU per 1k tokens over all of a side's runs: 3 x 0.5 s over 2850 tokens; a stage's
    # processes count together, the client apart from the server.
    front = result["sides"]["front"]["cpu_s_per_1k_tokens"]
    assert front["front"] == pytest.approx(1.5 / 2850 * 1e3) and front["stages"] == pytest.approx(9.0 / 2850 * 1e3)
    assert front["server"] == pytest.approx(13.5 / 2850 * 1e3) and front["client"] == pytest.approx(27 / 2850 * 1e3)
    direct = result["sides"]["grpc"]["cpu_s_per_1k_tokens"]
    assert result["server_cpu_ratio"] == pytest.approx(direct["server"] / front["server"])
    assert direct["server"] == pytest.approx(12.0 / 2500 * 1e3)


def test_summary_of_one_run() -> None:
    timings = [ofl.RequestTiming(output_tokens=10, ttft_s=0.1, tpot_s=0.02),
               ofl.RequestTiming(output_tokens=10, ttft_s=0.3, tpot_s=0.04),
               ofl.RequestTiming(error="HTTP 429: full")]
    run = ofl.summarize("front", 0, timings, wall_s=2.0)
    assert (run.failed, run.output_tokens, run.output_tok_s, run.first_error) == (1, 20, 10.0, "HTTP 429: full")
    assert run.ttft_p50_ms == pytest.approx(300.0) and run.tpot_p50_ms == pytest.approx(40.0)
