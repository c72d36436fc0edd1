"""Durable file writes: a crash or a power cut leaves the old file or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file (or a directory's entries) to disk, so a rename that follows survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Move a finished ``tmp`` over ``path``: a crash leaves the old file or the new one, never half of one,
    and once this returns the new one survives a power cut too."""
    fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)
