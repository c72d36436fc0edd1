"""The ``training-examples`` topic's wire format: written by the worker (stream/processor.py), read by the trainer.

One record per served user per micro-batch, keyed by the user id (UTF-8), value a JSON object
``{"user_id": "42", "items": [external item ids, the user's latest window, oldest first], "new": 3,
"live": {"v000007": [2, 1]}}``: the last ``new`` items are events the worker has just served, each of them a
next-item target (stream/README.md says what the trainer does with them). ``live`` (absent when empty) scores
those events against what was served: per model version that served the user's recommendation before an event,
how many of the events had one and how many of them were in its top-K (the live hit rate the trainer watches,
trainer/live.py). This module is the one place that writes or reads that format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from lrustream.kernel.errors import LrustreamError


class BadExample(LrustreamError, ValueError):
    """A training-examples record that is not the format above (the trainer skips it with a warning)."""


@dataclass(frozen=True, slots=True)
class TrainingExample:
    user_id: str
    items: list[str]
    """The user's latest window of external item ids, oldest first."""
    new: int
    """How many of the window's last items were applied in the batch that wrote this example."""
    live: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Per version that served the recommendation before one of the new events: (events scored, hits)."""


def encode_example(user_id: str, items: list[str], new: int,
                   live: dict[str, tuple[int, int]] | None = None) -> tuple[bytes, bytes]:
    """(key, value) of one training example."""
    body: dict = {"user_id": user_id, "items": items, "new": new}
    if live:
        body["live"] = {version: list(counts) for version, counts in live.items()}
    return user_id.encode(), json.dumps(body, separators=(",", ":")).encode()


def decode_example(value: bytes | None) -> TrainingExample:
    """The example in a record's value; :class:`BadExample` when it is not one."""
    try:
        body = json.loads(value or b"")
        live = {str(v): _counts(c) for v, c in (body.get("live") or {}).items()}
        return TrainingExample(str(body["user_id"]), [str(x) for x in body["items"]], int(body.get("new", 1)), live)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadExample(f"not a training example: {type(exc).__name__}: {exc}") from None


def _counts(value: object) -> tuple[int, int]:
    scored, hits = (int(x) for x in value)  # type: ignore[attr-defined]
    if not 0 <= hits <= scored:
        raise ValueError(f"live counts {value!r}: hits must be within [0, scored]")
    return scored, hits
