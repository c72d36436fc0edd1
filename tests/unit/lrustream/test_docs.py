"""The generated reference documents: in step with the code, and saying what the code says."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from lrustream.docs import (
    DOCUMENTS,
    REGENERATE,
    config_reference,
    env_variables,
    main,
    markdown,
    metrics_reference,
    sections,
    validation,
    with_children,
)
from lrustream.kernel.config import Config, as_dict
from stream.metrics import WorkerMetrics
from tests.conftest import REPO
from trainer.service import TrainerMetrics


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_the_committed_document_is_what_the_code_generates(name: str) -> None:
    committed = REPO / "docs" / name
    assert committed.is_file(), f"docs/{name} is missing: run `{REGENERATE}` in the repository root"
    assert committed.read_text() == DOCUMENTS[name](), (
        f"docs/{name} is out of date with the code: run `{REGENERATE}` in the repository root")


def _keys(node: dict, prefix: str = "") -> set[str]:
    return {k for key, value in node.items()
            for k in (_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"})}


def test_every_config_key_has_a_row_with_its_docstring() -> None:
    documented = {row[0].strip("`"): row for section in sections() for row in section.rows}
    assert set(documented) == _keys(as_dict(Config()))
    assert all(row[3] for row in documented.values()), "a key with an empty meaning"
    assert documented["online.replay_share"][2] == "`0.5`"
    assert documented["http.token"][1] == "`str \\| None`" and documented["http.token"][2] == "`null`"


def test_a_field_without_a_docstring_is_refused() -> None:
    @dataclasses.dataclass
    class Undocumented:
        documented: int = 1
        """Says what it is."""
        silent: int = 2

    with pytest.raises(ValueError, match="silent has no docstring"):
        sections(Undocumented)


def test_env_column_comes_from_the_default_file() -> None:
    assert env_variables() == {"kafka.bootstrap_servers": "LRUSTREAM_KAFKA_BOOTSTRAP",
                               "kafka.security.protocol": "LRUSTREAM_KAFKA_SECURITY_PROTOCOL",
                               "kafka.security.sasl_password": "LRUSTREAM_KAFKA_SASL_PASSWORD",
                               "http.token": "LRUSTREAM_HTTP_TOKEN"}
    assert "| `LRUSTREAM_HTTP_TOKEN` |" in config_reference()


def test_validation_states_the_rule_and_the_order_between_keys() -> None:
    assert validation("stream.session_timeout_s") == "must be in [6, 1800]"
    assert validation("online.min_steps") == "must be >= 0; must be <= online.max_steps"
    assert validation("online.max_holdout") == "must be >= 1; must be >= online.min_holdout"
    assert validation("topics.interactions") == ""
    assert validation("kafka.security.sasl_username") == "required when kafka.security.protocol is SASL_*"
    assert validation("model.name").startswith("must be one of ") and "lrurec" in validation("model.name")


def test_markdown_turns_rest_into_one_table_safe_line() -> None:
    text = "A :func:`~pkg.mod.f` or\n    ``x | y``  :class:`Cls`."
    assert markdown(text) == "A `pkg.mod.f` or `x \\| y` `Cls`."


@pytest.mark.parametrize("make", [WorkerMetrics, TrainerMetrics], ids=["worker", "trainer"])
def test_every_series_the_metrics_endpoint_exposes_is_documented(make: type) -> None:
    exposition = generate_latest(with_children(make())).decode()
    names = {line.split("{")[0].split(" ")[0] for line in exposition.splitlines() if not line.startswith("#")}
    listed = {name for name in names if not name.endswith("_created")}
    assert len(listed) > 20
    document = metrics_reference()
    assert [name for name in sorted(listed) if f"`{name}`" not in document] == []


def test_labels_are_listed_with_their_metric() -> None:
    document = metrics_reference()
    assert "| `lrustream_dlq_total` | counter | `reason` |" in document
    assert "| `lrustream_shadow_hit_rate` | gauge | `role`, `version` |" in document
    assert "`lrustream_trainer_round_seconds_bucket`<br>" in document


def test_check_fails_on_a_stale_document_and_passes_once_written(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--check"]) == 1  # nothing written yet
    assert main([]) == 0
    assert main(["--check"]) == 0
    (tmp_path / "docs" / "metrics.md").write_text("stale\n")
    assert main(["--check"]) == 1
    assert main(["--bogus"]) == 2
