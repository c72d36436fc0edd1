"""Kafka security settings pass through from config to every client we create; secrets never reach logs."""

from __future__ import annotations

import logging

import pytest

from lrustream.config import load_config
from stream.kafka import faust_broker_settings, librdkafka_config, producer_config, redacted

SASL_SSL = ["kafka.security.protocol=SASL_SSL", "kafka.security.sasl_mechanism=SCRAM-SHA-512",
            "kafka.security.sasl_username=svc", "kafka.security.sasl_password=hunter2",
            "kafka.security.ssl_check_hostname=false"]


def test_sasl_ssl_settings_reach_librdkafka_clients() -> None:
    cfg = load_config(overrides=SASL_SSL)
    for conf in (librdkafka_config(cfg), producer_config(cfg), librdkafka_config(cfg, **{"group.id": "g"})):
        assert conf["security.protocol"] == "SASL_SSL"
        assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
        assert conf["sasl.username"] == "svc" and conf["sasl.password"] == "hunter2"
        assert conf["ssl.endpoint.identification.algorithm"] == "none"


def test_sasl_settings_reach_faust() -> None:
    cfg = load_config(overrides=SASL_SSL)
    creds = faust_broker_settings(cfg)["broker_credentials"]
    assert creds.username == "svc" and creds.password == "hunter2"
    assert str(creds.mechanism).endswith("SCRAM_SHA_512") or "SCRAM-SHA-512" in str(creds.mechanism)
    assert creds.ssl_context is not None and creds.ssl_context.check_hostname is False


def test_plaintext_needs_no_credentials() -> None:
    cfg = load_config()
    assert "broker_credentials" not in faust_broker_settings(cfg)
    assert "sasl.password" not in librdkafka_config(cfg)


def test_redacted_masks_every_secret(caplog: pytest.LogCaptureFixture) -> None:
    conf = librdkafka_config(load_config(overrides=SASL_SSL))
    logging.getLogger("t").warning("client config %s", redacted(conf))
    assert "hunter2" not in caplog.text and "***" in caplog.text


def test_every_kafka_client_in_the_code_is_built_from_our_config_mappings() -> None:
    """No client sneaks past the security mapping: each Producer/Consumer/AdminClient( call passes a mapping
    made by stream.kafka (or a dict extending one). lrustream/broker is exempt: it probes the embedded
    broker, which is PLAINTEXT on loopback by design."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    bad = []
    for pkg in ("models", "state", "stream", "trainer", "lrustream"):
        for path in (root / pkg).rglob("*.py"):
            if path.parent.name == "broker":
                continue
            for line in path.read_text().splitlines():
                m = re.search(r"\b(Producer|Consumer|AdminClient)\((.*)", line)
                uses_ours = re.search(r"config\(|conf\b|\*\*self\.conf|\*\*conf", m.group(2)) if m else None
                if m and "import" not in line and not uses_ours:
                    bad.append(f"{path.name}: {line.strip()}")
    assert bad == []


@pytest.mark.parametrize(("host", "token", "warned"), [
    ("127.0.0.1", None, False), ("::1", None, False), ("localhost", None, False),
    ("0.0.0.0", None, True), ("10.1.2.3", None, True), ("0.0.0.0", "s3cret", False)])
def test_http_api_open_beyond_loopback_without_a_token_is_called_out(host: str, token: str | None,
                                                                      warned: bool) -> None:
    from stream.app import open_http_warning

    overrides = [f"http.host={host}"] + ([f"http.token={token}"] if token else [])
    warning = open_http_warning(load_config(overrides=overrides))
    assert (warning is not None) == warned
    assert warning is None or ("LRUSTREAM_HTTP_TOKEN" in warning and host in warning)
