"""Child processes for the commands that run the pipeline themselves (demo, evaluate-stream, bench stream):
start one with its log, wait until a worker answers /health, stop them all, and summarise latencies.

Children run ``python -P`` so that a folder in the working directory named like one of our packages (a
``models/`` model store, say) cannot shadow it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from lrustream.kernel.config import Config


def spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    """``python -P ARGS`` with stdout and stderr appended to ``log_path``."""
    log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen([sys.executable, "-P", *args], stdout=log_file, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def spawn_cli(args: list[str], log_path: Path) -> subprocess.Popen:
    """``lrustream ARGS`` as a child."""
    return spawn(["-m", "lrustream.cli", *args], log_path)


def wait_healthy(cfg: Config, proc: subprocess.Popen, log_path: Path, timeout_s: float = 120,
                 port: int | None = None, what: str = "worker") -> None:
    """Return when the child (the worker, or another service on ``port``) answers /health; raise with the
    log's tail if it exits or never answers."""
    url = f"http://{cfg.http.host}:{port or cfg.http.port}/health"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError(f"{what} exited:\n" + "\n".join(tail))
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{what} not healthy after {timeout_s:.0f} s (see {log_path})")


def stop(procs: Iterable[subprocess.Popen], timeout_s: float = 30) -> None:
    """SIGTERM every child (they commit and close cleanly), then wait; SIGKILL what does not end in time."""
    procs = list(procs)
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")
