"""`lrustream models` on the real broker: rollback pins on the model-versions topic (another host follows), bad
names are refused, unpin releases, gc reaches every host."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lrustream.cli import app
from lrustream.kernel.config import Config
from models.store import ModelStore, ModelStoreError
from stream.topics import create_topics
from stream.versions import VersionLog
from tests.streamkit import publish_model


def test_rollback_pins_the_version_for_every_host_and_refuses_a_path(kafka_cfg: Config, kafka_overrides: list[str],
                                                                     tmp_path: Path) -> None:
    create_topics(kafka_cfg)
    store = ModelStore(kafka_cfg.model_store.dir)
    v1, _ = publish_model(kafka_cfg, seed=0), publish_model(kafka_cfg, seed=1)
    runner = CliRunner()
    out = runner.invoke(app, ["models", "rollback", v1, *kafka_overrides])
    assert out.exit_code == 0, out.output
    assert (store.current(), store.pinned()) == (v1, v1)
    elsewhere = VersionLog(kafka_cfg, ModelStore(tmp_path / "another-host"))  # nothing shared but the broker
    elsewhere.catch_up()
    assert (elsewhere.store.current(), elsewhere.store.pinned()) == (v1, v1)
    v3 = publish_model(kafka_cfg, seed=2)  # the trainer goes on publishing
    listed = runner.invoke(app, ["models", "list", *kafka_overrides]).output
    assert store.current() == v1 and f"pinned to {v1}" in listed and f"* {v1}" in listed and f"  {v3}" in listed
    document = json.loads(runner.invoke(app, ["models", "list", "--json", *kafka_overrides]).output)
    assert (document["serving"], document["pinned"]) == (v1, v1)
    assert [v["version"] for v in document["versions"] if v["serving"]] == [v1]
    assert {v["version"] for v in document["versions"]} >= {v1, v3}

    bad = runner.invoke(app, ["models", "rollback", "../evil/v999999", *kafka_overrides])
    assert isinstance(bad.exception, ModelStoreError) and "invalid model version name" in str(bad.exception)
    assert store.current() == v1

    out = runner.invoke(app, ["models", "unpin", *kafka_overrides])
    assert out.exit_code == 0 and f"unpinned {v1}" in out.output and store.pinned() is None
    v4 = publish_model(kafka_cfg, seed=3)
    assert store.current() == v4, "after unpin the trainer's versions are served again"
    elsewhere.poll(5)
    assert (elsewhere.store.current(), elsewhere.store.pinned()) == (v4, None)
    elsewhere.close()


def test_gc_removes_old_weights_on_every_host_and_list_marks_them(kafka_cfg: Config, kafka_overrides: list[str],
                                                                   tmp_path: Path) -> None:
    store = ModelStore(kafka_cfg.model_store.dir)
    v1, v2, v3 = (publish_model(kafka_cfg, seed=k) for k in range(3))
    early = VersionLog(kafka_cfg, ModelStore(tmp_path / "early-host"))
    early.catch_up()
    assert not any(early.store.collected(v) for v in (v1, v2, v3))
    runner = CliRunner()
    out = runner.invoke(app, ["models", "gc", "--keep", "1", *kafka_overrides])
    assert out.exit_code == 0 and f"{v1} {v2}" in out.output, out.output
    listed = runner.invoke(app, ["models", "list", *kafka_overrides]).output
    assert f"- {v1}" in listed and f"- {v2}" in listed and f"* {v3}" in listed
    document = json.loads(runner.invoke(app, ["models", "list", "--json", *kafka_overrides]).output)
    assert [(v["version"], v["collected"]) for v in document["versions"]] == [(v1, True), (v2, True), (v3, False)]
    assert store.current() == v3 and runner.invoke(app, ["models", "gc", *kafka_overrides]).output.strip() == \
        "nothing to collect"
    early.poll(5)  # a host that had the weights removes them
    late = VersionLog(kafka_cfg, ModelStore(tmp_path / "late-host"))  # one that never had them keeps the vocabulary
    late.catch_up()
    for host in (early, late):
        assert [host.store.collected(v) for v in (v1, v2, v3)] == [True, True, False], host.store.root
        assert host.store.current() == v3 and host.store.vocabulary(v1) and host.seen.refused == {}
        with pytest.raises(ModelStoreError, match="garbage-collected"):
            host.store.load(v1)
        host.close()
