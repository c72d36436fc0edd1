"""The CLI's --version and the --json documents of `broker status`, `items list` and `models list` (their
formatting, without a broker; tests/integration runs them against one)."""

from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lrustream import cli
from lrustream.broker import BrokerStatus
from lrustream.cli import app, blocked_document, broker_document, versions_document, versions_lines
from models.store import VersionInfo
from stream.versions import TopicView


def test_version_prints_the_installed_package_version() -> None:
    out = CliRunner().invoke(app, ["--version"])
    assert out.exit_code == 0, out.output
    assert out.output == f"lrustream {importlib.metadata.version('lrustream')}\n"


def test_version_without_an_installed_package_says_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli.package_version() == "unknown"
    assert CliRunner().invoke(app, ["--version"]).output == "lrustream unknown\n"


def test_broker_status_json_of_a_broker_that_is_not_running(tmp_path: Path) -> None:
    out = CliRunner().invoke(app, ["broker", "status", "--json", f"broker.data_dir={tmp_path}", "broker.port=19999",
                                   "kafka.bootstrap_servers=127.0.0.1:19999"])
    assert out.exit_code == 3, out.output
    assert json.loads(out.output) == {"running": False, "answering": False, "pid": None,
                                      "bootstrap": "127.0.0.1:19999"}


def test_broker_document_of_a_running_broker() -> None:
    status = BrokerStatus(running=True, pid=4242, bootstrap="127.0.0.1:9092", answering=True)
    assert json.loads(json.dumps(broker_document([status]))) == {
        "running": True, "answering": True, "pid": 4242, "bootstrap": "127.0.0.1:9092"}


def test_broker_document_of_a_cluster_with_a_node_down_lists_every_node() -> None:
    statuses = [BrokerStatus(True, 11, "127.0.0.1:9092", True, 1),
                BrokerStatus(False, None, "127.0.0.1:9094", False, 2),
                BrokerStatus(True, 13, "127.0.0.1:9096", True, 3)]
    document = json.loads(json.dumps(broker_document(statuses)))
    assert document["running"] is False and document["answering"] is False and document["pid"] is None
    assert document["bootstrap"] == "127.0.0.1:9092,127.0.0.1:9094,127.0.0.1:9096"
    assert [n["node"] for n in document["nodes"]] == [1, 2, 3]
    assert document["nodes"][1] == {"node": 2, "running": False, "answering": False, "pid": None,
                                    "bootstrap": "127.0.0.1:9094"}


def test_items_list_json_names_the_topic_and_sorts_the_blocked_items(monkeypatch: pytest.MonkeyPatch) -> None:
    import stream.catalogue

    monkeypatch.setattr(stream.catalogue, "read_blocked", lambda cfg: {"b-2", "a-1"})
    out = CliRunner().invoke(app, ["items", "list", "--json", "topics.items=catalogue"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"topic": "catalogue", "blocked": ["a-1", "b-2"]}
    assert CliRunner().invoke(app, ["items", "list"]).output == "a-1\nb-2\n"
    assert blocked_document("items", set()) == {"topic": "items", "blocked": []}


def _info(version: str, parent: str | None, hr: float) -> VersionInfo:
    return VersionInfo(version=version, model="lrurec", config={}, num_items=100, created=1_700_000_000.0,
                       parent=parent, metrics={"HR@10": hr, "loss": 1.5})


def _seen(pin: str | None, current: str, why: dict) -> TopicView:
    seen = TopicView(refused={"v000004": "weights do not match their digest"})
    seen.pointers.update({"@current": current, "@pin": pin})
    seen.why["@current"] = why
    return seen


def test_models_list_document_marks_serving_collected_refused_and_the_rollback() -> None:
    versions = [_info("v000001", None, 0.1), _info("v000002", "v000001", 0.2), _info("v000003", "v000002", 0.15)]
    seen = _seen("v000002", "v000002", {"version": "v000002", "by": "ops@host", "reason": "rollback: worse live"})
    document = json.loads(json.dumps(versions_document(versions, seen, lambda v: v == "v000001")))
    assert (document["serving"], document["current"], document["pinned"], document["shadow"]) == (
        "v000002", "v000002", "v000002", None)
    assert [(v["version"], v["serving"], v["collected"]) for v in document["versions"]] == [
        ("v000001", False, True), ("v000002", True, False), ("v000003", False, False)]
    assert document["versions"][1] == {"version": "v000002", "model": "lrurec", "num_items": 100,
                                       "parent": "v000001", "created": 1_700_000_000.0,
                                       "metrics": {"HR@10": 0.2, "loss": 1.5}, "serving": True,
                                       "collected": False}
    assert document["refused"] == [{"version": "v000004", "reason": "weights do not match their digest"}]
    assert document["rollback"] == {"version": "v000002", "by": "ops@host", "reason": "rollback: worse live"}


def test_models_list_text_is_rendered_from_the_same_document() -> None:
    versions = [_info("v000001", None, 0.1), _info("v000002", "v000001", 0.2)]
    lines = versions_lines(versions_document(versions, _seen(None, "v000002", {"reason": "published"}),
                                             lambda v: False))
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1_700_000_000.0))
    assert lines == [f"  v000001  lrurec  items=100  parent=None  {created}  HR@10=0.1000",
                     f"* v000002  lrurec  items=100  parent=v000001  {created}  HR@10=0.2000",
                     "! v000004  refused: weights do not match their digest"]
    pinned = versions_lines(versions_document(versions, _seen("v000001", "v000002", {}), lambda v: v == "v000002"))
    assert pinned[0] == "serving is pinned to v000001 (lrustream models unpin releases it)"
    assert pinned[1].startswith("* v000001") and pinned[2].startswith("- v000002")
