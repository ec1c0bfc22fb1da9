"""Errors every part of loomtrain raises for mistakes a user can make (no torch, no config imports)."""


class ConfigError(ValueError):
    """A user-caused configuration problem; the CLI prints it as one line and exits 2."""


def require_positive(cfg, *paths: str, allow_zero: bool = False) -> None:
    """ConfigError naming the first of ``paths`` (dotted attributes of ``cfg``, e.g. an Experiment) that is
    negative (or zero unless ``allow_zero``). Strategies check their own settings with it."""
    for path in paths:
        value = cfg
        for part in path.split("."):
            value = getattr(value, part)
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{path}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")
