"""Configuration: defaults, files, overrides, env interpolation and the errors users get."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from lrustream.kernel import config as config_module
from lrustream.kernel.config import DEFAULT_CONFIG, Config, ConfigError, as_dict, load_config
from lrustream.kernel.http import check_http_exposure
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
    assert cfg.stream.commit_interval_ms == 1000  # untouched keys keep schema defaults


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["broker.port=abc"], "broker.port"),
        (["stream.nope=1"], "unknown config key 'stream.nope'"),
        (["stream.batch_size=0"], "stream.batch_size must be >= 1 (got 0)"),
        (["justakey"], "not of the form key=value"),
        (["broker.port=70000"], "broker.port must be in [1, 65535] (got 70000)"),
    ],
)
def test_bad_overrides_are_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=overrides)


@pytest.mark.parametrize(
    ("key", "edge", "beyond", "message"),
    [
        ("stream.batch_size", "1", "0", "stream.batch_size must be >= 1 (got 0)"),
        ("stream.top_k", "1", "-3", "stream.top_k must be >= 1 (got -3)"),
        ("stream.max_value_bytes", "1", "0", "stream.max_value_bytes must be >= 1 (got 0)"),
        ("stream.min_step_rows", "1", "0", "stream.min_step_rows must be >= 1 (got 0)"),
        ("stream.stall_after_s", "0.5", "0", "stream.stall_after_s must be > 0 (got 0.0)"),
        ("stream.stop_timeout_s", "0", "-1", "stream.stop_timeout_s must be >= 0 (got -1.0)"),
        ("stream.unknown_items", "oov", "drop", "stream.unknown_items must be one of dlq, oov (got 'drop')"),
        ("topics.partitions", "1", "0", "topics.partitions must be >= 1 (got 0)"),
        ("topics.replication_factor", "-1", "-2",
         "topics.replication_factor must be >= 1 (or 0: min(3, brokers); -1: the brokers' default) (got -2)"),
        ("broker.nodes", "1", "0", "broker.nodes must be >= 1 (got 0)"),
        ("train.batch_size", "1", "0", "train.batch_size must be >= 1 (got 0)"),
        ("train.val_every", "1", "0", "train.val_every must be >= 1 (got 0)"),
        ("train.device", "cpu", "tpu", "train.device must be one of auto, cpu, cuda (got 'tpu')"),
        ("state.dtype", "float16", "float64", "state.dtype must be one of float32, float16 (got 'float64')"),
        ("model.dropout", "0", "1", "model.dropout must be in [0, 1) (got 1.0)"),
        ("online.batch_size", "0", "-1", "online.batch_size must be >= 0 (got -1)"),
        ("online.recent_buffer", "1", "0", "online.recent_buffer must be >= 1 (got 0)"),
        ("online.dropout", "-1", "-0.5", "online.dropout must be in [0, 1) (or -1: the model's own) (got -0.5)"),
        ("online.confidence", "0.99", "1", "online.confidence must be in (0, 1) (got 1.0)"),
        ("online.http_port", "0", "65536", "online.http_port must be in [0, 65535] (got 65536)"),
        ("http.port", "65535", "0", "http.port must be in [1, 65535] (got 0)"),
        ("broker.controller_port", "0", "-1", "broker.controller_port must be in [0, 65535] (got -1)"),
    ],
)
def test_values_out_of_range_are_refused_with_key_rule_and_value(key: str, edge: str, beyond: str,
                                                                   message: str) -> None:
    load_config(overrides=[f"{key}={edge}"])  # the edge of the range is accepted
    with pytest.raises(ConfigError) as refused:
        load_config(overrides=[f"{key}={beyond}"])
    assert str(refused.value) == message


def test_a_bad_value_in_a_file_is_refused_like_an_override(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("online:\n  min_steps: 101\n")  # max_steps stays 100
    with pytest.raises(ConfigError) as refused:
        load_config(f)
    assert str(refused.value) == "online.min_steps must be <= online.max_steps (got 101 > 100)"
    assert load_config(f, ["online.max_steps=101"]).online.min_steps == 101


@pytest.mark.parametrize(
    ("overrides", "outcome"),
    [
        (["http.host=127.0.0.1"], "ok"),
        (["http.host=::1"], "ok"),
        (["http.host=localhost"], "ok"),
        (["http.host=0.0.0.0", "http.token=s3cret"], "ok"),
        (["http.host=0.0.0.0"], "refused"),
        (["http.host=10.1.2.3"], "refused"),
        (["http.host=worker.example.org"], "refused"),
        (["http.host=0.0.0.0", "http.allow_open=true"], "warned"),
        (["http.host=10.1.2.3", "http.allow_open=true"], "warned"),
    ],
)
def test_http_api_beyond_loopback_without_a_token_needs_the_explicit_opt_in(
        monkeypatch: pytest.MonkeyPatch, overrides: list[str], outcome: str) -> None:
    monkeypatch.delenv("LRUSTREAM_HTTP_TOKEN", raising=False)
    cfg = load_config(overrides=overrides)  # loading never refuses: only serving HTTP does
    host = cfg.http.host
    if outcome == "refused":
        with pytest.raises(ConfigError) as refused:
            check_http_exposure(cfg)
        assert str(refused.value).startswith(f"http.host={host} listens beyond loopback without http.token")
        assert "http.allow_open=true" in str(refused.value)
    elif outcome == "warned":
        warning = check_http_exposure(cfg)
        assert warning is not None and f"{host}:6066" in warning and "LRUSTREAM_HTTP_TOKEN" in warning
        assert f"{host}:6067" in (check_http_exposure(cfg, port=cfg.online.http_port) or "")  # the trainer's port
    else:
        assert check_http_exposure(cfg) is None


def test_an_empty_token_from_the_environment_guards_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # docker-compose passes ${LRUSTREAM_HTTP_TOKEN:-}: unset on the host means "" here, not a token.
    monkeypatch.setenv("LRUSTREAM_HTTP_TOKEN", "")
    cfg = load_config(overrides=["http.host=0.0.0.0"])
    assert cfg.http.token == "" and cfg.http.allow_open is False
    with pytest.raises(ConfigError, match=r"^http\.host=0\.0\.0\.0 listens beyond loopback without http\.token"):
        check_http_exposure(cfg)


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


@pytest.mark.parametrize("command", [["train", "--data", "nowhere"], ["worker"]], ids=["train", "worker"])
def test_a_command_that_builds_or_loads_a_model_refuses_an_unknown_model_name_first(command: list[str]) -> None:
    """The kernel's schema lists no models (it imports none): the model registry checks ``model.name``, in the CLI,
    before the command reads data or starts serving (tests/unit/models/test_models.py checks the message itself)."""
    bad = subprocess.run([sys.executable, "-m", "lrustream.cli", *command, "model.name=gru4rec"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith("error: model.name must be one of ") and "(got 'gru4rec')" in bad.stderr
    assert bad.stderr.strip().count("\n") == 0


# ----- the default file ------------------------------------------------------------------------------------------
def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf of a nested mapping."""
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    return {k: v for key, child in node.items() for k, v in _leaves(child, f"{prefix}{key}.").items()}


def _default_file_leaves() -> dict[str, Any]:
    return _leaves(OmegaConf.to_container(OmegaConf.load(DEFAULT_CONFIG), resolve=False))


def test_the_default_file_shows_every_schema_key_and_no_other() -> None:
    schema = _leaves(as_dict(Config()))
    assert sorted(_default_file_leaves()) == sorted(schema)


def test_the_default_file_values_are_the_schema_defaults_except_where_it_reads_the_environment() -> None:
    schema = _leaves(as_dict(Config()))
    differ = {key: (value, schema[key]) for key, value in _default_file_leaves().items()
              if not (isinstance(value, str) and "${" in value) and value != schema[key]}
    assert differ == {}, "configs/default.yaml disagrees with lrustream/kernel/config.py: {file: schema}"


def test_the_default_file_reads_these_environment_variables() -> None:
    interpolated = {key for key, value in _default_file_leaves().items() if isinstance(value, str) and "${" in value}
    assert interpolated == {"kafka.bootstrap_servers", "kafka.security.protocol", "kafka.security.sasl_password",
                            "http.token"}


def test_the_packaged_default_file_and_its_copy_in_configs_are_identical() -> None:
    assert DEFAULT_CONFIG.parent == Path(config_module.__file__).parent, "the default file ships in the package"
    assert (REPO / "configs" / "default.yaml").read_text() == DEFAULT_CONFIG.read_text(), (
        "configs/default.yaml is the user-facing copy of lrustream/kernel/default.yaml: "
        "cp lrustream/kernel/default.yaml configs/default.yaml")


def test_the_wheel_ships_the_default_file() -> None:
    package_data = re.search(r"^lrustream = \[(.*)\]", (REPO / "pyproject.toml").read_text(), re.M)
    assert package_data and '"kernel/default.yaml"' in package_data.group(1)


def test_load_config_works_from_a_folder_outside_the_repository(tmp_path: Path) -> None:
    script = ("from lrustream.kernel.config import load_config; "
              "print(load_config(overrides=['stream.top_k=3']).stream.top_k)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LRUSTREAM_KAFKA_BOOTSTRAP", None)
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "3"

