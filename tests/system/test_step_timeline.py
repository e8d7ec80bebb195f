"""The step timeline (STAGESERVE_TIMELINE_DIR) of a real pipeline: every process writes its
rows, the steps the router sent reach both stages' ranks in its records, and the merge
script turns the files into one trace and a per-hop summary.

On CPU there is no device row; `tests/gpu/test_gpu_*` hosts can look at one with
`benchmarks/merge_timeline.py`.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shared.step_timeline import TIMELINE_DIR_ENV, StepTimeline, open_timeline
from stageserve.demo_model import write_tiny_model
from tests.harness.processes import REPO, ServingSystem

_spec = importlib.util.spec_from_file_location("merge_timeline", REPO / "benchmarks" / "merge_timeline.py")
merge = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(merge)


def test_unset_means_no_timeline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TIMELINE_DIR_ENV, raising=False)
    assert open_timeline("router") is None


def test_an_unwritable_directory_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(TIMELINE_DIR_ENV, str(tmp_path / "file" / "below"))
    with pytest.raises(RuntimeError, match="cannot write the step timeline there"):
        open_timeline("unwritable-test")


def test_events_are_chrome_trace_lines(tmp_path: Path) -> None:
    timeline = StepTimeline(tmp_path, "router")
    timeline.span("engine", "responses", 1_000_000, 3_500_000, step=7)
    timeline.instant("engine", "send", 2_000_000, step=8)
    timeline.close()
    (path,) = tmp_path.glob("router-*.jsonl")
    events = [json.loads(line) for line in path.read_text().splitlines()]
    names = {(e["ph"], e["name"]) for e in events}
    assert {("M", "process_name"), ("M", "thread_name"), ("X", "responses"), ("i", "send")} <= names
    span = next(e for e in events if e["name"] == "responses")
    assert (span["ts"], span["dur"], span["args"]) == (1000.0, 2500.0, {"step": 7})


def test_a_pipeline_writes_one_timeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = write_tiny_model(tmp_path / "model", "LlamaForCausalLM", seed=3)
    directory = tmp_path / "timeline"
    monkeypatch.setenv(TIMELINE_DIR_ENV, str(directory))  # `up` and every process it starts inherit it
    system = ServingSystem(model, 2, 1)
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(
                lambda n: system.client.generate([0] + list(range(3, 3 + n)), max_new_tokens=8, ignore_eos=True),
                (4, 9, 17, 30),
            ))
        assert all(len(r.token_ids) == 8 for r in results)
    finally:
        assert system.stop() == 0, system.log()
    files = {p.name.rsplit("-", 1)[0] for p in directory.glob("*.jsonl")}
    assert files == {"router", "stage0", "stage1", "stage0-rank0", "stage1-rank0"}, files

    events = merge.read_events(directory)
    processes, _ = merge.names(events)

    def steps(process: str, name: str) -> set[int]:
        return {e["args"]["step"] for e in events
                if processes.get(e["pid"]) == process and e["name"] == name and "step" in e.get("args", {})}

    sent = steps("router", "send")
    assert len(sent) >= 8
    for stage in ("stage0", "stage1"):
        assert steps(stage, "step in") == sent
        assert steps(f"{stage}-rank0", "prepare") == sent
        assert steps(f"{stage}-rank0", "wait") == sent
    assert steps("router", "stage 1") == sent  # every step's result came back from the last stage
    assert all(e.get("dur", 0.0) >= 0 for e in events)

    out = tmp_path / "trace.json"
    printed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "merge_timeline.py"), str(directory),
                              "--out", str(out)], capture_output=True, text=True, check=True).stdout
    assert len(json.loads(out.read_text())["traceEvents"]) == len(events)
    summary = merge.summarize(events)
    for stage in ("stage0", "stage1"):
        send_to_result = summary[f"{stage}: router send -> result at the router"]
        hops = (summary[f"{stage}: router send -> step in"], summary[f"{stage}: step in -> rank 0 starts it"])
        assert all(h >= 0 for h in hops) and sum(hops) <= send_to_result
        assert f"| {stage}: router send -> step in |" in printed
