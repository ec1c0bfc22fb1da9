"""Errors every part of loomtrain raises for mistakes a user can make (no torch, no config imports)."""


class ConfigError(ValueError):
    """A user-caused configuration problem; the CLI prints it as one line and exits 2."""
