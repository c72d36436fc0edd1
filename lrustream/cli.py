"""The ``lrustream`` command. Thin: parse arguments, load config, call the package that does the work.

Every command takes ``--config FILE`` and trailing ``key=value`` overrides. Errors a user can fix print one
line on stderr and exit non-zero (2 for bad configuration or arguments, 1 for everything else); ``broker status``
and ``status`` exit 3 when the broker does not answer, and Ctrl-C exits 130. docs/cli.md lists the commands and
these codes.
"""

from __future__ import annotations

import getpass
import importlib.metadata
import json
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lrustream.broker import BrokerStatus, LocalCluster, ensure_env_java_home
from lrustream.kernel.config import Config, load_config, to_yaml
from lrustream.kernel.errors import LrustreamError, UsageError

if TYPE_CHECKING:
    from models.store import VersionInfo
    from stream.versions import TopicView, VersionLog

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="lrustream: a streaming, online-learning sequential recommender on Kafka.")
broker_app = typer.Typer(no_args_is_help=True, help="The embedded local Kafka broker (KRaft, loopback).")
config_app = typer.Typer(no_args_is_help=True, help="Inspect the merged configuration.")
topics_app = typer.Typer(no_args_is_help=True, help="Create and list lrustream's Kafka topics.")
app.add_typer(broker_app, name="broker")
app.add_typer(config_app, name="config")
app.add_typer(topics_app, name="topics")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (default: the packaged defaults, as in "
                                                     "configs/default.yaml).")
]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="key=value overrides, e.g. broker.port=19092", show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of text.")]


def package_version() -> str:
    """The installed package's version; "unknown" where lrustream runs from a source tree never installed."""
    try:
        return importlib.metadata.version("lrustream")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _print_version(wanted: bool) -> None:
    if wanted:
        typer.echo(f"lrustream {package_version()}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """lrustream: a streaming, online-learning sequential recommender on Kafka."""


def echo_json(document: Any) -> None:
    typer.echo(json.dumps(document, indent=2, ensure_ascii=False))


def cfg_of(config: Path | None, overrides: list[str] | None) -> Config:
    return load_config(config, overrides or [])


def model_cfg_of(config: Path | None, overrides: list[str] | None) -> Config:
    """``cfg_of`` for the commands that build or load a model: ``model.name`` is also checked against the model
    registry (a one-line ConfigError naming the choices, before anything starts; the kernel imports no model)."""
    cfg = cfg_of(config, overrides)
    from models import model_config

    model_config(cfg.model)
    return cfg


def echo(msg: str) -> None:
    typer.echo(msg)


# ----- broker ------------------------------------------------------------------------------------------------
NodesOpt = Annotated[int | None, typer.Option("--nodes", help="nodes of the local cluster (default broker.nodes)",
                                            show_default=False)]
NodeOpt = Annotated[int | None, typer.Option("--node", help="only this node of the cluster (1 to --nodes)",
                                           show_default=False)]


def local_kafka(cfg: Any, nodes: int | None) -> LocalCluster:
    """The local broker or cluster this configuration (and ``--nodes``) describes."""
    return LocalCluster.from_config(cfg, nodes)


@broker_app.command("start")
def broker_start(config: ConfigOpt = None, overrides: Overrides = None, nodes: NodesOpt = None,
                 node: NodeOpt = None) -> None:
    """Format storage if needed, start the broker (every node of the cluster, or one), return when each answers.
    Safe to run twice."""
    cluster = local_kafka(cfg_of(config, overrides), nodes)
    chosen = [cluster.node(node)] if node else cluster.nodes
    already = {n.node_id for n in chosen if n.status(1.0).running}
    cluster.start(node)
    for n in chosen:
        status = n.status()
        echo(_node_prefix(cluster, n.node_id) + ("already running: " if n.node_id in already else "started: ")
             + status.line())
    if len(cluster.nodes) > 1 and not node:
        echo(f"bootstrap: {cluster.bootstrap}")


def _node_prefix(cluster: LocalCluster, node_id: int) -> str:
    return f"node {node_id}: " if len(cluster.nodes) > 1 else ""


@broker_app.command("stop")
def broker_stop(config: ConfigOpt = None, overrides: Overrides = None, nodes: NodesOpt = None,
                node: NodeOpt = None) -> None:
    """Stop the broker (every node, or one) the data dir's pid files name (never another process)."""
    cluster = local_kafka(cfg_of(config, overrides), nodes)
    chosen = [cluster.node(node)] if node else list(reversed(cluster.nodes))
    for n in chosen:
        echo(_node_prefix(cluster, n.node_id) + ("stopped" if n.stop() else "broker was not running"))


@broker_app.command("status")
def broker_status(config: ConfigOpt = None, overrides: Overrides = None, as_json: JsonOpt = False,
                  nodes: NodesOpt = None) -> None:
    """Exit 0 when our broker (every node of the cluster) runs and answers, 3 otherwise (LSB convention).
    --json: {"running", "answering", "pid", "bootstrap"}; on a cluster also "nodes", one such object per node."""
    cluster = local_kafka(cfg_of(config, overrides), nodes)
    statuses = cluster.status()
    if as_json:
        echo_json(broker_document(statuses))
    else:
        for status in statuses:
            echo(_node_prefix(cluster, status.node_id) + status.line())
    raise typer.Exit(0 if all(s.running and s.answering for s in statuses) else 3)


def broker_document(statuses: list[BrokerStatus]) -> dict[str, Any]:
    """``broker status --json``: whether the broker process runs (its pid file names a live process), whether it
    answers metadata requests, its pid (null when not running) and its bootstrap address. On a cluster: running
    and answering when every node does, pid null, the bootstrap list, and ``nodes``, one such object per node
    with its ``node`` id."""
    def one(status: BrokerStatus) -> dict[str, Any]:
        return {"running": status.running, "answering": status.answering, "pid": status.pid,
                "bootstrap": status.bootstrap}

    if len(statuses) == 1:
        return one(statuses[0])
    return {"running": all(s.running for s in statuses), "answering": all(s.answering for s in statuses),
            "pid": None, "bootstrap": ",".join(s.bootstrap for s in statuses),
            "nodes": [{"node": s.node_id, **one(s)} for s in statuses]}


@broker_app.command("logs")
def broker_logs(config: ConfigOpt = None, overrides: Overrides = None, nodes: NodesOpt = None,
                node: NodeOpt = None,
                lines: Annotated[int, typer.Option("--lines", "-n", help="last lines of each log")] = 40) -> None:
    """The last lines of the broker's log (each node's, or one node's)."""
    cluster = local_kafka(cfg_of(config, overrides), nodes)
    for n in [cluster.node(node)] if node else cluster.nodes:
        try:
            tail = n.log_file.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            tail = ["(no log yet)"]
        if len(cluster.nodes) > 1:
            echo(f"==> node {n.node_id}: {n.log_file} <==")
        for line in tail:
            echo(line)


@broker_app.command("fetch")
def broker_fetch(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Resolve the Kafka jars from Maven Central into broker.jars_dir (cached; offline afterwards)."""
    jars = LocalCluster.from_config(cfg_of(config, overrides)).nodes[0].fetch_jars()
    echo(f"kafka jars ready in {jars}")


# ----- config / topics ---------------------------------------------------------------------------------------
@config_app.command("show")
def config_show(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Print the merged configuration (defaults <- file <- overrides) as YAML, after every check (``model.name``
    against the model registry too). Secrets are masked."""
    cfg = model_cfg_of(config, overrides)
    if cfg.kafka.security.sasl_password:
        cfg.kafka.security.sasl_password = "***"
    if cfg.http.token:
        cfg.http.token = "***"
    typer.echo(to_yaml(cfg), nl=False)


@topics_app.command("create")
def topics_create(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Create every topic lrustream uses (idempotent)."""
    from stream.topics import create_topics

    for name, what in create_topics(cfg_of(config, overrides)).items():
        echo(f"{name}: {what}")


@topics_app.command("list")
def topics_list(config: ConfigOpt = None, overrides: Overrides = None, as_json: JsonOpt = False) -> None:
    """Topics on the cluster with their partition counts. --json: {"topics": [{"name", "partitions"}]}."""
    from stream.topics import partition_counts

    counts = partition_counts(cfg_of(config, overrides))
    if as_json:
        echo_json(topics_document(counts))
    else:
        for name, n in sorted(counts.items()):
            echo(f"{name}\t{n}")


def topics_document(counts: dict[str, int]) -> dict[str, Any]:
    """``topics list --json``: the cluster's topics (Kafka's internal ``__`` ones left out), sorted by name, each
    with its partition count."""
    return {"topics": [{"name": name, "partitions": n} for name, n in sorted(counts.items())]}


# ----- offline models -------------------------------------------------------------------------------------------
def _names(model: str) -> list[str]:
    names = [m.strip() for m in model.split(",") if m.strip()]
    from models import MODEL_NAMES

    unknown = [m for m in names if m not in MODEL_NAMES]
    if unknown or not names:
        raise UsageError(f"--model must list models from {sorted(MODEL_NAMES)}, got {model!r}")
    return names


@app.command("train")
def train_cmd(
    data: Annotated[str, typer.Option(help="Data file/folder: sequences.txt, ratings.dat[.gz], u.data, *_item.txt.")],
    model: Annotated[str, typer.Option(help="Model(s) of models/registry.py, comma-separated, e.g. lrurec,sasrec.")
                     ] = "lrurec",
    max_minutes: Annotated[float | None, typer.Option(help="Stop each model after this many minutes.")] = None,
    out: Annotated[Path, typer.Option(help="Where history JSON and training-curve PNGs go.")] = Path(".lrustream/runs"),
    publish: Annotated[bool, typer.Option(help="Publish each trained model on the model-versions topic "
                                                "(workers serve it).")] = True,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted runs whose checkpoints are in --out.")
                      ] = False,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Train and evaluate offline (LRURec protocol); print the metric table; publish versions.

    A checkpoint is written at every validation and on Ctrl-C, so a long run can stop (or hit --max-minutes)
    and continue later with --resume."""
    from trainer.loop import Interrupted
    from trainer.offline import metric_table, run_offline

    cfg = model_cfg_of(config, overrides)
    versions = _version_log(cfg) if publish else None  # a broker that is away is found before training, not after
    try:
        results = run_offline(cfg, data, _names(model), out, max_minutes=max_minutes, publish=publish,
                              progress=sys.stderr.isatty(), log=echo, resume=resume, publisher=versions)
    except Interrupted as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(130) from None
    finally:
        if versions is not None:
            versions.close()
    echo("\ntest metrics (best validation checkpoint):")
    echo(metric_table({r.model: r.history.test for r in results}))


@app.command("evaluate")
def evaluate_cmd(
    data: Annotated[str, typer.Option(help="Data file or folder, as for train.")],
    version: Annotated[str | None, typer.Option(help="Model version (default: the serving one).")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Evaluate a stored model version with the LRURec protocol (leave-one-out, full ranking)."""
    from trainer.offline import metric_table, run_evaluate

    echo(metric_table(run_evaluate(model_cfg_of(config, overrides), data, version)))


models_app = typer.Typer(no_args_is_help=True, help="Model versions, as the model-versions topic holds them.")
app.add_typer(models_app, name="models")


def _version_log(cfg: Config) -> VersionLog:
    """The model-versions topic, read to its end into this host's model store (its cache)."""
    from models.store import ModelStore
    from stream.topics import create_topics
    from stream.versions import VersionLog

    create_topics(cfg)
    log = VersionLog(cfg, ModelStore(cfg.model_store.dir), who=f"{getpass.getuser()}@{socket.gethostname()}")
    log.catch_up()
    return log


@models_app.command("list")
def models_list(config: ConfigOpt = None, overrides: Overrides = None, as_json: JsonOpt = False) -> None:
    """Versions, newest last; * marks the one workers serve, - those whose weights gc removed. --json: {"serving",
    "current", "pinned", "shadow", "versions": [{"version", "model", "num_items", "parent", "created", "metrics",
    "serving", "collected"}], "refused": [{"version", "reason"}], "rollback": {"version", "by", "reason"} | null}."""
    with _version_log(cfg_of(config, overrides)) as log:
        document = versions_document(log.versions(), log.seen, log.store.collected)
    if as_json:
        echo_json(document)
    else:
        for line in versions_lines(document):
            echo(line)


def versions_document(versions: list[VersionInfo], seen: TopicView, collected: Callable[[str], bool]
                      ) -> dict[str, Any]:
    """``models list --json``: ``serving`` (the version workers serve), ``current``, ``pinned`` and ``shadow`` (the
    topic's pointers, null when unset); ``versions``, oldest first, each with ``version``, ``model``,
    ``num_items``, ``parent``, ``created`` (Unix seconds), ``metrics`` (name -> value), ``serving`` (true for the
    served one) and ``collected`` (its weights were removed by gc); ``refused``: versions never installed, each
    with ``version`` and ``reason``; ``rollback``: ``{version, by, reason}`` when the current version serves
    after a rollback, else null."""
    serving = seen.serving()
    current = seen.why.get("@current") or {}
    rollback = ({"version": current.get("version"), "by": current.get("by"), "reason": current["reason"]}
                if str(current.get("reason", "")).startswith("rollback") else None)
    return {
        "serving": serving, "current": seen.pointers["@current"], "pinned": seen.pointers["@pin"],
        "shadow": seen.pointers["@shadow"],
        "versions": [{"version": info.version, "model": info.model, "num_items": info.num_items,
                      "parent": info.parent, "created": info.created, "metrics": dict(info.metrics),
                      "serving": info.version == serving, "collected": collected(info.version)}
                     for info in versions],
        "refused": [{"version": version, "reason": why} for version, why in sorted(seen.refused.items())],
        "rollback": rollback,
    }


def versions_lines(document: dict[str, Any]) -> list[str]:
    """``models list`` as text, from :func:`versions_document`."""
    lines = []
    if document["pinned"]:
        lines.append(f"serving is pinned to {document['pinned']} (lrustream models unpin releases it)")
    for v in document["versions"]:
        mark = "*" if v["serving"] else "-" if v["collected"] else " "
        metrics = " ".join(f"{k}={value:.4f}" for k, value in sorted(v["metrics"].items()) if "10" in k)
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["created"]))
        lines.append(f"{mark} {v['version']}  {v['model']:7s} items={v['num_items']}  parent={v['parent']}  "
                     f"{created}  {metrics}")
    lines += [f"! {r['version']}  refused: {r['reason']}" for r in document["refused"]]
    if rollback := document["rollback"]:
        lines.append(f"{rollback['version']} serves after a rollback by {rollback['by'] or '?'}: "
                     f"{rollback['reason']}")
    return lines


@models_app.command("rollback")
def models_rollback(
    version: Annotated[str, typer.Argument(help="Version to serve again, e.g. v000003.")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Serve an earlier version (verified first) and pin it: the trainer's next versions are published but not
    served until `lrustream models unpin`. Every worker follows within seconds."""
    _pin(version, "rollback", config, overrides)


@models_app.command("pin")
def models_pin(
    version: Annotated[str, typer.Argument(help="Version to serve and keep serving, e.g. the one served now.")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Serve a version and keep serving it while the trainer goes on publishing."""
    _pin(version, "pin", config, overrides)


@models_app.command("push")
def models_push(
    version: Annotated[str, typer.Argument(help="A version of this host's model store, e.g. v000001.")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Publish a version this host's model store holds but the topic does not (e.g. one trained with
    --no-publish, or copied from another host's store) and serve it, on every worker."""
    cfg = model_cfg_of(config, overrides)
    with _version_log(cfg) as log:
        log.push(version)
    echo(f"{version} is on {cfg.topics.model_versions} and is the current version")


@models_app.command("shadow")
def models_shadow(
    version: Annotated[str, typer.Argument(help="Candidate version to score beside the serving one.")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Workers also score every event with a candidate version, off the output path, and report both versions'
    prequential hit rate side by side in /metrics (lrustream_shadow_hit_rate); promote with rollback/pin."""
    _shadow(version, config, overrides)
    echo(f"workers score {version} beside the serving version (lrustream models unshadow ends it)")


@models_app.command("unshadow")
def models_unshadow(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Stop shadow scoring."""
    _shadow(None, config, overrides)
    echo("shadow scoring stopped")


def _shadow(version: str | None, config: Path | None, overrides: list[str] | None) -> None:
    with _version_log(model_cfg_of(config, overrides)) as log:
        log.shadow(version)  # verified first: refuses a broken version or a bad name


@models_app.command("gc")
def models_gc(
    keep: Annotated[int | None, typer.Option(min=1, help="Newest versions to keep loadable "
                                                        "(default: model_store.keep_versions).")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Remove the weights of older versions on every host (the serving, pinned and shadow ones always stay);
    their vocabularies stay, because stored states name them. The trainer does this after each published
    round."""
    cfg = cfg_of(config, overrides)
    with _version_log(cfg) as log:
        collected = log.gc(keep or cfg.model_store.keep_versions)
    echo(f"removed the weights of {len(collected)} versions: {' '.join(collected)}" if collected
         else "nothing to collect")
    if log.strays_removed:
        echo(f"removed {log.strays_removed} chunks of publishes that never completed")


@models_app.command("unpin")
def models_unpin(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Release the pin: the trainer's next published version is served again."""
    with _version_log(cfg_of(config, overrides)) as log:
        was = log.unpin()
    echo(f"unpinned {was}; the next published version will be served" if was else "nothing was pinned")


items_app = typer.Typer(no_args_is_help=True, help="Catalogue control: block and unblock items on every worker.")
app.add_typer(items_app, name="items")
ItemArg = Annotated[str, typer.Argument(help="The item id, as events carry it.")]


@items_app.command("block")
def items_block(item: ItemArg, config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """No recommendation emitted after a worker has read this (seconds) holds the item, on every worker."""
    _set_item_status(item, "blocked", config, overrides)


@items_app.command("unblock")
def items_unblock(item: ItemArg, config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Let the item be recommended again."""
    _set_item_status(item, "active", config, overrides)


@items_app.command("list")
def items_list(config: ConfigOpt = None, overrides: Overrides = None, as_json: JsonOpt = False) -> None:
    """The items blocked now, one per line, as the items topic says. --json: {"topic", "blocked"}."""
    from stream.catalogue import read_blocked

    cfg = cfg_of(config, overrides)
    blocked = read_blocked(cfg)
    if as_json:
        echo_json(blocked_document(cfg.topics.items, blocked))
    else:
        for item in sorted(blocked):
            echo(item)


def blocked_document(topic: str, blocked: set[str]) -> dict[str, Any]:
    """``items list --json``: the items topic read and the item ids it blocks now, sorted."""
    return {"topic": topic, "blocked": sorted(blocked)}


def _set_item_status(item: str, status: str, config: Path | None, overrides: list[str] | None) -> None:
    from stream.catalogue import set_status
    from stream.topics import create_topics

    cfg = cfg_of(config, overrides)
    create_topics(cfg)
    set_status(cfg, item, status, by=f"{getpass.getuser()}@{socket.gethostname()}")
    echo(f"{item} is {status} on {cfg.topics.items}; workers apply it within seconds")


def _pin(version: str, reason: str, config: Path | None, overrides: list[str] | None) -> None:
    cfg = model_cfg_of(config, overrides)
    with _version_log(cfg) as log:
        log.pin(version, reason)  # verified first: refuses a broken version or a bad name
    echo(f"serving version is now {version}, pinned (lrustream models unpin releases it); every worker follows "
         f"{cfg.topics.model_versions}")


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print numbers.")
app.add_typer(bench_app, name="bench")


@bench_app.command("models")
def bench_models(
    lengths: Annotated[str, typer.Option(help="History lengths for the step benchmark.")] = "50,200,800,3200",
    data: Annotated[str | None, typer.Option(help="Also time training steps on this data set.")] = None,
    threads: Annotated[int, typer.Option(help="torch threads (0 = default).")] = 0,
) -> None:
    """(a) step cost per event vs history length, batched and single; (b) parallel scan vs sequential loop;
    (c) with --data, seconds per training step for each model."""
    from lrustream.bench.models import scan_vs_loop, step_cost
    from lrustream.bench.trainer import train_step
    from models import MODEL_NAMES

    if threads:
        import torch

        torch.set_num_threads(threads)
    step_cost(lengths=tuple(int(x) for x in lengths.split(",")), log=echo)
    echo("")
    scan_vs_loop(log=echo)
    if data:
        for name in MODEL_NAMES:
            train_step(data, name, log=echo)


@bench_app.command("changelog")
def bench_changelog(
    partitions: Annotated[int, typer.Option(help="Changelog partitions a batch spans.")] = 2,
    records: Annotated[int, typer.Option(help="User records per batch.")] = 200,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """What a micro-batch's changelog commit costs: one transaction per partition (fenced writers) vs a plain
    idempotent producer, on the configured broker."""
    from lrustream.bench.state import commit_cost
    from lrustream.kernel.kafka import librdkafka_config

    commit_cost(librdkafka_config(cfg_of(config, overrides)), partitions, records, log=echo)


@bench_app.command("requests")
def bench_requests(
    data: Annotated[str, typer.Option(help="Data set whose events make the states.")] = (
        "../shared/data/ml-1m-subset-users1-2999"),
    events: Annotated[int, typer.Option(help="Events applied before the first request.")] = 20_000,
    rate: Annotated[float, typer.Option(help="Requests per second.")] = 200.0,
    seconds: Annotated[float, typer.Option(help="Seconds of requests in each phase.")] = 10.0,
    stream_rate: Annotated[float, typer.Option(help="Events/s replayed during the last phase.")] = 1_000.0,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """GET /recommendations/{user} at a steady rate against one worker: p50/p99/p99.9 for users it holds, for
    users it has never seen (popular fallback), and for users it holds while events stream in."""
    from lrustream.bench.requests import run

    if rate <= 0 or seconds <= 0 or stream_rate <= 0:
        raise UsageError("--rate, --seconds and --stream-rate must be positive")
    model_cfg_of(config, overrides)  # validate before starting anything
    run(overrides or [], data, events, rate, seconds, stream_rate, Path(".lrustream/bench"), log=echo)


@bench_app.command("stream")
def bench_stream(
    data: Annotated[str, typer.Option(help="Data set to replay.")] = "../shared/data/ml-1m-subset-users1-2999",
    events: Annotated[int, typer.Option(help="Events pre-loaded and drained by each contender.")] = 100_000,
    latency_rates: Annotated[
        str, typer.Option(help="Steady rates (events/s) of the latency phases, in turn.")
    ] = "1000,2000,5000",
    latency_seconds: Annotated[float, typer.Option(help="Seconds of replay in each latency phase.")] = 10.0,
    latency_wait: Annotated[
        float, typer.Option(help="Longest wait (s) after a phase's replay for its recommendations.")
    ] = 10.0,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """One worker vs a plain confluent-kafka forwarder and a bare forwarding Faust agent on the same broker:
    events/s and the worker's ratio to each, then its p50/p99/p99.9 latency (queueing, processing, total)
    at each rate."""
    from lrustream.bench.stream import latency_plan, run

    try:
        plan = latency_plan(latency_rates, latency_seconds, latency_wait)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    model_cfg_of(config, overrides)  # validate before starting anything
    run(overrides or [], data, events, Path(".lrustream/bench"), plan, log=echo)


@bench_app.command("catalogue")
def bench_catalogue(
    items: Annotated[str, typer.Option(help="Catalogue sizes, comma-separated (the data set's own items at least).")
                     ] = "3615,100000,1000000",
    data: Annotated[str, typer.Option(help="Data set whose events, users and items make the stream.")] = (
        "../shared/data/ml-1m-subset-users1-2999"),
    events: Annotated[int, typer.Option(help="Events pre-loaded and drained by each size's worker.")] = 30_000,
    rate: Annotated[float, typer.Option(help="Steady rate (events/s) of the latency phase.")] = 2_000.0,
    request_rate: Annotated[float, typer.Option(help="GET /recommendations per second of owned users.")] = 200.0,
    seconds: Annotated[float, typer.Option(help="Seconds of the latency phase and of the request phase.")] = 10.0,
    start_model: Annotated[Path | None, typer.Option(
        help="Model store holding a version trained on --data: its rows are kept, added ones drawn like them "
             "(without: an untrained model, for cost only).")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Per catalogue size, in one run: the approximate index's recall@10 on real states and its cost against
    exact ranking, the worker's drain, p50/p99 at --rate and owned-user request p99, a 32 x 200 training step
    (time, peak memory) and publish -> every worker serving; then ratios to the smallest size."""
    from lrustream.bench.catalogue import run

    try:
        sizes = sorted({int(x) for x in items.split(",") if x.strip()})
    except ValueError:
        raise UsageError("--items takes comma-separated integers") from None
    if not sizes or sizes[0] < 1 or events < 1 or rate <= 0 or request_rate <= 0 or seconds <= 0:
        raise UsageError("--items, --events, --rate, --request-rate and --seconds must be positive")
    model_cfg_of(config, overrides)  # validate before starting anything
    run(overrides or [], data, sizes, events, rate, request_rate, seconds, start_model, Path(".lrustream/bench"),
        log=echo)


@bench_app.command("failover")
def bench_failover(
    data: Annotated[str, typer.Option(help="Data set replayed, in a loop, for the whole run.")] = (
        "../shared/data/ml-1m-subset-users1-2999"),
    rate: Annotated[float, typer.Option(help="Steady input rate (events/s).")] = 2_000.0,
    rounds: Annotated[int, typer.Option(help="Kills of each fault kind.")] = 3,
    down: Annotated[float, typer.Option(help="Seconds a killed node stays down.")] = 5.0,
    settle: Annotated[float, typer.Option(help="Seconds of steady serving before the first fault and after "
                                                "each one (once the replicas are in sync again).")] = 20.0,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """A three-node cluster of its own, one worker and a steady replay; brokers killed (SIGKILL) and started again
    in a loop: per fault kind (input partition leader, transaction coordinator, active controller), the time from
    the kill until recommendations flow again and until their p99 is under 50 ms, and the events delayed."""
    from lrustream.bench.failover import run

    if rate <= 0 or rounds < 1 or down < 0 or settle <= 0:
        raise UsageError("--rate, --rounds and --settle must be positive, --down at least 0")
    model_cfg_of(config, overrides)  # validate before starting anything
    run(overrides or [], data, rate, rounds, down, settle, Path(".lrustream/bench"), log=echo)


@bench_app.command("versions")
def bench_versions(
    workers: Annotated[int, typer.Option(help="Worker processes, each with its own dirs and port.")] = 2,
    rounds: Annotated[int, typer.Option(help="Versions published and timed.")] = 5,
    items: Annotated[int, typer.Option(help="Items of each version (2,000: about 1 MB of weights).")] = 2_000,
    large_items: Annotated[int, typer.Option(help="Also time rounds with this many items (0 = skip).")] = 0,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Model-version rollout through the model-versions topic: publish duration, and time from publish to every
    worker serving the new version (p50/max); then how long a late worker takes to serve."""
    from lrustream.bench.versions import run

    if workers < 1 or rounds < 1 or items < 1 or large_items < 0:
        raise UsageError("--workers, --rounds and --items must be positive, --large-items not negative")
    model_cfg_of(config, overrides)  # validate before starting anything
    run(overrides or [], workers, rounds, items, large_items, Path(".lrustream/bench"), log=echo)


@app.command("trainer")
def trainer_cmd(
    rounds: Annotated[int | None, typer.Option(help="Stop after this many rounds (default: run until Ctrl-C).")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Online fine-tuning: buffer training examples, fine-tune every N events / T s / on request, validate,
    publish, and tell workers to swap."""
    from stream.topics import create_topics
    from trainer.online import TrainerLoop

    cfg = model_cfg_of(config, overrides)
    create_topics(cfg)  # as the worker does: either may start first
    loop = TrainerLoop(cfg, log_line=echo)
    o = cfg.online
    echo(f"trainer: rounds every {o.every_events} events or {o.every_seconds:g} s or on `lrustream refresh`")
    try:
        loop.run(max_rounds=rounds)
    finally:
        loop.close()


@app.command("refresh")
def refresh_cmd(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Ask the running trainer for a fine-tuning round now."""
    from stream.updates import request_refresh

    cfg = cfg_of(config, overrides)
    request_refresh(cfg, "cli")
    echo(f"refresh requested on {cfg.topics.model_updates}")


@app.command("evaluate-stream")
def evaluate_stream_cmd(
    data: Annotated[str, typer.Option(help="Timestamped data set (ratings.dat[.gz], u.data, Amazon files).")],
    out: Annotated[Path, typer.Option(help="Where prequential.csv, prequential.png and summary.json go.")] = Path(
        ".lrustream/prequential"),
    limit: Annotated[int | None, typer.Option(help="Use only the first N events (time order).")] = None,
    rate: Annotated[float, typer.Option(help="Replay rate of the second half, events/s.")] = 1000.0,
    train_minutes: Annotated[float, typer.Option(
        help="Offline training time of the starting model, each retrain and each reference fine-tuning: a cap "
             "(a budget for the starting model and retrains with --start budget).")] = 3.0,
    start: Annotated[str, typer.Option(
        help="How the starting model (and each retrain) is trained: early-stop (until train.patience validations "
             "without a better one, --train-minutes as a cap) or budget (train.* as configured, stopped by "
             "--train-minutes, train.max_steps or train.patience, whichever comes first).")] = "early-stop",
    online_every: Annotated[int, typer.Option(help="Online mode: a fine-tuning round every N events.")] = 5000,
    retrain_every: Annotated[int, typer.Option(
        help="Retrain and reference modes: every N events a pause for a new model (retrain: trained from scratch; "
             "reference: the served one fine-tuned to early stopping).")] = 50_000,
    modes: Annotated[str, typer.Option(help="Comma-separated subset of frozen,online,reference,retrain to run.")
                     ] = "frozen,online,retrain",
    bucket: Annotated[int, typer.Option(help="Scored events per point of the curves.")] = 1000,
    start_model: Annotated[Path | None, typer.Option(
        help="Model store of the starting model: used when it holds one, else the trained one is kept there "
             "(runs comparing settings then share a starting point).")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Prequential HR@10/NDCG@10 through the real pipeline: frozen model vs online fine-tuning vs periodic
    fine-tuning to early stopping (reference) vs periodic retrain from scratch.

    Each mode's difference from frozen comes with a 95 % paired-bootstrap interval; where online and reference
    ran, online's training seconds and HR@10 gain are given as shares of the reference's. Exits 1 when the online
    mode published no version (after writing its outputs)."""
    from lrustream.prequential import STARTS, OnlinePublishedNothing, parse_modes, run_prequential

    if config:
        raise UsageError("evaluate-stream takes key=value overrides only (it starts its own worker and trainer)")
    try:
        chosen = parse_modes(modes)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if retrain_every < 1:
        raise UsageError(f"--retrain-every must be >= 1, got {retrain_every}")
    if start not in STARTS:
        raise UsageError(f"--start takes one of {', '.join(STARTS)}, got {start!r}")
    model_cfg_of(None, overrides)
    try:
        run_prequential(overrides or [], data, out, limit, rate, train_minutes, online_every, bucket, modes=chosen,
                        retrain_every=retrain_every, log=echo, start_model=start_model, start=start)
    except OnlinePublishedNothing as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


# ----- streaming worker and its state ---------------------------------------------------------------------------
@app.command("worker")
def worker_cmd(
    loglevel: Annotated[str, typer.Option(help="Log level: debug, info, warning.")] = "info",
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Serve recommendations: consume interactions, advance per-user states, emit top-K (until Ctrl-C)."""
    from stream.worker import Worker

    Worker(model_cfg_of(config, overrides)).run(loglevel)


state_app = typer.Typer(no_args_is_help=True, help="Inspect per-user states in this machine's state store.")
app.add_typer(state_app, name="state")


@state_app.command("inspect")
def state_inspect(
    user: Annotated[str, typer.Argument(help="User id as producers send it.")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a user's stored record as indented JSON (read-only; safe while the worker runs). --json: the same
    document on one line: {"user_id", "partition", "model_version", "last_applied": {"partition", "offset"},
    "updated_ms", "state_bytes", "window", "unknown_items"}."""
    import contextlib

    from models.store import ModelStore, ModelStoreError
    from state.store import find_user
    from stream.worker import state_dir

    cfg = cfg_of(config, overrides)
    found = find_user(state_dir(cfg), user)
    if found is None:
        raise UsageError(f"no state for user {user!r} under {state_dir(cfg)}")
    partition, record = found
    items: list[str] | None = None
    with contextlib.suppress(ModelStoreError):  # external ids are what operators know
        items = record.external_window(ModelStore(cfg.model_store.dir).vocabulary(record.version).item_of)
    document = {
        "user_id": user, "partition": partition, "model_version": record.version,
        "last_applied": {"partition": record.partition, "offset": record.offset},
        "updated_ms": record.updated_ms, "state_bytes": len(record.state),
        "window": items if items is not None else [int(i) for i in record.window],
        "unknown_items": record.unknown,
    }
    if as_json:
        echo(json.dumps(document, separators=(",", ":"), ensure_ascii=False))
    else:
        echo(json.dumps(document, indent=2))


@app.command("demo")
def demo_cmd(
    data: Annotated[str | None, typer.Option(help="Data set to replay (default: ../shared/data ML-1M subset, "
                                                  "else a synthetic stream).")] = None,
    events: Annotated[int, typer.Option(help="Events to replay.")] = 20_000,
    rate: Annotated[float, typer.Option(help="Replay rate, events/s.")] = 2_000.0,
    train_minutes: Annotated[float, typer.Option(help="Training budget when no model is stored yet.")] = 2.0,
    warm_up_seconds: Annotated[float, typer.Option(
        min=0, help="Replay this many seconds of events first, reported apart from the timed ones.")] = 5.0,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """The main job: broker, model (trained if none), worker, a replay, recommendations with their latency."""
    from lrustream.demo import run_demo

    run_demo(model_cfg_of(config, overrides), config, overrides or [], data, events, rate, train_minutes, log=echo,
             warm_up_s=warm_up_seconds)


# ----- producer and consumer tools ------------------------------------------------------------------------------
@app.command("produce")
def produce_cmd(
    data: Annotated[str, typer.Option(help="Timestamped data file/folder: ratings.dat[.gz], u.data, *_item.txt.")],
    rate: Annotated[float | None, typer.Option(help="Events per second (default: as fast as possible).")] = None,
    limit: Annotated[int | None, typer.Option(help="Stop after this many events.")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Replay a data set's interactions in time order to the interactions topic, keyed by user id."""
    from lrustream.replay import replay

    if rate is not None and not rate > 0:
        raise UsageError(f"--rate must be positive, got {rate}")
    if limit is not None and limit < 0:
        raise UsageError(f"--limit must be >= 0, got {limit}")
    cfg = cfg_of(config, overrides)
    start = time.monotonic()
    n = replay(cfg, data, rate=rate, limit=limit, progress=sys.stderr.isatty())
    seconds = time.monotonic() - start
    echo(f"published {n} events to {cfg.topics.interactions} in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} ev/s)")


@app.command("recs")
def recs_cmd(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new records until Ctrl-C.")] = False,
    user: Annotated[str | None, typer.Option(help="Only this user's recommendations.")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Print recommendation records as JSON lines (from the beginning; without --follow, up to the end)."""
    from lrustream.recommendations import read_recommendations

    try:
        for record in read_recommendations(cfg_of(config, overrides), follow=follow, user=user):
            sys.stdout.write(json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n")
            sys.stdout.flush()  # line by line, so `| head` and `| grep` see records as they come
    except BrokenPipeError:
        _quiet_stdout()


# ----- at a glance, and one request ----------------------------------------------------------------------------
STATUS_DOWN = 3
"""``lrustream status`` exits with this when the broker cannot be reached (as ``broker status`` does: the LSB
"not running" code); 0 when it answers, whatever the rest says."""


@app.command("status")
def status_cmd(config: ConfigOpt = None, overrides: Overrides = None, as_json: JsonOpt = False) -> None:
    """The whole system at a glance: the broker, lrustream's topics, the workers of the consumer group, the
    serving version and the workers' lag. Exit 0 when the broker answers, 3 when it cannot be reached.
    --json: {"broker", "topics", "workers", "serving", "lag"} (see docs/cli.md)."""
    cfg = cfg_of(config, overrides)
    document = status_document(cfg, probe_status(cfg))
    if as_json:
        echo_json(document)
    else:
        for line in status_lines(document):
            echo(line)
    raise typer.Exit(0 if document["broker"]["reachable"] else STATUS_DOWN)


def lrustream_topics(cfg: Config) -> dict[str, str]:
    """The topics lrustream uses: config key under ``topics`` -> topic name."""
    import dataclasses

    return {f.name: getattr(cfg.topics, f.name) for f in dataclasses.fields(cfg.topics)
            if isinstance(getattr(cfg.topics, f.name), str)}


def probe_status(cfg: Config, timeout_s: float = 5.0) -> dict[str, Any]:
    """What the cluster says, read once (every Kafka read of ``status`` is here, so that tests stub this one
    function): ``error`` (why the broker is unreachable, else None), ``partitions`` (topic -> partition count),
    ``group`` (the worker group's state and members, or an error), ``pointers`` (the model-versions topic's
    pointer records, or an error) and ``offsets`` (input partition -> [committed, end], or an error). Each part
    that fails says why and leaves the others standing."""
    from stream.topics import partition_counts

    try:
        partitions = partition_counts(cfg, timeout_s)
    except Exception as exc:  # KafkaException, or a transport error: the broker is what is missing
        return {"error": _why(exc), "partitions": {}, "group": None, "pointers": None, "offsets": None}
    probe: dict[str, Any] = {"error": None, "partitions": partitions}
    for key, read in (("group", _worker_group), ("pointers", _pointer_records), ("offsets", _group_offsets)):
        try:
            probe[key] = read(cfg, partitions, timeout_s)
        except Exception as exc:  # one unreadable part (a missing topic, a slow coordinator) is reported alone
            probe[key] = {"error": _why(exc)}
    return probe


def _why(exc: Exception) -> str:
    from lrustream.kernel.kafka import reason

    return reason(exc) if type(exc).__name__ == "KafkaException" else str(exc) or type(exc).__name__


def _worker_group(cfg: Config, partitions: dict[str, int], timeout_s: float) -> dict[str, Any]:
    """The consumer group ``stream.app_id`` as the admin API describes it: its state and each member's client
    id, host, HTTP address (workers put their advertised URL in their client id) and assigned input
    partitions."""
    from lrustream.kernel.kafka import admin
    from stream.queries import URL_MARK

    group = cfg.stream.app_id
    description = admin(cfg).describe_consumer_groups([group], request_timeout=timeout_s)[group].result()
    members = [{"client_id": m.client_id, "host": m.host, "url": m.client_id.partition(URL_MARK)[2] or None,
                "partitions": sorted(tp.partition for tp in ((m.assignment and m.assignment.topic_partitions) or [])
                                     if tp.topic == cfg.topics.interactions)}
               for m in description.members]
    return {"state": str(description.state.name).lower(), "members": members}


def _pointer_records(cfg: Config, partitions: dict[str, int], timeout_s: float) -> dict[str, Any]:
    """The last record of each pointer (@current, @pin, @shadow) on the model-versions topic, read without
    installing any version (``models list`` installs them; the pointers are what says which one serves)."""
    from lrustream.kernel.kafka import MissingTopic, assigned_reader, read_to_end
    from stream.versions import POINTERS

    topic = cfg.topics.model_versions
    if topic not in partitions:
        raise MissingTopic(f"topic {topic} does not exist")
    consumer, numbers = assigned_reader(cfg, topic, f"{cfg.stream.app_id}-status", from_beginning=True,
                                        timeout_s=timeout_s)
    pointers: dict[str, Any] = dict.fromkeys(POINTERS)
    try:
        def take(wait_s: float) -> list[Any]:
            first = consumer.poll(wait_s)
            return [] if first is None else [first, *consumer.consume(63, 0)]

        for batch in read_to_end(consumer, topic, numbers, take, timeout_s * 6):
            for message in batch:
                if message.error() is None and (key := (message.key() or b"").decode()) in POINTERS:
                    body = json.loads(message.value()) if message.value() is not None else {}
                    pointers[key] = body.get("version")
    finally:
        consumer.close()
    return pointers


def _group_offsets(cfg: Config, partitions: dict[str, int], timeout_s: float) -> dict[int, list[int | None]]:
    """Each input partition's committed offset in the worker group (None: never committed) and end offset."""
    import uuid

    from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition

    from lrustream.kernel.kafka import MissingTopic, admin, high_watermarks, librdkafka_config

    topic = cfg.topics.interactions
    if topic not in partitions:
        raise MissingTopic(f"topic {topic} does not exist")
    numbers = list(range(partitions[topic]))
    group = cfg.stream.app_id
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in numbers])
    answer = admin(cfg).list_consumer_group_offsets([request], request_timeout=timeout_s)[group].result()
    committed = {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in answer.topic_partitions}
    consumer = Consumer(librdkafka_config(cfg, **{"group.id": f"{group}-status-{uuid.uuid4().hex[:8]}",
                                                  "enable.auto.commit": False}))
    try:
        ends = high_watermarks(consumer, topic, numbers, timeout_s)
    finally:
        consumer.close()
    return {p: [committed.get(p), ends[p]] for p in numbers}


def status_document(cfg: Config, probe: dict[str, Any]) -> dict[str, Any]:
    """``status --json`` from :func:`probe_status`: ``broker`` {bootstrap, reachable, error}; ``topics``, one per
    topic lrustream uses {key, name, exists, partitions}; ``workers`` {group, state, members: [{client_id, host,
    url, partitions}], error}; ``serving`` {serving, current, pinned, shadow, error}; ``lag`` {group, topic, total,
    partitions: [{partition, committed, end, lag}], error}. A part the broker could not give is null with its
    ``error``; lag counts a partition never committed from offset 0 (a new group reads from the beginning)."""
    reachable = probe["error"] is None
    counts = probe["partitions"]
    topics = [{"key": key, "name": name, "exists": name in counts if reachable else None,
               "partitions": counts.get(name)} for key, name in lrustream_topics(cfg).items()]
    group = cfg.stream.app_id

    def failed(part: Any) -> str | None:
        if not reachable:
            return "broker unreachable"
        return part.get("error") if isinstance(part, dict) and "error" in part else None

    workers: dict[str, Any] = {"group": group, "state": None, "members": None, "error": failed(probe["group"])}
    if workers["error"] is None:
        workers.update(state=probe["group"]["state"], members=probe["group"]["members"])
    pointers = probe["pointers"]
    serving: dict[str, Any] = {"serving": None, "current": None, "pinned": None, "shadow": None,
                               "error": failed(pointers)}
    if serving["error"] is None:
        serving.update(serving=pointers["@pin"] or pointers["@current"], current=pointers["@current"],
                       pinned=pointers["@pin"], shadow=pointers["@shadow"])
    offsets = probe["offsets"]
    lag: dict[str, Any] = {"group": group, "topic": cfg.topics.interactions, "total": None, "partitions": None,
                           "error": failed(offsets)}
    if lag["error"] is None:
        rows = [{"partition": int(p), "committed": committed, "end": end, "lag": max(0, end - (committed or 0))}
                for p, (committed, end) in sorted(offsets.items(), key=lambda kv: int(kv[0]))]
        lag.update(partitions=rows, total=sum(r["lag"] for r in rows) if rows else None)
    return {"broker": {"bootstrap": cfg.kafka.bootstrap_servers, "reachable": reachable, "error": probe["error"]},
            "topics": topics, "workers": workers, "serving": serving, "lag": lag}


def status_lines(document: dict[str, Any]) -> list[str]:
    """``status`` as text, from :func:`status_document`."""
    broker = document["broker"]
    if not broker["reachable"]:
        return [f"broker   {broker['bootstrap']}: unreachable ({broker['error']})",
                "topics, workers, serving version and lag need the broker"]
    lines = [f"broker   {broker['bootstrap']}: reachable"]
    missing = [t["name"] for t in document["topics"] if not t["exists"]]
    present = " ".join(f"{t['name']}({t['partitions']})" for t in document["topics"] if t["exists"])
    lines.append(f"topics   {present or 'none'}" + (f"; missing: {' '.join(missing)} (lrustream topics create)"
                                                     if missing else ""))
    workers = document["workers"]
    if workers["error"]:
        lines.append(f"workers  group {workers['group']}: {workers['error']}")
    else:
        members = workers["members"]
        lines.append(f"workers  group {workers['group']} {workers['state']}: {len(members)} member(s)")
        lines += [f"         {m['url'] or m['client_id']} on {m['host']}: partitions "
                  f"{','.join(map(str, m['partitions'])) or '-'}" for m in members]
    serving = document["serving"]
    if serving["error"]:
        lines.append(f"serving  {serving['error']}")
    else:
        extra = "".join(f", {name} {serving[name]}" for name in ("current", "pinned", "shadow") if serving[name])
        lines.append(f"serving  {serving['serving'] or 'no version yet'}" + (f" ({extra[2:]})" if extra else ""))
    lag = document["lag"]
    if lag["error"]:
        lines.append(f"lag      {lag['error']}")
    elif lag["total"] is None:
        lines.append(f"lag      {lag['topic']}: no partitions")
    else:
        per = " ".join(f"{r['partition']}:{r['lag']}" for r in lag["partitions"])
        lines.append(f"lag      {lag['total']} events on {lag['topic']} (per partition {per})")
    return lines


@app.command("recommend")
def recommend_cmd(
    user: Annotated[str, typer.Argument(help="User id as producers send it.")],
    k: Annotated[int | None, typer.Option("-k", "--k", min=1, help="How many items (default: the worker's "
                                                                   "stream.top_k).")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="An item not to recommend; repeatable.")
                       ] = None,
    url: Annotated[str | None, typer.Option(help="A worker's HTTP address (default: http://{http.host}:"
                                                 "{http.port}); it redirects to the user's owner.")] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Ask a worker for a user's recommendations now (GET /recommendations/{user_id}) and print its JSON answer.
    http.token, when set, is sent as a bearer token."""
    from lrustream.client import recommend

    cfg = cfg_of(config, overrides)
    answer = recommend(url or f"http://{cfg.http.host}:{cfg.http.port}", user, k, exclude or [],
                       token=cfg.http.token, retries=2)
    echo_json(answer)


def _quiet_stdout() -> None:
    """The reader of our stdout went away (`| head`): point stdout at /dev/null so the interpreter's final
    flush does not complain, and end normally."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout without a file descriptor (tests' captured output): nothing will flush to a pipe


def main() -> None:
    ensure_env_java_home()
    try:
        app()
    except LrustreamError as exc:  # errors users can act on: one line and the error's exit code
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
