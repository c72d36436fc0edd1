"""The ``training-examples`` topic's wire format: written by the worker (stream/processor.py), read by the trainer.

One record per served user per micro-batch, keyed by the user id (UTF-8), value a JSON object
``{"user_id": "42", "items": [external item ids, the user's latest window, oldest first], "new": 3}``: the last
``new`` items are events the worker has just served, each of them a next-item target (stream/README.md says
what the trainer does with them). This module is the one place that writes or reads that format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

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


def encode_example(user_id: str, items: list[str], new: int) -> tuple[bytes, bytes]:
    """(key, value) of one training example."""
    body = {"user_id": user_id, "items": items, "new": new}
    return user_id.encode(), json.dumps(body, separators=(",", ":")).encode()


def decode_example(value: bytes | None) -> TrainingExample:
    """The example in a record's value; :class:`BadExample` when it is not one."""
    try:
        body = json.loads(value or b"")
        return TrainingExample(str(body["user_id"]), [str(x) for x in body["items"]], int(body.get("new", 1)))
    except (ValueError, KeyError, TypeError) as exc:
        raise BadExample(f"not a training example: {type(exc).__name__}: {exc}") from None
