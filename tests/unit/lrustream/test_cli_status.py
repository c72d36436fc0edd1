"""`lrustream status`, `topics list --json`, `state inspect --json` and `recommend`, without a broker: the Kafka
reads are stubbed at their function boundary (cli.probe_status, stream.topics.partition_counts) and `recommend`
asks a tiny HTTP server in a thread."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from lrustream import cli
from lrustream.cli import app, status_document, status_lines, topics_document
from lrustream.kernel.config import load_config

UP = {"error": None,
      "partitions": {"interactions": 2, "recommendations": 2, "model-versions": 1, "other": 3},
      "group": {"state": "stable", "members": [
          {"client_id": "lrustream url=http://w1:6066", "host": "/10.0.0.1", "url": "http://w1:6066",
           "partitions": [0]},
          {"client_id": "lrustream url=http://w2:6066", "host": "/10.0.0.2", "url": "http://w2:6066",
           "partitions": [1]}]},
      "pointers": {"@current": "v000003", "@pin": None, "@shadow": "v000004"},
      "offsets": {0: [90, 100], 1: [None, 7]}}
DOWN = {"error": "Failed to get metadata: Local: Broker transport failure", "partitions": {}, "group": None,
        "pointers": None, "offsets": None}


def test_status_document_of_a_running_system() -> None:
    document = json.loads(json.dumps(status_document(load_config(), UP)))
    assert document["broker"] == {"bootstrap": "127.0.0.1:9092", "reachable": True, "error": None}
    topics = {t["name"]: (t["exists"], t["partitions"]) for t in document["topics"]}
    assert topics["interactions"] == (True, 2) and topics["model-versions"] == (True, 1)
    assert topics["interactions.dlq"] == (False, None)
    assert "other" not in topics  # only the topics lrustream uses
    assert document["workers"]["state"] == "stable" and len(document["workers"]["members"]) == 2
    assert document["serving"] == {"serving": "v000003", "current": "v000003", "pinned": None,
                                   "shadow": "v000004", "error": None}
    assert document["lag"]["total"] == 10 + 7  # a partition never committed counts from its start
    assert document["lag"]["partitions"] == [{"partition": 0, "committed": 90, "end": 100, "lag": 10},
                                             {"partition": 1, "committed": None, "end": 7, "lag": 7}]


def test_status_serving_follows_the_pin_and_a_failed_part_stands_alone() -> None:
    probe = {**UP, "pointers": {"@current": "v000005", "@pin": "v000002", "@shadow": None},
             "group": {"error": "coordinator not available"}}
    document = status_document(load_config(), probe)
    assert document["serving"]["serving"] == "v000002"
    assert document["workers"] == {"group": "lrustream-worker", "state": None, "members": None,
                                   "error": "coordinator not available"}
    assert document["lag"]["error"] is None
    lines = status_lines(document)
    assert "workers  group lrustream-worker: coordinator not available" in lines
    assert "serving  v000002 (current v000005, pinned v000002)" in lines


def test_status_text_of_a_running_system() -> None:
    lines = status_lines(status_document(load_config(), UP))
    assert lines[0] == "broker   127.0.0.1:9092: reachable"
    assert lines[1].startswith("topics   interactions(2) recommendations(2) ")
    assert "missing: interactions.dlq" in lines[1] and lines[1].endswith("(lrustream topics create)")
    assert lines[2:5] == ["workers  group lrustream-worker stable: 2 member(s)",
                          "         http://w1:6066 on /10.0.0.1: partitions 0",
                          "         http://w2:6066 on /10.0.0.2: partitions 1"]
    assert lines[5] == "serving  v000003 (current v000003, shadow v000004)"
    assert lines[6] == "lag      17 events on interactions (per partition 0:10 1:7)"


def test_status_command_exits_0_when_the_broker_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "probe_status", lambda cfg: UP)
    out = CliRunner().invoke(app, ["status", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["lag"]["total"] == 17


def test_status_command_says_the_broker_is_down_and_exits_3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "probe_status", lambda cfg: DOWN)
    out = CliRunner().invoke(app, ["status"])
    assert out.exit_code == cli.STATUS_DOWN == 3, out.output
    assert out.output.splitlines() == [
        "broker   127.0.0.1:9092: unreachable (Failed to get metadata: Local: Broker transport failure)",
        "topics, workers, serving version and lag need the broker"]
    document = json.loads(CliRunner().invoke(app, ["status", "--json"]).output)
    assert document["broker"]["reachable"] is False
    assert all(t["exists"] is None for t in document["topics"])
    assert {document[p]["error"] for p in ("workers", "serving", "lag")} == {"broker unreachable"}


def test_probe_status_of_an_unreachable_broker_reports_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import stream.topics

    def unreachable(cfg: Any, timeout_s: float = 10.0) -> dict[str, int]:
        raise RuntimeError("no route to host")

    monkeypatch.setattr(stream.topics, "partition_counts", unreachable)
    assert cli.probe_status(load_config()) == {"error": "no route to host", "partitions": {}, "group": None,
                                               "pointers": None, "offsets": None}


def test_topics_list_json(monkeypatch: pytest.MonkeyPatch) -> None:
    import stream.topics

    monkeypatch.setattr(stream.topics, "partition_counts", lambda cfg: {"recommendations": 4, "interactions": 4})
    out = CliRunner().invoke(app, ["topics", "list", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"topics": [{"name": "interactions", "partitions": 4},
                                                 {"name": "recommendations", "partitions": 4}]}
    assert CliRunner().invoke(app, ["topics", "list"]).output == "interactions\t4\nrecommendations\t4\n"
    assert topics_document({}) == {"topics": []}


def test_state_inspect_json_is_one_line_of_the_same_document(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import state.store

    class Record:
        version, partition, offset, updated_ms, state, window, unknown = "v000001", 1, 41, 5, b"xx", [3, 4], 0

        def external_window(self, item_of: Any) -> list[str]:
            raise AssertionError("no vocabulary is stored")

    monkeypatch.setattr(state.store, "find_user", lambda root, user: (1, Record()))
    empty_store = f"model_store.dir={tmp_path / 'models'}"  # no vocabulary: the window shows internal ids
    pretty = CliRunner().invoke(app, ["state", "inspect", "42", empty_store])
    compact = CliRunner().invoke(app, ["state", "inspect", "42", "--json", empty_store])
    assert pretty.exit_code == compact.exit_code == 0, pretty.output + compact.output
    assert len(compact.output.splitlines()) == 1
    assert json.loads(compact.output) == json.loads(pretty.output) == {
        "user_id": "42", "partition": 1, "model_version": "v000001", "last_applied": {"partition": 1, "offset": 41},
        "updated_ms": 5, "state_bytes": 2, "window": [3, 4], "unknown_items": 0}


# ----- recommend -------------------------------------------------------------------------------------------------
ANSWER = {"user_id": "u 1", "items": ["7", "9"], "scores": [0.5, 0.25], "model_version": "v000003"}


@pytest.fixture
def worker() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A stand-in worker: /recommendations/... on /owner/... redirects (307) there, the owner answers ANSWER;
    every request's path and Authorization header is recorded."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({"path": self.path, "authorization": self.headers.get("Authorization")})
            if not self.path.startswith("/owner/"):
                self.send_response(307)
                self.send_header("Location", "/owner" + self.path)
                self.end_headers()
                return
            body = json.dumps(ANSWER).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_recommend_follows_the_redirect_with_the_query_and_the_bearer_token(
        worker: tuple[str, list[dict[str, Any]]]) -> None:
    url, seen = worker
    host, port = url.removeprefix("http://").split(":")
    out = CliRunner().invoke(app, ["recommend", "u 1", "-k", "5", "--exclude", "a", "--exclude", "b,c",
                                   f"http.host={host}", f"http.port={port}", "http.token=s3cret"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == ANSWER
    assert seen == [{"path": "/recommendations/u%201?k=5&exclude=a%2Cb%2Cc", "authorization": "Bearer s3cret"},
                    {"path": "/owner/recommendations/u%201?k=5&exclude=a%2Cb%2Cc",
                     "authorization": "Bearer s3cret"}]


def test_recommend_without_options_or_token_sends_a_bare_request(worker: tuple[str, list[dict[str, Any]]]) -> None:
    url, seen = worker
    out = CliRunner().invoke(app, ["recommend", "42", "--url", url + "/"])
    assert out.exit_code == 0, out.output
    assert seen[0] == {"path": "/recommendations/42", "authorization": None}


def test_recommend_from_an_unreachable_worker_is_a_client_error() -> None:
    from lrustream.client import ClientError, recommend

    with pytest.raises(ClientError, match=re.escape("GET http://127.0.0.1:9/recommendations/42")):
        recommend("http://127.0.0.1:9", "42", retries=0, timeout_s=1)


def test_probe_status_reports_missing_topics_part_by_part(monkeypatch: pytest.MonkeyPatch) -> None:
    import stream.topics

    monkeypatch.setattr(stream.topics, "partition_counts", lambda cfg, timeout_s=10.0: {"recommendations": 1})
    monkeypatch.setattr(cli, "_worker_group", lambda cfg, partitions, timeout_s: {"state": "dead", "members": []})
    probe = cli.probe_status(load_config())
    assert probe["pointers"] == {"error": "topic model-versions does not exist"}
    assert probe["offsets"] == {"error": "topic interactions does not exist"}
    lines = status_lines(status_document(load_config(), probe))
    assert lines[2:] == ["workers  group lrustream-worker dead: 0 member(s)",
                         "serving  topic model-versions does not exist",
                         "lag      topic interactions does not exist"]


class _Future:
    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


def test_worker_group_reads_members_urls_and_input_partitions(monkeypatch: pytest.MonkeyPatch) -> None:
    from confluent_kafka import ConsumerGroupState, TopicPartition
    from confluent_kafka.admin import ConsumerGroupDescription, MemberAssignment, MemberDescription

    import lrustream.kernel.kafka

    members = [MemberDescription("m1", "lrustream url=http://w1:6066", "/10.0.0.1",
                                 MemberAssignment([TopicPartition("interactions", 1), TopicPartition("other", 0),
                                                   TopicPartition("interactions", 0)])),
               MemberDescription("m2", "someone-else", "/10.0.0.2", MemberAssignment(None))]
    description = ConsumerGroupDescription("lrustream-worker", False, members, "range", ConsumerGroupState.STABLE,
                                           None)

    class Admin:
        def describe_consumer_groups(self, groups: list[str], request_timeout: float) -> dict[str, _Future]:
            return {groups[0]: _Future(description)}

    monkeypatch.setattr(lrustream.kernel.kafka, "admin", lambda cfg: Admin())
    assert cli._worker_group(load_config(), {}, 1.0) == {"state": "stable", "members": [
        {"client_id": "lrustream url=http://w1:6066", "host": "/10.0.0.1", "url": "http://w1:6066",
         "partitions": [0, 1]},
        {"client_id": "someone-else", "host": "/10.0.0.2", "url": None, "partitions": []}]}


def test_group_offsets_pairs_committed_and_end_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    import confluent_kafka
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

    import lrustream.kernel.kafka

    class Admin:
        def list_consumer_group_offsets(self, requests: list[Any], request_timeout: float) -> dict[str, _Future]:
            group = requests[0].group_id
            return {group: _Future(ConsumerGroupTopicPartitions(group, [
                TopicPartition("interactions", 0, 40), TopicPartition("interactions", 1, -1001)]))}

    class Consumer:
        def __init__(self, conf: dict[str, Any]) -> None:
            assert conf["group.id"].startswith("lrustream-worker-status-")  # never the workers' own group

        def close(self) -> None:
            pass

    monkeypatch.setattr(lrustream.kernel.kafka, "admin", lambda cfg: Admin())
    monkeypatch.setattr(lrustream.kernel.kafka, "high_watermarks", lambda consumer, topic, ps, t: {0: 50, 1: 3})
    monkeypatch.setattr(confluent_kafka, "Consumer", Consumer)
    assert cli._group_offsets(load_config(), {"interactions": 2}, 1.0) == {0: [40, 50], 1: [None, 3]}
