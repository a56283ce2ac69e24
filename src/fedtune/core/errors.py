"""Errors a user can act on: each message says what was wrong, where, and how to fix it."""


class FedtuneError(Exception):
    """Base class; the CLI prints these without a traceback."""


class ConfigError(FedtuneError):
    """A config key or value is wrong (names the key and the allowed values)."""


class DataError(FedtuneError):
    """A data file or record is wrong (names the file, line and what was expected)."""


class PartitionError(FedtuneError):
    """A partition cannot be made as asked (names the client and why)."""


class ModelLoadError(FedtuneError):
    """A model could not be loaded (says what was tried and what to use instead)."""


class RunError(FedtuneError):
    """A run cannot go on (e.g. too few clients replied); the last good checkpoint is intact."""


def untrusted_text(text: object, limit: int = 300) -> str:
    """Text a client sent (an error, a reason), fit for one log line: control characters escaped (no
    forged lines in run.log), at most ``limit`` characters."""
    s = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in str(text)[: limit + 1])
    return s if len(s) <= limit else s[:limit] + f"... ({len(str(text)):,} characters)"
