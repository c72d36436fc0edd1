"""The monitoring an operator runs (monitoring/, docker-compose.yml's profile `monitoring`): Prometheus's
configuration and alert rules pass promtool's checks and the rules' unit tests, every metric the rules and the
Grafana dashboard query is one the worker or the trainer exports, the dashboard is valid and each panel queries
valid PromQL, and the compose profile wires Prometheus and Grafana to the files and services they need.

promtool comes from Debian's `prometheus` package (`make prometheus`): missing, these tests skip on a developer's
machine and fail when CI is set."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from lrustream.kernel.config import load_config
from stream.metrics import WorkerMetrics
from tests.conftest import REPO
from trainer.service import TrainerMetrics

PROMETHEUS_DIR = REPO / "monitoring" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
GRAFANA_DIR = REPO / "monitoring" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "lrustream.json"
COMPOSE = REPO / "docker-compose.yml"
WORKER_JOB, TRAINER_JOB = "lrustream-worker", "lrustream-trainer"
BUILT_IN = {"up"}  # series Prometheus writes itself for each target
# names that look like metrics in PromQL but are not: operators, keywords, special values
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                "group_right", "inf", "nan", "Inf", "NaN", "atan2"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel."""
    return [(panel["title"], target.get("expr", "")) for panel in board["panels"]
            for target in panel.get("targets", [])]


def without_variables(expr: str) -> str:
    """A dashboard query as Prometheus would receive it with every instance selected."""
    return expr.replace("$__rate_interval", "5m").replace("$instance", ".*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers left once strings, label matchers, range
    selectors and grouping clauses are taken out, that are neither called (functions) nor PromQL words."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    found = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(\s*\()?", e):
        if m.group(2) is None and m.group(1) not in PROMQL_WORDS:
            found.add(m.group(1))
    return found


def exported(registry: CollectorRegistry) -> set[str]:
    """Every series name a registry exposes, with the suffixes prometheus_client adds per metric type (a labelled
    metric shows no sample before its first use, so names come from the families, not from the samples)."""
    return {family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]}


@pytest.fixture(scope="module")
def known_metrics() -> set[str]:
    return exported(WorkerMetrics().registry) | exported(TrainerMetrics().registry) | BUILT_IN


def unknown(exprs: list[str], known: set[str]) -> dict[str, set[str]]:
    return {expr: names - known for expr in exprs if (names := metric_names(expr)) - known}


def compose_services() -> dict[str, Any]:
    return load_yaml(COMPOSE)["services"]


def scrape_job(name: str) -> dict[str, Any]:
    jobs = {job["job_name"]: job for job in load_yaml(CONFIG)["scrape_configs"]}
    return jobs[name]


def with_token_file(config: dict[str, Any], token_file: Path) -> dict[str, Any]:
    """The configuration with every job's bearer token read from ``token_file``."""
    for job in config["scrape_configs"]:
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(token_file)
    return config


# ----- Prometheus: configuration and rules --------------------------------------------------------------------
def test_the_prometheus_configuration_passes_promtool(promtool: str, tmp_path: Path) -> None:
    """The shipped file reads its token where the compose profile writes it; promtool checks that the file
    exists, so the check runs on a copy that reads a token file of this test's."""
    for job in load_yaml(CONFIG)["scrape_configs"]:
        assert job["authorization"]["credentials_file"] == "/prometheus/.http-token", job["job_name"]
    token = tmp_path / "token"
    token.write_text("secret")
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    (tmp_path / CONFIG.name).write_text(yaml.safe_dump(with_token_file(load_yaml(CONFIG), token)))
    out = run(promtool, "check", "config", str(tmp_path / CONFIG.name))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 1 rule files found" in out.stdout


def test_the_alert_rules_pass_promtool(promtool: str) -> None:
    out = run(promtool, "check", "rules", str(ALERTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_the_alert_rules_unit_tests_pass(promtool: str) -> None:
    out = run(promtool, "test", "rules", ALERTS_TEST.name, cwd=PROMETHEUS_DIR)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_the_unit_tests_catch_a_rule_that_fires_too_late(promtool: str, tmp_path: Path) -> None:
    """The rule tests can fail: the worker-down rule waiting 10 minutes instead of 2 is caught."""
    text = ALERTS.read_text()
    slow = re.sub(r"(alert: LrustreamWorkerDown\n\s+expr: .*\n\s+for:) 2m", r"\1 10m", text)
    assert slow != text
    (tmp_path / ALERTS.name).write_text(slow)
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    out = run(promtool, "test", "rules", ALERTS_TEST.name, cwd=tmp_path)
    assert out.returncode != 0 and "LrustreamWorkerDown" in out.stdout + out.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = load_yaml(ALERTS_TEST)
    assert tests["rule_files"] == [ALERTS.name]
    fired: dict[str, list[bool]] = {}
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            fired.setdefault(check["alertname"], []).append(bool(check.get("exp_alerts")))
    for rule in rules():
        seen = fired.get(rule["alert"], [])
        assert True in seen, f"{rule['alert']}: no test shows it firing"
        assert False in seen, f"{rule['alert']}: no test shows it silent"


def test_every_alert_says_what_happened_what_to_do_and_how_bad() -> None:
    for rule in rules():
        assert rule["alert"].startswith("Lrustream"), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"].split()) >= 15, f"{rule['alert']}: say what to do"


def test_alert_jobs_are_the_scrape_jobs() -> None:
    jobs = {job["job_name"] for job in load_yaml(CONFIG)["scrape_configs"]}
    assert jobs == {WORKER_JOB, TRAINER_JOB}
    named = {job for rule in rules() for job in re.findall(r'job="([^"]+)"', rule["expr"])}
    assert named == jobs, "a worker-down and a trainer-down rule, on the jobs Prometheus scrapes"


# ----- metric names -----------------------------------------------------------------------------------------
def test_metric_names_are_read_from_promql_and_an_unknown_one_is_reported(known_metrics: set[str]) -> None:
    expr = ('histogram_quantile(0.99, sum by (job, le) (rate(lrustream_request_seconds_bucket{a="b c"}[5m])))'
            ' > 1e3 and on (job) up{job="x"} == 0 or time() - lrustream_nonexistent offset 5m')
    assert metric_names(expr) == {"lrustream_request_seconds_bucket", "up", "lrustream_nonexistent"}
    assert unknown([expr], known_metrics) == {expr: {"lrustream_nonexistent"}}


def test_the_registries_give_every_suffix_prometheus_will_see(known_metrics: set[str]) -> None:
    assert {"lrustream_events_total", "lrustream_dlq_total", "lrustream_consumer_lag", "lrustream_health",
            "lrustream_event_to_recommendation_seconds_bucket", "lrustream_trainer_refused_in_a_row",
            "lrustream_trainer_last_published_timestamp_seconds", "lrustream_trainer_health"} <= known_metrics
    assert "lrustream_events" not in known_metrics, "a counter is exposed as _total only"


def test_every_metric_the_alert_rules_read_is_exported(known_metrics: set[str]) -> None:
    exprs = [rule["expr"] for rule in rules()]
    assert all(metric_names(e) for e in exprs), "every rule reads a metric"
    assert unknown(exprs, known_metrics) == {}


def test_every_metric_the_dashboard_reads_is_exported(known_metrics: set[str]) -> None:
    exprs = [expr for _, expr in queries(dashboard())]
    assert unknown(exprs, known_metrics) == {}
    templated = [v["query"]["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    assert unknown([q.removeprefix("label_values(").rsplit(",", 1)[0] for q in templated], known_metrics) == {}


# ----- Grafana ------------------------------------------------------------------------------------------------
def test_the_dashboard_is_a_grafana_dashboard_whose_every_panel_has_a_query() -> None:
    board = dashboard()
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board["uid"] == "lrustream" and board["title"]
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"]), "panel ids are unique"
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert all("$instance" in expr for _, expr in queries(board)), "every query follows the instance choice"


def test_the_dashboard_shows_what_an_operator_looks_at() -> None:
    exprs = " ".join(expr for _, expr in queries(dashboard()))
    for metric in ("lrustream_events_total", "lrustream_recommendations_total", "lrustream_consumer_lag",
                   "lrustream_event_to_recommendation_seconds_bucket", "lrustream_dlq_total", "lrustream_health",
                   "lrustream_model_info", "lrustream_trainer_published_total", "lrustream_trainer_refused_total",
                   "lrustream_trainer_gate_candidate", "lrustream_live_hits_total", "lrustream_live_events_total",
                   "lrustream_shadow_hit_rate", "lrustream_trainer_live_hit_rate", "lrustream_request_seconds_bucket"):
        assert metric in exprs, metric
    assert "histogram_quantile(0.99" in exprs and "histogram_quantile(0.5" in exprs


def test_every_dashboard_query_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses each query as a recording rule's expression (Grafana's variables filled in)."""
    exprs = [without_variables(expr) for _, expr in queries(dashboard())]
    recorded = [{"record": f"dashboard:query{i}", "expr": expr} for i, expr in enumerate(exprs)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    out = run(promtool, "check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    path.write_text(yaml.safe_dump({"groups": [{"name": "bad", "rules": [{"record": "x", "expr": "sum(("}]}]}))
    assert run(promtool, "check", "rules", str(path)).returncode != 0, "promtool refuses a broken query"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    sources = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert [s["type"] for s in sources] == ["prometheus"]
    providers = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "lrustream.yml")["providers"]
    assert [p["type"] for p in providers] == ["file"]


# ----- the compose profile ------------------------------------------------------------------------------------
def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path of a service's bind mounts ("./x:/y[:ro]")."""
    out = {}
    for volume in service.get("volumes") or []:
        parts = str(volume).split(":")
        if parts[0].startswith("."):
            out[parts[1]] = parts[0]
    return out


@pytest.mark.parametrize("name", ["prometheus", "grafana"])
def test_monitoring_services_start_only_with_the_profile_from_a_pinned_image(name: str) -> None:
    service = compose_services()[name]
    assert service["profiles"] == ["monitoring"]
    image, _, tag = service["image"].partition(":")
    assert image in {"prom/prometheus", "grafana/grafana"}
    assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{service['image']}: pin a release"
    assert all(str(p).startswith("127.0.0.1:") for p in service["ports"]), "published on loopback only"
    for target, source in mounts(service).items():
        assert (REPO / source).exists(), f"{name} mounts {source} at {target}: missing"


def test_the_app_services_stay_out_of_the_profile() -> None:
    services = compose_services()
    assert all("profiles" not in services[name] for name in ("kafka", "worker", "trainer"))


def test_compose_prometheus_reads_the_shipped_files_and_writes_the_token_it_sends() -> None:
    service = compose_services()["prometheus"]
    assert mounts(service) == {"/etc/prometheus": "./monitoring/prometheus"}
    command = " ".join(service["command"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in command
    assert '"$$LRUSTREAM_HTTP_TOKEN" > /prometheus/.http-token' in command, "the file prometheus.yml reads"
    assert service["environment"]["LRUSTREAM_HTTP_TOKEN"] == "${LRUSTREAM_HTTP_TOKEN:-}"


def test_compose_prometheus_scrapes_the_worker_and_trainer_services_on_their_ports() -> None:
    services, cfg = compose_services(), load_config()
    worker = scrape_job(WORKER_JOB)["dns_sd_configs"]
    assert worker == [{"names": ["worker"], "type": "A", "port": cfg.http.port}]
    assert str(cfg.http.port) in str(services["worker"]["ports"][0]).rsplit(":", 1)[1]
    assert scrape_job(TRAINER_JOB)["static_configs"] == [{"targets": [f"trainer:{cfg.online.http_port}"]}]
    assert str(services["trainer"]["ports"][0]).endswith(f":{cfg.online.http_port}")
    for job in (WORKER_JOB, TRAINER_JOB):
        assert scrape_job(job).get("metrics_path", "/metrics") == "/metrics"


def test_compose_grafana_is_provisioned_from_the_shipped_files() -> None:
    services = compose_services()
    grafana = mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == "./monitoring/grafana/provisioning"
    dashboards = next(t for t, s in grafana.items() if s == "./monitoring/grafana/dashboards")
    provider = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "lrustream.yml")["providers"][0]
    assert provider["options"]["path"] == dashboards
    url = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]["url"]
    assert url == "http://prometheus:9090" and str(services["prometheus"]["ports"][0]).endswith(":9090")
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards}/{DASHBOARD.name}"
