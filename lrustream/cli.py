"""The ``lrustream`` command. Thin: parse arguments, load config, call the package that does the work.

Every command takes ``--config FILE`` and trailing ``key=value`` overrides. Errors a user can fix print one
line on stderr and exit non-zero (2 for bad configuration or arguments, 1 for everything else).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from lrustream.broker import BrokerError, LocalBroker, ensure_env_java_home
from lrustream.config import Config, ConfigError, load_config, to_yaml

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="lrustream: a streaming, online-learning sequential recommender on Kafka.")
broker_app = typer.Typer(no_args_is_help=True, help="The embedded local Kafka broker (KRaft, loopback).")
config_app = typer.Typer(no_args_is_help=True, help="Inspect the merged configuration.")
topics_app = typer.Typer(no_args_is_help=True, help="Create and list lrustream's Kafka topics.")
app.add_typer(broker_app, name="broker")
app.add_typer(config_app, name="config")
app.add_typer(topics_app, name="topics")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (default: configs/default.yaml).")
]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="key=value overrides, e.g. broker.port=19092", show_default=False)
]


class UsageError(Exception):
    """A user mistake outside the config (bad path, bad argument): one line, exit 2."""


def cfg_of(config: Path | None, overrides: list[str] | None) -> Config:
    return load_config(config, overrides or [])


def echo(msg: str) -> None:
    typer.echo(msg)


# ----- broker ------------------------------------------------------------------------------------------------
@broker_app.command("start")
def broker_start(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Format storage if needed, start the broker, return when it answers. Safe to run twice."""
    broker = LocalBroker.from_config(cfg_of(config, overrides))
    already = broker.status().running
    status = broker.start()
    echo(("already running: " if already else "started: ") + status.line())


@broker_app.command("stop")
def broker_stop(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Stop the broker this data dir's pid file names (never another process)."""
    broker = LocalBroker.from_config(cfg_of(config, overrides))
    echo("stopped" if broker.stop() else "broker was not running")


@broker_app.command("status")
def broker_status(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Exit 0 when our broker runs and answers, 3 when it is not running (LSB convention)."""
    status = LocalBroker.from_config(cfg_of(config, overrides)).status()
    echo(status.line())
    raise typer.Exit(0 if status.running and status.answering else 3)


@broker_app.command("fetch")
def broker_fetch(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Resolve the Kafka jars from Maven Central into broker.jars_dir (cached; offline afterwards)."""
    jars = LocalBroker.from_config(cfg_of(config, overrides)).fetch_jars()
    echo(f"kafka jars ready in {jars}")


# ----- config / topics ---------------------------------------------------------------------------------------
@config_app.command("show")
def config_show(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Print the merged configuration (defaults <- file <- overrides) as YAML. Secrets are masked."""
    cfg = cfg_of(config, overrides)
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
def topics_list(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Topics on the cluster with their partition counts."""
    from stream.topics import partition_counts

    for name, n in sorted(partition_counts(cfg_of(config, overrides)).items()):
        echo(f"{name}\t{n}")


# ----- offline models -------------------------------------------------------------------------------------------
def _names(model: str) -> list[str]:
    names = [m.strip() for m in model.split(",") if m.strip()]
    from models import MODELS

    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        raise UsageError(f"--model must list models from {sorted(MODELS)}, got {model!r}")
    return names


@app.command("train")
def train_cmd(
    data: Annotated[str, typer.Option(help="Data file/folder: sequences.txt, ratings.dat[.gz], u.data, *_item.txt.")],
    model: Annotated[str, typer.Option(help="Model(s), comma-separated: lrurec,linrec,sasrec.")] = "lrurec",
    max_minutes: Annotated[float | None, typer.Option(help="Stop each model after this many minutes.")] = None,
    out: Annotated[Path, typer.Option(help="Where history JSON and training-curve PNGs go.")] = Path(".lrustream/runs"),
    publish: Annotated[bool, typer.Option(help="Publish each trained model to the model store.")] = True,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Train and evaluate offline (LRURec protocol); print the metric table; publish versions."""
    from trainer.offline import metric_table, run_offline

    cfg = cfg_of(config, overrides)
    results = run_offline(cfg, data, _names(model), out, max_minutes=max_minutes, publish=publish,
                          progress=sys.stderr.isatty(), log=echo)
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

    echo(metric_table(run_evaluate(cfg_of(config, overrides), data, version)))


models_app = typer.Typer(no_args_is_help=True, help="Model versions in the model store.")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Versions, newest last; * marks the one workers serve."""
    from models.store import ModelStore

    store = ModelStore(cfg_of(config, overrides).model_store.dir)
    current = store.current()
    for info in store.list():
        mark = "*" if info.version == current else " "
        metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted(info.metrics.items()) if "10" in k)
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created))
        echo(f"{mark} {info.version}  {info.model:7s} items={info.hparams.get('num_items')}  parent={info.parent}  "
             f"{created}  {metrics}")


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
    from models.bench import scan_vs_loop, step_cost
    from trainer.bench import train_step

    if threads:
        import torch

        torch.set_num_threads(threads)
    step_cost(lengths=tuple(int(x) for x in lengths.split(",")), log=echo)
    echo("")
    scan_vs_loop(log=echo)
    if data:
        for name in ("lrurec", "linrec", "sasrec"):
            train_step(data, name, log=echo)


# ----- streaming worker and its state ---------------------------------------------------------------------------
@app.command("worker")
def worker_cmd(
    loglevel: Annotated[str, typer.Option(help="Log level: debug, info, warning.")] = "info",
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Serve recommendations: consume interactions, advance per-user states, emit top-K (until Ctrl-C)."""
    from stream.app import Worker

    Worker(cfg_of(config, overrides)).run(loglevel)


state_app = typer.Typer(no_args_is_help=True, help="Inspect per-user states in this machine's state store.")
app.add_typer(state_app, name="state")


@state_app.command("inspect")
def state_inspect(
    user: Annotated[str, typer.Argument(help="User id as producers send it.")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Print a user's stored record as JSON (read-only; safe while the worker runs)."""
    import json

    from state.store import find_user
    from stream.app import state_dir

    cfg = cfg_of(config, overrides)
    found = find_user(state_dir(cfg), user)
    if found is None:
        raise UsageError(f"no state for user {user!r} under {state_dir(cfg)}")
    partition, record = found
    echo(json.dumps({
        "user_id": user, "partition": partition, "model_version": record.version,
        "last_applied": {"partition": record.partition, "offset": record.offset},
        "updated_ms": record.updated_ms, "state_bytes": len(record.state),
        "window": [int(i) for i in record.window], "unknown_items": record.unknown,
    }, indent=2))


def main() -> None:
    ensure_env_java_home()
    try:
        app()
    except (ConfigError, UsageError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except BrokerError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:
        if not getattr(exc, "user_facing", False):  # errors users can act on say so; others keep their traceback
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
