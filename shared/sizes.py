"""Byte sizes as operators write them (--gpu-memory 80GiB) and as logs print them."""

from __future__ import annotations

import re

from shared.config import ConfigError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str) -> int:
    """'80GiB' -> 85899345920. KB/MB/GB/TB are powers of 1000; K/M/G/T and KiB.. of 1024."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ConfigError(
            f"cannot read {text!r} as a size; write a number with an optional unit, e.g. 80GiB, "
            "500MB, 4G (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, K, M, G, T)"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def format_size(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"
