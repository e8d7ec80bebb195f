"""Splitting decoder layers over pipeline stages."""

from __future__ import annotations

from shared.config import ConfigError


def parse_layer_partition(text: str) -> tuple[int, ...]:
    """'10,12,10' -> (10, 12, 10)."""
    try:
        parts = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"--layer-partition must be comma-separated integers, got {text!r}") from None
    if not parts:
        raise ConfigError("--layer-partition is empty")
    return parts


def even_layer_partition(num_layers: int, num_stages: int) -> tuple[int, ...]:
    """Equal layer counts; the remainder goes to the middle stages first, since the first
    stage also holds the embedding and the last one the norm and lm_head."""
    if num_stages > num_layers:
        raise ConfigError(
            f"{num_stages} pipeline stages need at least {num_stages} layers; the model has "
            f"{num_layers}"
        )
    base, extra = divmod(num_layers, num_stages)
    counts = [base] * num_stages
    # Middle stages in order, then the first and the last.
    order = list(range(1, num_stages - 1)) + [0, num_stages - 1]
    for stage in order[:extra]:
        counts[stage] += 1
    return tuple(counts)


def resolve_layer_partition(
    num_layers: int, num_stages: int, explicit: tuple[int, ...] | None
) -> tuple[int, ...]:
    if explicit is None:
        return even_layer_partition(num_layers, num_stages)
    if len(explicit) != num_stages or sum(explicit) != num_layers:
        raise ConfigError(
            f"layer partition {list(explicit)} must have {num_stages} entries summing to the "
            f"model's {num_layers} layers"
        )
    return explicit


def format_partition(partition: tuple[int, ...]) -> str:
    """The --layer-partition spelling: '9,10,11'."""
    return ",".join(str(n) for n in partition)
