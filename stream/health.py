"""What ``GET /health`` says: "ok", or "degraded" with the reason an operator needs.

A worker whose process is alive can still be useless: a micro-batch retrying against a dead broker, a produce
that hangs, or a fetcher that died while events keep arriving. Each shows up here as "degraded" (HTTP 503),
so an orchestrator's readiness probe and a human both see it, and it clears by itself once work moves again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Liveness:
    stall_after_s: float = 60.0
    progress_at: float = field(default_factory=time.monotonic)  # last finished micro-batch (or start-up)
    busy_since: float | None = None  # the work in hand: events applied since the last commit, retries included
    error: str | None = None  # the last failure of the micro-batch in hand

    def started(self, now: float | None = None) -> None:
        self.busy_since = time.monotonic() if now is None else now

    def failed(self, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {exc}"

    def finished(self, now: float | None = None) -> None:
        self.progress_at = time.monotonic() if now is None else now
        self.busy_since, self.error = None, None

    def report(self, pending: int | None, now: float | None = None) -> tuple[str, str | None]:
        """(status, reason). ``pending``: events already in the input topic and not yet applied, if known."""
        now = time.monotonic() if now is None else now
        if self.error is not None:
            return "degraded", f"micro-batch failing, retrying: {self.error}"
        if self.busy_since is not None and now - self.busy_since > self.stall_after_s:
            return "degraded", f"one micro-batch has been in progress for {now - self.busy_since:.0f} s"
        idle = now - self.progress_at
        if self.busy_since is None and pending and idle > self.stall_after_s:
            return "degraded", f"{pending} events waiting, none processed for {idle:.0f} s"
        return "ok", None
