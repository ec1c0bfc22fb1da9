"""How many decoder layers each pipeline stage holds (no torch: config validation uses it)."""
from __future__ import annotations

from loomtrain.errors import ConfigError


def pipeline_stage_layers(n_layers: int, stages: int, split: str) -> list[int]:
    """Layers per pipeline stage: the explicit ``parallel.pp_split``, or as even as possible with the extra
    layers on middle stages first (the first stage also embeds, the last computes the output and loss)."""
    if split and split != "auto":  # auto: by the stages' fabrics when ranks are placed (launch/placement.py)
        try:
            counts = [int(x) for x in split.split(",")]
        except ValueError:
            raise ConfigError(f"parallel.pp_split: expected comma-separated layer counts, got {split!r}") from None
        if len(counts) != stages or any(c < 1 for c in counts) or sum(counts) != n_layers:
            raise ConfigError(f"parallel.pp_split: needs {stages} positive counts summing to model.n_layers "
                              f"({n_layers}), got {split!r}")
        return counts
    base, extra = divmod(n_layers, stages)
    counts = [base] * stages
    for i in (list(range(1, stages - 1)) + [0, stages - 1])[:extra]:
        counts[i] += 1
    return counts
