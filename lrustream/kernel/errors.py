"""One root for the errors lrustream raises on purpose.

An :class:`LrustreamError` is a failure a user can act on: its message is one line meant for a human, and the
CLI prints it as ``error: <message>`` and exits with the error's :attr:`~LrustreamError.exit_code` (no
traceback). Anything else that escapes a command is a bug and keeps its traceback. Each subclass lives next to
the code that raises it (``ConfigError`` in kernel/config.py, ``StateError`` in state/store.py, ...).
"""

from __future__ import annotations


class LrustreamError(Exception):
    """A failure with a one-line, human message."""

    exit_code: int = 1
    """What the CLI exits with when this error ends a command: 2 for a usage or configuration mistake (fix the
    command line), 1 for everything else (fix the world: a broker, a file, a model version)."""


class UsageError(LrustreamError):
    """A user mistake outside the config (bad path, bad argument): exit 2."""

    exit_code = 2
