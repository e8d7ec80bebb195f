"""The CPython settings every stageserve process applies at start (shared/interpreter.py)."""

from __future__ import annotations

import gc
import sys

import pytest

from shared.interpreter import (
    DEFAULT_SWITCH_INTERVAL_MS,
    GC_THRESHOLDS,
    SWITCH_INTERVAL_ENV,
    apply_interpreter_settings,
    freeze_startup_objects,
)


@pytest.fixture(autouse=True)
def _restore_interpreter():
    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    yield
    sys.setswitchinterval(interval)
    gc.set_threshold(*thresholds)
    gc.unfreeze()


def test_defaults_are_shorter_switches_and_rarer_collections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SWITCH_INTERVAL_ENV, raising=False)
    assert apply_interpreter_settings() == DEFAULT_SWITCH_INTERVAL_MS
    assert sys.getswitchinterval() == pytest.approx(DEFAULT_SWITCH_INTERVAL_MS / 1e3)
    assert DEFAULT_SWITCH_INTERVAL_MS < 5.0  # CPython's own default
    assert gc.get_threshold() == GC_THRESHOLDS


def test_environment_overrides_the_switch_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SWITCH_INTERVAL_ENV, "0.25")
    assert apply_interpreter_settings() == 0.25
    assert sys.getswitchinterval() == pytest.approx(0.25e-3)


@pytest.mark.parametrize("raw", ["fast", "0", "-1"])
def test_a_bad_value_stops_the_process_with_the_variable_named(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(SWITCH_INTERVAL_ENV, raw)
    with pytest.raises(SystemExit, match=SWITCH_INTERVAL_ENV):
        apply_interpreter_settings()


def test_freezing_keeps_what_exists_out_of_collections() -> None:
    kept = [[i] for i in range(1000)]
    freeze_startup_objects()
    assert gc.get_freeze_count() >= len(kept)
