"""The ``lrustream`` command. Thin: parse arguments, load config, call the package that does the work.

Every command takes ``--config FILE`` and trailing ``key=value`` overrides. Errors a user can fix print one
line on stderr and exit non-zero (2 for bad configuration or arguments, 1 for everything else).
"""

from __future__ import annotations

import sys
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
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
