"""The naming rules `promtool check metrics` applies to a scrape, for CI without promtool:
the text must parse, every family needs help text, snake_case names, the `_total` suffix on
counters and only on counters, base units (seconds, bytes) instead of scaled ones, and no
family name that ends in a suffix the exposition format reserves for its samples."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

_NAME = re.compile(r"^[a-z_:][a-z0-9_:]*$")
_SCALED_UNITS = ("_milliseconds", "_microseconds", "_nanoseconds", "_ms", "_us", "_kilobytes", "_megabytes",
                 "_gigabytes", "_kib", "_mib", "_gib", "_minutes", "_hours", "_days", "_percent")
_RESERVED = ("_count", "_sum", "_bucket", "_created", "_gcount", "_gsum")


def lint(text: str) -> list[str]:
    """What promtool would complain about in `text` (the Prometheus text format); [] if nothing."""
    problems: list[str] = []
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, doc = line[len("# HELP "):].partition(" ")
            helps[name] = doc
        elif line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE "):].partition(" ")
            types[name] = kind
    list(text_string_to_metric_families(text))  # raises on text that does not parse
    for name, kind in types.items():
        if not helps.get(name, "").strip():
            problems.append(f"{name}: no help text")
        if not _NAME.match(name):
            problems.append(f"{name}: not snake_case")
        if kind == "counter" and not name.endswith("_total"):
            problems.append(f"{name}: counter without the _total suffix")
        if kind != "counter" and name.endswith("_total"):
            problems.append(f"{name}: {kind} with the counter suffix _total")
        if any(name.endswith(u) or f"{u}_" in name for u in _SCALED_UNITS):
            problems.append(f"{name}: use base units (seconds, bytes)")
        if kind != "counter" and name.endswith(_RESERVED):
            problems.append(f"{name}: ends in a suffix reserved for histogram and summary samples")
    return problems

