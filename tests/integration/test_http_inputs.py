"""GET /recommendations/{user_id} with inputs a client gets wrong, on two real workers sharing 2 partitions: every
bad ``k`` and user id is answered 400 with a one-line reason (no stack trace) and the worker goes on serving; a
user id at the length limit, and ids in any script, are answered; a worker that does not own a user redirects to
the owner with the id percent-encoded as UTF-8, and following that Location reaches the same user.

The id limit is stream/events.py's MAX_ID_CHARS (256 characters): a request cannot name a user whose events the
worker would refuse. Both workers start once for the module (each test only sends requests)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from lrustream.kernel.config import Config, load_config
from stream.events import MAX_ID_CHARS
from stream.topics import create_topics
from stream.worker import MAX_REQUEST_K
from tests.integration.test_requests import _NoRedirect, _wait_split
from tests.streamkit import WorkerProcess, produce_events, publish_model, recommendations

KNOWN = "u1"  # a user with events: what "the worker goes on serving" is checked with
UNICODE_USERS = {  # id -> its path segment, written out by hand (percent-encoded UTF-8)
    "élève": "%C3%A9l%C3%A8ve",
    "名前": "%E5%90%8D%E5%89%8D",
    "😀": "%F0%9F%98%80",
    "a/b c%d+e?f#g&h=i": "a%2Fb%20c%25d%2Be%3Ff%23g%26h%3Di",
}


@dataclass
class Pair:
    """Two workers of one group, the partitions split between them, and the last recommendation emitted per user."""

    cfg: Config
    workers: list[WorkerProcess]
    owned: list[list[int]]
    last: dict[str, dict]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def _overrides(bootstrap: str, root: Path) -> list[str]:
    """tests/conftest.py's ``kafka_overrides``, for a module-scoped fixture: topics and stores of its own."""
    t = f"t{uuid.uuid4().hex[:8]}"
    topics = {"interactions": "interactions", "recommendations": "recommendations", "dlq": "interactions.dlq",
              "training_examples": "training-examples", "model_updates": "model-updates",
              "state_changelog": "state-changelog", "items": "items", "model_versions": "model-versions"}
    return [f"kafka.bootstrap_servers={bootstrap}", *(f"topics.{k}={t}-{v}" for k, v in topics.items()),
            f"stream.app_id={t}-worker", f"online.group_id={t}-trainer", f"model_store.dir={root / 'models'}",
            "topics.partitions=2"]


@pytest.fixture(scope="module")
def pair(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("http-inputs")
    overrides = _overrides(kafka_bootstrap, root)
    cfg = load_config(overrides=overrides)
    create_topics(cfg)
    publish_model(cfg)
    workers = [WorkerProcess([*overrides, f"state.dir={root / name}"], root / f"{name}.log").start()
               for name in ("a", "b")]
    try:
        for w in workers:
            w.wait_healthy()
        owned = _wait_split(workers, partitions=2)
        events = [(user, f"i{(3 * k + n) % 40 + 1}") for n, user in enumerate([KNOWN, *UNICODE_USERS])
                  for k in range(4)]
        produce_events(cfg, events)
        last = {r["user_id"]: r for r in sorted(recommendations(cfg, expect=len(events)),
                                                key=lambda r: r["source"]["offset"])}
        yield Pair(cfg, workers, owned, last)
    finally:
        for w in workers:
            w.stop()


def _get(worker: WorkerProcess, path: str, follow: bool = False) -> Answer:
    """One GET, with its status, headers and body whatever the status (redirects followed when ``follow``)."""
    opener = urllib.request.build_opener(*([] if follow else [_NoRedirect]))
    try:
        with opener.open(f"http://127.0.0.1:{worker.port}{path}", timeout=10) as resp:
            return Answer(resp.status, dict(resp.headers), resp.read())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, dict(exc.headers), exc.read())


def _still_serving(pair: Pair) -> None:
    for w in pair.workers:
        assert w.proc is not None and w.proc.poll() is None, f"a worker exited:\n{w.tail()}"
        assert w.health()["status"] == "ok"
        answer = _get(w, f"/recommendations/{KNOWN}", follow=True)
        assert answer.status == 200 and answer.json()["items"] == pair.last[KNOWN]["items"]


def _bad_requests(worker: WorkerProcess) -> float:
    return worker.get_metric('lrustream_requests_total{answer="bad"}')


TOO_LONG = "x" * (MAX_ID_CHARS + 1)
BAD = {  # path -> what the one-line reason says
    f"/recommendations/{KNOWN}?k={MAX_REQUEST_K + 1}": f"k must be 1 to {MAX_REQUEST_K}",
    f"/recommendations/{KNOWN}?k=abc": f"k must be 1 to {MAX_REQUEST_K}",
    f"/recommendations/{KNOWN}?k=": f"k must be 1 to {MAX_REQUEST_K}",
    f"/recommendations/{KNOWN}?k=1_0": f"k must be 1 to {MAX_REQUEST_K}",  # int() would read 10
    f"/recommendations/{KNOWN}?k={'9' * 5000}": f"k must be 1 to {MAX_REQUEST_K}",  # int() would name its limit
    "/recommendations/u%001": "invalid user_id: character U+0000 at 1",
    "/recommendations/u%0A1": "invalid user_id: character U+000A at 1",
    "/recommendations/u1%0D%0ALocation:%20x": "invalid user_id: character U+000D at 2",
    f"/recommendations/{TOO_LONG}": f"invalid user_id: {MAX_ID_CHARS + 1} characters > {MAX_ID_CHARS}",
    "/recommendations/%FF": "invalid user_id: not percent-encoded UTF-8",  # was the user named "%FF"
    "/recommendations/%ED%A0%80": "invalid user_id: not percent-encoded UTF-8",  # a surrogate, as UTF-8 bytes
    "/recommendations/u%zz": "invalid user_id: '%' at 1 of the path segment starts no percent-escape",
}


@pytest.mark.parametrize("path", list(BAD), ids=lambda p: p.rpartition("/")[2][:40])
def test_a_bad_k_or_user_id_is_answered_400_with_a_one_line_reason_and_the_workers_go_on_serving(
        pair: Pair, path: str) -> None:
    """Each bad input, to either worker (whether or not it owns the user): 400, a JSON body whose only field is
    the reason, one line and no traceback, counted as a bad request; both workers answer as before afterwards."""
    for w in pair.workers:
        before = _bad_requests(w)
        answer = _get(w, path)
        assert answer.status == 400, (answer.status, answer.body[:300])
        assert answer.headers["Content-Type"].startswith("application/json")
        body = answer.json()
        assert set(body) == {"error"} and isinstance(body["error"], str)
        reason = body["error"]
        assert BAD[path] in reason and "\n" not in reason and "\r" not in reason and len(reason) < 200, reason
        assert b"Traceback" not in answer.body and "int()" not in reason
        assert _bad_requests(w) == before + 1
    _still_serving(pair)


def test_a_request_line_longer_than_the_http_server_reads_is_answered_400_in_one_line(pair: Pair) -> None:
    """Far past the id limit the HTTP server itself refuses the request (aiohttp reads 8,190 bytes of a request
    line): 400, one line of text, no traceback, and the worker goes on serving."""
    answer = _get(pair.workers[0], "/recommendations/" + "x" * 9000)
    assert answer.status == 400
    assert answer.body.count(b"\n") <= 1 and b"Traceback" not in answer.body and len(answer.body) < 400
    _still_serving(pair)


@pytest.mark.parametrize("user", ["a" * MAX_ID_CHARS, "é" * MAX_ID_CHARS], ids=["ascii", "two-byte"])
def test_a_user_id_at_the_length_limit_is_answered(pair: Pair, user: str) -> None:
    """MAX_ID_CHARS counts characters, not bytes: an unknown user of that length gets the popular fallback from
    either worker (the owner directly, the other through its redirect)."""
    segment = quote(user, safe="")
    for w in pair.workers:
        answer = _get(w, f"/recommendations/{segment}?k=3", follow=True)
        assert answer.status == 200, answer.body[:300]
        body = answer.json()
        assert body["user_id"] == user and body["fallback"] == "popular" and len(body["items"]) == 3


@pytest.mark.parametrize("user", list(UNICODE_USERS), ids=["latin", "cjk", "emoji", "reserved"])
def test_a_redirect_carries_the_user_id_percent_encoded_as_utf8_and_following_it_reaches_the_same_user(
        pair: Pair, user: str) -> None:
    """The worker that does not own the user answers 307 with Location = the owner's address, the id encoded as
    UTF-8 bytes, each one %XX (written out by hand here), and the query as sent; following it gets the owner's
    answer for that user: the top of the last recommendation the stream emitted for it."""
    segment, want = UNICODE_USERS[user], pair.last[user]
    partition = want["source"]["partition"]
    [owner] = [w for w, mine in zip(pair.workers, pair.owned, strict=True) if partition in mine]
    [other] = [w for w in pair.workers if w is not owner]
    redirect = _get(other, f"/recommendations/{segment}?k=3")
    assert redirect.status == 307, redirect.body[:300]
    assert redirect.json() == {"owner": f"http://127.0.0.1:{owner.port}", "partition": partition}
    assert redirect.headers["Location"] == f"http://127.0.0.1:{owner.port}/recommendations/{segment}?k=3"
    for w in (owner, other):  # the owner directly, and the other through the redirect
        answer = _get(w, f"/recommendations/{segment}?k=3", follow=True)
        assert answer.status == 200, answer.body[:300]
        body = answer.json()
        assert body["user_id"] == user and body["partition"] == partition and "fallback" not in body
        assert (body["items"], body["model_version"]) == (want["items"][:3], want["model_version"])
