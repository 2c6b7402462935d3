"""The one error type the CLI turns into a single stderr line and exit code 2."""


class MemplanError(ValueError):
    """Bad input: unknown name, malformed config, impossible combination, bad size."""
