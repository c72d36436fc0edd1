"""A real Prometheus (Debian's `prometheus` package) scraping a real worker and a real trainer, both guarded by
http.token, with the shipped scrape settings and alert rules: both targets up, worker and trainer metrics
queried through Prometheus's HTTP API, and the shipped worker-down alert firing once the worker stops."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from lrustream.broker import free_port
from lrustream.kernel.config import Config, load_config
from models.store import ModelStore
from stream.topics import create_topics
from tests.conftest import REPO, prometheus_tool
from tests.streamkit import WorkerProcess, produce_events, publish_model, recommendations, synthetic_events
from trainer.online import TrainerLoop

PROMETHEUS_DIR = REPO / "monitoring" / "prometheus"
TOKEN = "prometheus-test-token"
EVENTS = 50
T = TypeVar("T")


def scrape_config(worker_port: int, trainer_port: int, token_file: Path) -> dict[str, Any]:
    """The shipped prometheus.yml with its targets pointed at this test's processes and its token file at this
    test's, scraping and evaluating every second (the shipped 15 s would make the test wait minutes)."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    ports = {"lrustream-worker": worker_port, "lrustream-trainer": trainer_port}
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
        job["authorization"]["credentials_file"] = str(token_file)
    return config


def fast_alerts() -> str:
    """The shipped alerts.yml with the worker-down rule's `for:` cut from minutes to 3 s, so that the test sees
    it fire within seconds; every other rule as shipped."""
    text = (PROMETHEUS_DIR / "alerts.yml").read_text()
    fast, n = re.subn(r"(alert: LrustreamWorkerDown\n\s+expr: .*\n\s+for:) \S+", r"\1 3s", text)
    assert n == 1, "the worker-down rule is no longer shaped as this test expects"
    return fast


@dataclass
class PrometheusServer:
    """`prometheus` in a subprocess on a free port, with a configuration written into ``root``."""

    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log: Any = None

    def start(self, config: dict[str, Any], alerts: str) -> PrometheusServer:
        (self.root / "prometheus.yml").write_text(yaml.safe_dump(config))
        (self.root / "alerts.yml").write_text(alerts)
        self.log = (self.root / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [prometheus_tool("prometheus"), f"--config.file={self.root / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.root / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def api(self, path: str, **params: str) -> Any:
        """The ``data`` of a Prometheus HTTP API answer (None while the server does not answer)."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError:
            raise  # Prometheus answered: a refused query is the test's mistake, not a wait
        except (urllib.error.URLError, ConnectionError):
            return None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return (self.api("query", query=expr) or {}).get("result", [])

    def health_of_targets(self) -> dict[str, str]:
        """job -> health of its target ("up", "down", "unknown")."""
        active = (self.api("targets") or {}).get("activeTargets", [])
        return {t["labels"]["job"]: t["health"] for t in active}

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in (self.api("alerts") or {}).get("alerts", []) if a["labels"]["alertname"] == name]

    def tail(self) -> str:
        return "\n".join((self.root / "prometheus.log").read_text(errors="replace").splitlines()[-30:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.log is not None:
            self.log.close()


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, server: PrometheusServer) -> T:
    """``probe()``'s first true answer, polled every 0.5 s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if got := probe():
            return got
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout_s} s\n{server.tail()}")


def status_without_token(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def guarded(kafka_overrides: list[str]) -> tuple[list[str], Config]:
    """Overrides and config with an HTTP token and the trainer's port chosen by the system."""
    overrides = [*kafka_overrides, f"http.token={TOKEN}", "online.http_port=0"]
    cfg = load_config(overrides=overrides)
    create_topics(cfg)
    return overrides, cfg


def test_prometheus_scrapes_worker_and_trainer_and_fires_worker_down(guarded: tuple[list[str], Config],
                                                                     tmp_path: Path) -> None:
    overrides, cfg = guarded
    version = publish_model(cfg)
    produce_events(cfg, synthetic_events(EVENTS, users=5))
    worker = WorkerProcess(overrides, tmp_path / "worker.log").start()
    trainer = TrainerLoop(cfg, log_line=print)
    assert trainer.http is not None
    server = PrometheusServer(tmp_path)
    try:
        worker.wait_healthy()
        recommendations(cfg, expect=EVENTS)
        trainer_url = f"http://127.0.0.1:{trainer.http.port}/metrics"
        assert status_without_token(trainer_url) == 401, "the trainer's /metrics wants the token"
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        server.start(scrape_config(worker.port, trainer.http.port, token_file), fast_alerts())

        wait_for("both targets up", lambda: server.health_of_targets() == {
            "lrustream-worker": "up", "lrustream-trainer": "up"}, 60, server)
        served = wait_for("the worker's recommendations in Prometheus", lambda: server.query(
            'lrustream_recommendations_total{job="lrustream-worker"}'), 30, server)
        assert float(served[0]["value"][1]) == EVENTS
        model = server.query("lrustream_model_info == 1")
        assert [m["metric"]["version"] for m in model] == [version]
        health = server.query('lrustream_health{job="lrustream-worker"} == 1')
        assert [h["metric"]["state"] for h in health] == ["ok"]
        trainer_health = server.query('lrustream_trainer_health{job="lrustream-trainer"} == 1')
        assert [h["metric"]["state"] for h in trainer_health] == ["ok"]
        published = server.query("lrustream_trainer_last_published_timestamp_seconds")
        created = ModelStore(cfg.model_store.dir).info(version).created
        assert float(published[0]["value"][1]) == pytest.approx(created), "the serving version's creation"
        assert server.alerts("LrustreamWorkerDown") == [], "no worker-down alert while the worker answers"

        worker.stop()
        firing = wait_for("LrustreamWorkerDown firing", lambda: [
            a for a in server.alerts("LrustreamWorkerDown") if a["state"] == "firing"], 60, server)
        assert firing[0]["labels"]["instance"] == f"127.0.0.1:{worker.port}"
        assert firing[0]["labels"]["severity"] == "critical"
        assert server.health_of_targets() == {"lrustream-worker": "down", "lrustream-trainer": "up"}
    finally:
        server.stop()
        trainer.close()
        worker.stop()
