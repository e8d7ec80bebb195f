"""The GIL switch interval every stageserve process sets at start (shared/switch_interval.py)."""

from __future__ import annotations

import sys

import pytest

from shared.switch_interval import DEFAULT_MS, ENV, apply_switch_interval


@pytest.fixture(autouse=True)
def _restore_interval():
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_default_is_shorter_than_cpythons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert apply_switch_interval() == DEFAULT_MS
    assert sys.getswitchinterval() == pytest.approx(DEFAULT_MS / 1e3)
    assert DEFAULT_MS < 5.0  # CPython's own default


def test_environment_overrides_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "0.25")
    assert apply_switch_interval() == 0.25
    assert sys.getswitchinterval() == pytest.approx(0.25e-3)


@pytest.mark.parametrize("raw", ["fast", "0", "-1"])
def test_a_bad_value_stops_the_process_with_the_variable_named(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(ENV, raw)
    with pytest.raises(SystemExit, match=ENV):
        apply_switch_interval()
