"""Requests on real Kafka: two workers share 4 partitions; a GET to either one answers any user with
the top-K of the user's stored state scored directly, which is the top-K the stream last emitted for that user
(the owner answers, the other redirects); an unknown user gets the popular fallback, in full from a worker that
has seen two events when the version seeds it; a blocked item leaves the answers within seconds and comes back
after unblock; lrustream.client sends the events and asks."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lrustream.cli import app
from lrustream.client import Client, ClientError
from lrustream.kernel.config import Config, load_config
from models.store import POPULAR_NOTE, ModelStore, popular_note
from state.record import UserRecord
from state.store import find_user
from stream.serving import Serving
from stream.topics import create_topics
from stream.versions import publish_version
from tests.streamkit import (
    WorkerProcess,
    produce_events,
    publish_model,
    recommendations,
    small_model,
    synthetic_events,
)

APPLIED_WITHIN_S = 5.0  # the bound the contract states, from the control record to the answers


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _get(worker: WorkerProcess, path: str, follow: bool = True) -> tuple[int, dict, dict]:
    opener = urllib.request.build_opener(*([] if follow else [_NoRedirect]))
    try:
        with opener.open(f"http://127.0.0.1:{worker.port}{path}", timeout=10) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def _answer(worker: WorkerProcess, user: str, query: str = "") -> dict:
    status, body, _ = _get(worker, f"/recommendations/{user}{query}")
    assert status == 200, body
    return body


def _wait_split(workers: list[WorkerProcess], partitions: int = 4, timeout_s: float = 60.0) -> list[list[int]]:
    """Each worker's partitions once the group has split them all between the workers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        owned = [w.health().get("partitions", []) for w in workers]
        if all(owned) and sorted(p for o in owned for p in o) == list(range(partitions)):
            return owned
        time.sleep(0.5)
    raise AssertionError(f"partitions not split between the workers: {owned}")


def _stored(tmp_path: Path, app_id: str, user: str, offset: int, timeout_s: float = 10.0) -> UserRecord:
    """The user's record in whichever worker's local store holds it, once it has applied ``offset``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [f[1] for w in ("a", "b") if (f := find_user(tmp_path / w / app_id, user)) is not None]
        if found and max(r.offset for r in found) >= offset:
            return max(found, key=lambda r: r.offset)
        time.sleep(0.2)
    raise AssertionError(f"{user}'s state at offset {offset} was not committed")


def test_either_worker_answers_any_user_with_the_top_k_last_emitted_for_that_user(
        kafka_overrides: list[str], tmp_path: Path) -> None:
    kafka_overrides = [*kafka_overrides, "topics.partitions=4"]
    kafka_cfg = load_config(overrides=kafka_overrides)
    create_topics(kafka_cfg)
    publish_model(kafka_cfg)
    workers = [WorkerProcess([*kafka_overrides, f"state.dir={tmp_path / name}"], tmp_path / f"{name}.log").start()
               for name in ("a", "b")]
    client = Client(kafka_cfg, url=f"http://127.0.0.1:{workers[1].port}")  # what applications use
    try:
        for w in workers:
            w.wait_healthy()
        owned = _wait_split(workers)
        events = synthetic_events(600, users=24, seed=5)
        for k, (user, item) in enumerate(events):
            client.send(user, item, ts=1_700_000_000_000 + k)
        client.flush()
        recs = recommendations(kafka_cfg, expect=len(events))
        last = {}
        for r in sorted(recs, key=lambda r: (r["source"]["partition"], r["source"]["offset"])):
            last[r["user_id"]] = r
        assert len(last) == 24

        served = Serving.load(ModelStore(kafka_cfg.model_store.dir))
        for user, want in last.items():  # the stored state scored directly, once the worker has committed it
            record = _stored(tmp_path, kafka_cfg.stream.app_id, user, want["source"]["offset"])
            hidden = torch.from_numpy(np.frombuffer(record.hidden, dtype=np.float32).copy())
            scores = served.model.score(hidden[None])[0]
            scores[torch.from_numpy(record.window[record.window > 0].astype(np.int64))] = float("-inf")
            top = torch.topk(scores, 10)
            kept = top.values > float("-inf")  # fewer than 10 when the user has seen all but a few items
            got = _answer(workers[0], user)
            assert got["items"] == served.vocab.items_of(top.indices[kept].tolist()), user
            assert got["scores"] == pytest.approx(top.values[kept].tolist(), abs=1e-5)

        redirected = 0
        for user, want in last.items():
            for w, mine in zip(workers, owned, strict=True):
                got = _answer(w, user)
                assert (got["items"], got["scores"], got["model_version"]) == \
                    (want["items"], want["scores"], want["model_version"]), (user, got, want)
                assert got["source"] == "request" and got["partition"] == want["source"]["partition"]
                if want["source"]["partition"] not in mine:
                    status, body, headers = _get(w, f"/recommendations/{user}?k=3", follow=False)
                    assert status == 307 and body["partition"] == want["source"]["partition"]
                    assert headers["Location"].endswith(f"/recommendations/{user}?k=3")
                    redirected += 1
        assert redirected == 24  # each user once: through the worker that does not own it
        assert len(_answer(workers[0], "u1", "?k=3")["items"]) == 3
        assert client.recommend("u1") == {**_answer(workers[1], "u1"), "received_ts": ANY, "emitted_ts": ANY}
        assert client.recommend("u2", k=4, exclude=[last["u2"]["items"][0]])["items"] == last["u2"]["items"][1:5]
        with pytest.raises(ClientError, match="400 k must be 1 to 1000"):
            client.recommend("u1", k=0)
        excluded = last["u1"]["items"][0]
        assert _answer(workers[1], "u1", f"?exclude={excluded}")["items"] == last["u1"]["items"][1:] + \
            _answer(workers[1], "u1", "?k=11")["items"][10:]

        stranger = _answer(workers[0], "never-seen")
        assert stranger["fallback"] == "popular" and len(stranger["items"]) == 10
        assert set(stranger["items"]) <= {i for _, i in events}  # each worker counts its own partitions' events
        assert stranger["scores"] == sorted(stranger["scores"], reverse=True) and stranger["scores"][-1] > 0
        assert _get(workers[0], "/recommendations/u1?k=0")[0] == 400
        metrics = workers[0].get("/metrics").decode()
        assert 'lrustream_requests_total{answer="redirect"}' in metrics
        assert f'lrustream_popular_item_weight{{item="{stranger["items"][0]}"}}' in metrics

        target = last["u1"]["items"][0]
        assert CliRunner().invoke(app, ["items", "block", target, *kafka_overrides]).exit_code == 0
        time.sleep(APPLIED_WITHIN_S)
        for user in last:
            assert target not in _answer(workers[0], user)["items"]
        assert target not in _answer(workers[1], "never-seen", "?k=40")["items"]
        assert CliRunner().invoke(app, ["items", "unblock", target, *kafka_overrides]).exit_code == 0
        time.sleep(APPLIED_WITHIN_S)
        assert _answer(workers[1], "u1")["items"] == last["u1"]["items"]
    finally:
        client.close()
        for w in workers:
            w.stop()


@pytest.mark.kafka
def test_a_worker_that_has_seen_two_events_answers_a_cold_user_with_ten_items(kafka_cfg: Config,
                                                                             kafka_overrides: list[str],
                                                                             tmp_path: Path) -> None:
    """The serving version's training data seeds the popular fallback (its "popular" note, as `lrustream train`
    writes it): a worker fresh on the broker, two events seen, answers a user it never saw with k=10 items, the
    two it saw first."""
    model, vocab = small_model(kafka_cfg)
    trained_on = [f"i{k}" for k in range(1, 41) for _ in range(41 - k)]  # i1 most frequent, then i2, ...
    create_topics(kafka_cfg)
    publish_version(kafka_cfg, model, vocab, who="test", notes={POPULAR_NOTE: popular_note(trained_on)})
    worker = WorkerProcess(kafka_overrides, tmp_path / "worker.log").start()
    try:
        worker.wait_healthy()
        produce_events(kafka_cfg, [("a", "i30"), ("b", "i33")])
        recommendations(kafka_cfg, expect=2)
        stranger = _answer(worker, "never-seen", "?k=10")
    finally:
        worker.stop()
    assert stranger["fallback"] == "popular"
    assert stranger["items"] == ["i30", "i33", *(f"i{k}" for k in range(1, 9))], stranger
