"""The house rules, checked on every run: the import layers, and one produce loop."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("lrustream", "models", "state", "stream", "trainer", "tests")


def test_import_linter_contracts_hold() -> None:
    """pyproject.toml's contracts: each layer imports only from the layers below it, and no package's modules
    import each other in a cycle (function-local imports included)."""
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_only_the_kafka_helper_retries_a_full_producer_queue() -> None:
    """``BufferError`` (librdkafka's queue is full) is handled in one place: lrustream/kernel/kafka.py's
    ``produce``. Every other module hands records to it."""
    handler = re.compile(r"except\s*\(?[^:\n]*\bBufferError\b")
    handlers = [str(path.relative_to(REPO)) for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
                if path != Path(__file__).resolve() and handler.search(path.read_text())]
    assert handlers == ["lrustream/kernel/kafka.py"]
