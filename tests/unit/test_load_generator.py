"""benchmarks/load_generator.py's arithmetic and baselines, without a serving system (its
run against a real one is in tests/system/test_dummy_load.py)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from shared.proto import generation_pb2 as gen
from stageserve.demo_model import write_tiny_model
from tests.harness.processes import REPO

_spec = importlib.util.spec_from_file_location("load_generator", REPO / "benchmarks" / "load_generator.py")
lg = importlib.util.module_from_spec(_spec)
sys.modules["load_generator"] = lg  # dataclasses look their module up there
_spec.loader.exec_module(lg)


def test_roofline_sums_the_stages() -> None:
    info = gen.ModelInfo(pipeline_parallel_size=2, block_size=16)
    info.stages.add(stage_index=0, first_layer=0, last_layer=3, weight_bytes=6_000, kv_block_bytes=1_600)
    info.stages.add(stage_index=1, first_layer=3, last_layer=5, weight_bytes=4_000, kv_block_bytes=3_200)
    bound = lg.roofline(info, batch=4, mean_context=10.0, bytes_per_s=1_000.0)
    # Stage 0: 6000 B of weights + 100 B/token x 4 x 10 = 10000 B -> 10 s; stage 1: 4000 + 200 x 40 -> 12 s.
    assert [s["step_s"] for s in bound["stages"]] == pytest.approx([10.0, 12.0])
    assert bound["tpot_ms"] == pytest.approx(22_000.0)
    assert bound["tok_s"] == pytest.approx(4 / 22.0)


def test_ratios_read_higher_is_better_and_skip_what_is_missing() -> None:
    report = lg.Report(concurrency=4, requests=8, failed=0, wall_s=1.0, output_tokens=100, output_tok_s=100.0,
                       ttft_p50_ms=20.0, ttft_p99_ms=40.0, tpot_p50_ms=5.0, tpot_p99_ms=10.0)
    bound = {"tok_s": 400.0, "tpot_ms": 2.5}
    hf = {"tok_s": 50.0, "tpot_ms": 20.0, "ttft_ms": 10.0}
    r = lg.ratios(report, bound, hf)
    assert r["tok_s_vs_roofline"] == pytest.approx(0.25) and r["tpot_p50_vs_roofline"] == pytest.approx(0.5)
    assert r["tok_s_vs_transformers"] == pytest.approx(2.0) and r["tpot_p99_vs_transformers"] == pytest.approx(2.0)
    assert r["ttft_p50_vs_transformers"] == pytest.approx(0.5)
    # A baseline that failed gives no transformers ratios; a NaN percentile gives None.
    report.tpot_p99_ms = float("nan")
    r = lg.ratios(report, bound, {"error": "OutOfMemoryError"})
    assert "tok_s_vs_transformers" not in r and r["tpot_p99_vs_roofline"] is None


def test_copy_bandwidth_is_measured() -> None:
    rate = lg.measure_copy_bandwidth("cpu", 8 * 2**20, repeats=3)
    assert math.isfinite(rate) and rate > 1e8  # any machine copies more than 100 MB/s


def test_transformers_baseline_makes_every_token(tmp_path: Path) -> None:
    # As the GPU suite runs it: on its own (no server), written to a file the load reads later.
    model = write_tiny_model(tmp_path / "llama", num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1,
                             intermediate_size=64)
    lg.main(["--baseline-only", "--hf-baseline", str(model), "--hf-device", "cpu", "--concurrency", "3",
             "--prompt-len", "5", "--output-len", "4", "--json", str(tmp_path / "hf.json")])
    result = json.loads((tmp_path / "hf.json").read_text())
    assert result["weights"] == "checkpoint" and result["tokens_made"] == 12
    assert result["tok_s"] == pytest.approx(12 / result["wall_s"])
    assert result["ttft_ms"] > 0 and result["tpot_ms"] > 0


def test_gpu_suite_warms_up_on_other_prompts_than_it_measures(tmp_path: Path) -> None:
    # The same prompts in both would leave the measured ones in the prefix cache: the
    # measured run would skip its prefill and report inflated tok/s.
    spec = importlib.util.spec_from_file_location("gpu_serving_suite", REPO / "benchmarks" / "gpu_serving_suite.py")
    suite = importlib.util.module_from_spec(spec)
    sys.modules["gpu_serving_suite"] = suite  # dataclasses look their module up there
    spec.loader.exec_module(suite)
    args = suite.argparse.Namespace(hbm_bytes_per_s=4.15e12, skip_baselines=True, model="unused")
    scenario = next(s for s in suite.SCENARIOS if s.name == "c256-pp2")
    warmup, measured = suite.load_commands(args, scenario, "localhost:1", tmp_path / "r.json")

    def flag(cmd: list[str], name: str) -> str:
        return cmd[cmd.index(name) + 1]

    assert flag(warmup, "--seed") != flag(measured, "--seed")
    assert flag(warmup, "--prompt-len") == flag(measured, "--prompt-len") == str(scenario.prompt_len)
    assert flag(warmup, "--concurrency") == flag(measured, "--concurrency") == str(scenario.concurrency)
    assert flag(measured, "--requests") == str(scenario.requests)
    # A baseline measured before the server started is read, never re-run beside it.
    _, with_baseline = suite.load_commands(args, scenario, "localhost:1", tmp_path / "r.json", tmp_path / "hf.json")
    assert flag(with_baseline, "--baseline-json") == str(tmp_path / "hf.json")
    assert "--hf-baseline" not in with_baseline and "--hf-baseline" not in measured


def test_suite_plot_splits_a_decode_step_into_parts_that_add_up(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("plot_suite", REPO / "benchmarks" / "plot_suite.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    profile = {"stage1_decode_device_ms": 5.0, "stage1_decode_wait_ms": 6.0, "stage1_decode_prepare_ms": 2.5,
               "stage1_decode_launch_ms": 2.0, "stage1_decode_result_ms": 23.5,
               # stage 0's figures must not be read for a two-stage layout
               "stage0_decode_device_ms": 99.0, "stage0_decode_result_ms": 99.0}
    report = {"layout": {"pp": 2}, "step_profile": profile}
    parts = plot.decode_breakdown(report)
    assert list(parts.values()) == [5.0, 1.0, 4.5, 13.0]
    assert sum(parts.values()) == 23.5
    (tmp_path / "a.json").write_text('{"x": {"v": 1}, "y": {"v": 2}}')
    (tmp_path / "b.json").write_text('{"y": {"v": 3}}')
    assert plot.load_reports([tmp_path / "a.json", tmp_path / "b.json"]) == {"x": {"v": 1}, "y": {"v": 3}}
