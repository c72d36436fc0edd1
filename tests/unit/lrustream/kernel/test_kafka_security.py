"""Kafka security settings pass through from config to every client we create; secrets never reach logs
(lrustream/kernel/kafka.py, no broker; the real SASL broker is in tests/integration/test_security.py)."""

from __future__ import annotations

import logging

import pytest

from lrustream.kernel.config import Config, ConfigError, load_config, sasl_mechanism
from lrustream.kernel.kafka import faust_broker_settings, librdkafka_config, producer_config, redacted
from tests.conftest import REPO

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


def _faust_mechanism(cfg: Config) -> str | None:
    creds = faust_broker_settings(cfg).get("broker_credentials")
    mechanism = getattr(creds, "mechanism", None)  # SSLCredentials have none
    return None if mechanism is None else str(mechanism.value)


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_both_clients_get_the_one_resolved_sasl_mechanism(protocol: str, mechanism: str) -> None:
    """librdkafka and Faust authenticate the same way: the configured mechanism under SASL_*, none otherwise
    (before, librdkafka alone got the mechanism under PLAINTEXT/SSL, and neither shared a default)."""
    cfg = load_config(overrides=[f"kafka.security.protocol={protocol}", f"kafka.security.sasl_mechanism={mechanism}",
                                 "kafka.security.sasl_username=svc", "kafka.security.sasl_password=hunter2"])
    expected = mechanism if protocol.startswith("SASL_") else None
    assert librdkafka_config(cfg).get("sasl.mechanism") == _faust_mechanism(cfg) == sasl_mechanism(cfg) == expected
    assert ("sasl.password" in librdkafka_config(cfg)) == (expected is not None)


@pytest.mark.parametrize(("overrides", "message"), [
    (["kafka.security.protocol=SASL_PLAINTEXT"],
     "kafka.security.sasl_mechanism is required with kafka.security.protocol=SASL_PLAINTEXT "
     "(one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)"),
    (["kafka.security.protocol=SASL_SSL", "kafka.security.sasl_mechanism=GSSAPI"],
     "kafka.security.sasl_mechanism must be one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 (got 'GSSAPI')"),
    (["kafka.security.protocol=sasl_ssl"],
     "kafka.security.protocol must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL (got 'sasl_ssl')"),
    (["kafka.security.protocol=SASL_SSL", "kafka.security.sasl_mechanism=PLAIN",
      "kafka.security.sasl_password=hunter2"],
     "kafka.security.sasl_username is required with kafka.security.sasl_mechanism=PLAIN"),
    (["kafka.security.protocol=SASL_SSL", "kafka.security.sasl_mechanism=SCRAM-SHA-256",
      "kafka.security.sasl_username=svc"],
     "kafka.security.sasl_password is required with kafka.security.sasl_mechanism=SCRAM-SHA-256 "
     "(LRUSTREAM_KAFKA_SASL_PASSWORD sets it)"),
])
def test_unusable_kafka_security_is_refused_at_load_naming_the_key(monkeypatch: pytest.MonkeyPatch,
                                                                  overrides: list[str], message: str) -> None:
    monkeypatch.delenv("LRUSTREAM_KAFKA_SASL_PASSWORD", raising=False)
    with pytest.raises(ConfigError) as refused:
        load_config(overrides=overrides)
    assert str(refused.value) == message


def test_a_config_built_in_code_gets_no_client_default_mechanism_either() -> None:
    """A Config made without load_config (tests, embedding code) is checked by the client mappings themselves:
    SASL without a mechanism is refused by both, never GSSAPI for one client and PLAIN for the other."""
    cfg = Config()
    cfg.kafka.security.protocol = "SASL_SSL"
    cfg.kafka.security.sasl_username, cfg.kafka.security.sasl_password = "svc", "hunter2"
    for mapping in (librdkafka_config, faust_broker_settings):
        with pytest.raises(ConfigError, match=r"^kafka\.security\.sasl_mechanism is required"):
            mapping(cfg)


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
    made by lrustream.kernel.kafka (or a dict extending one). lrustream/broker is exempt: it probes the embedded
    broker, which is PLAINTEXT on loopback by design."""
    import re

    root = REPO
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


