"""Configuration: defaults, files, overrides, env interpolation and the errors users get."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lrustream.config import ConfigError, load_config
from tests.conftest import REPO


def test_defaults_load_and_bootstrap_follows_broker_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LRUSTREAM_KAFKA_BOOTSTRAP", raising=False)
    cfg = load_config()
    assert cfg.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert cfg.model.name == "lrurec" and cfg.topics.partitions == 4
    assert load_config(overrides=["broker.port=19000"]).kafka.bootstrap_servers == "127.0.0.1:19000"


def test_env_interpolation_sets_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LRUSTREAM_KAFKA_BOOTSTRAP", "kafka-1:9092,kafka-2:9092")
    assert load_config().kafka.bootstrap_servers == "kafka-1:9092,kafka-2:9092"


def test_file_then_overrides_merge_in_order(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("stream:\n  batch_size: 64\n  top_k: 5\nmodel:\n  name: sasrec\n")
    cfg = load_config(f, ["stream.top_k=20"])
    assert (cfg.stream.batch_size, cfg.stream.top_k, cfg.model.name) == (64, 20, "sasrec")
    assert cfg.stream.linger_ms == 20  # untouched keys keep schema defaults


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["broker.port=abc"], "broker.port"),
        (["stream.nope=1"], "unknown config key 'stream.nope'"),
        (["model.name=gru4rec"], "model.name='gru4rec' is not one of"),
        (["stream.batch_size=0"], "stream.batch_size must be positive"),
        (["justakey"], "not of the form key=value"),
        (["broker.port=70000"], "broker.port must be a TCP port"),
    ],
)
def test_bad_overrides_are_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides=overrides)


def test_unknown_key_in_file_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("stream:\n  batchsize: 64\n")
    with pytest.raises(ConfigError, match="batchsize"):
        load_config(f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_prints_one_line_not_a_traceback_and_config_show_masks_secrets(tmp_path: Path) -> None:
    bad = subprocess.run([sys.executable, "-m", "lrustream.cli", "config", "show", "stream.top_k=ten"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0
    ok = subprocess.run([sys.executable, "-m", "lrustream.cli", "config", "show", "http.token=s3cret",
                         "kafka.security.sasl_password=hunter2", "stream.top_k=7"],
                        capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "top_k: 7" in ok.stdout
    assert "s3cret" not in ok.stdout and "hunter2" not in ok.stdout
