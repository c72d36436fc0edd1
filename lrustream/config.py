"""Typed configuration: one schema (dataclasses), one default file, overrides from the command line.

Every command loads the same way: the dataclass schema, then ``configs/default.yaml`` (or ``--config FILE``),
then ``key=value`` overrides. OmegaConf checks keys and types against the schema, so a typo or a wrong type is
refused before anything starts; :class:`ConfigError` carries the one-line reason the CLI prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line meant for a human."""


@dataclass
class KafkaSecurity:
    """Passed through unchanged to every Kafka client (librdkafka and aiokafka names are mapped in stream)."""

    protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str | None = None  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True


@dataclass
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "lrustream"
    security: KafkaSecurity = field(default_factory=KafkaSecurity)


@dataclass
class TopicsConfig:
    interactions: str = "interactions"
    recommendations: str = "recommendations"
    dlq: str = "interactions.dlq"
    training_examples: str = "training-examples"
    model_updates: str = "model-updates"
    state_changelog: str = "lrustream-state-changelog"
    partitions: int = 4
    replication_factor: int = 1


@dataclass
class BrokerConfig:
    """The embedded single-node KRaft broker started by ``lrustream broker start``."""

    data_dir: str = ".lrustream/broker"
    jars_dir: str = ".lrustream/kafka-jars"
    host: str = "127.0.0.1"
    port: int = 9092
    controller_port: int = 0  # 0 = port + 1
    heap: str = "512m"
    start_timeout_s: float = 60.0


@dataclass
class StateConfig:
    dir: str = ".lrustream/state"
    dtype: str = "float32"  # float32 | float16: how recurrent states are stored


@dataclass
class ModelStoreConfig:
    dir: str = ".lrustream/models"


@dataclass
class ModelConfig:
    name: str = "lrurec"  # lrurec | linrec | sasrec
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 2  # LinRec / SASRec only
    dropout: float = 0.2
    attn_dropout: float = 0.2
    max_len: int = 200
    linrec_causal: bool = True  # LinRec only: False = the official unmasked form (last-position loss)


@dataclass
class TrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    adam_eps: float = 1e-9
    grad_clip: float = 5.0
    batch_size: int = 128
    eval_batch_size: int = 256
    max_steps: int = 100_000
    val_every: int = 500
    patience: int = 10
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # 0 = torch default


@dataclass
class StreamConfig:
    app_id: str = "lrustream-worker"
    batch_size: int = 512
    linger_ms: int = 20
    top_k: int = 10
    exclude_seen: bool = True
    unknown_items: str = "dlq"  # dlq | oov
    max_value_bytes: int = 65536
    min_step_rows: int = 16  # pad every batched step to at least this many rows (batch-invariant maths)
    emit_training_examples: bool = True
    stall_after_s: float = 60.0  # /health says "degraded" when a micro-batch or the input stalls this long
    stop_timeout_s: float = 5.0  # after SIGTERM/SIGINT, exit anyway this long later (a crash is safe: see kill tests)


@dataclass
class OnlineConfig:
    """The online fine-tuning loop (``lrustream trainer``); the round's contract is in trainer/online.py."""

    group_id: str = "lrustream-trainer"
    every_events: int = 5_000
    """A round when this many new events arrived (rounds run back to back while the stream outpaces them)."""
    every_seconds: float = 300.0
    """... or when this long passed since the last round and there is any new event."""
    recent_buffer: int = 4096
    """Users whose latest window the trainer keeps; the least recently active is evicted first."""
    reservoir_buffer: int = 4096
    """Windows of evicted users kept as a uniform sample, replayed so rounds do not forget older users."""
    train_len: int = 0
    """Items per training window (the user's most recent) and the context the gate ranks with; 0 = model.max_len,
    the context the worker serves with (a model fine-tuned on shorter windows ranks worse at full context)."""
    batch_size: int = 32
    """Windows per optimiser step (0 = train.batch_size)."""
    length_groups: int = 4
    """A step's windows, sorted by length, go through the model in this many groups, each padded only to its
    longest window (gradients summed: the same step as one padded batch, for less work on padding)."""
    replay_share: float = 0.5
    """Share of each batch drawn from users without new events (recent and reservoir). On the 2-core ML-1M replay
    from one starting model, online/frozen HR@10 was 1.121 at 0, 1.132 at 0.1, 1.134 at 0.25, 1.152 and 1.148 at
    0.5, 1.139 at 0.7, 1.136 at 0.9: the starting model is far from converged, and old windows keep teaching it."""
    events_per_step: int = 300
    """Steps per round = new events / this, clamped to [min_steps, max_steps]. Rounds keep up with a stream of
    R events/s while a step costs less than events_per_step / R seconds."""
    min_steps: int = 10
    max_steps: int = 100
    max_train_seconds: float = 4.0
    """Training stops after this long whatever the step count, so a round's length (and the events between two
    versions) stays bounded on a machine the trainer shares with the worker and the broker. Short rounds serve
    fresher versions: on the 2-core ML-1M replay 4 s rounds beat 8 s ones (and a refused round costs less)."""
    num_threads: int = 0
    """torch CPU threads of the trainer (0 = torch's default, every core). Where it shares the cores with a
    worker and a broker, 1 avoids threads waiting on each other."""
    lr: float = 2e-3
    """AdamW learning rate; the moments carry over from round to round."""
    warmup_steps: int = 30
    """A fresh optimiser (the learner's first round, or after a rollback) raises the learning rate linearly over
    this many steps: Adam's first updates move every weight by about ``lr`` whatever its gradient (0 = none)."""
    dropout: float = 0.0
    """Dropout while fine-tuning (-1 = the model's own). Dropout is about half a CPU step's cost."""
    holdout_fraction: float = 0.1
    """Share of the new events (the most recent ones) held out to judge the candidate."""
    min_holdout: int = 500
    """Fewer held-out (or trainable) events are no evidence: the round publishes nothing."""
    max_holdout: int = 2000
    tolerance: float = 0.005
    """Refuse a candidate whose mean held-out NDCG@10 is below serving's by more than this."""
    confidence: float = 0.95
    """Refuse a candidate whose paired-bootstrap interval of NDCG@10 (candidate - serving) lies below zero."""
    bootstrap_samples: int = 1000
    http_port: int = 6067
    """The trainer's /health and /metrics (on http.host, guarded by http.token like the worker's)."""


@dataclass
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 6066
    token: str | None = None


@dataclass
class Config:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    state: StateConfig = field(default_factory=StateConfig)
    model_store: ModelStoreConfig = field(default_factory=ModelStoreConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    http: HttpConfig = field(default_factory=HttpConfig)


def _one_line(exc: OmegaConfBaseException) -> str:
    """OmegaConf messages carry a multi-line 'full_key / object_type' trailer; keep the first line and key."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    key = getattr(exc, "full_key", None)
    return f"{first} (key: {key})" if key and str(key) not in first else first


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema <- file <- overrides, validated; interpolations (``${oc.env:...}``) resolved eagerly."""
    schema = OmegaConf.structured(Config)
    file = Path(path) if path else DEFAULT_CONFIG
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    try:
        merged = OmegaConf.merge(schema, OmegaConf.load(file))
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            key, value = item.split("=", 1)
            if OmegaConf.select(merged, key, default="<missing>") == "<missing>":
                raise ConfigError(f"unknown config key {key!r}")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([f"{key}={value}"]))
        OmegaConf.resolve(merged)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    except (OSError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"cannot read config {file}: {exc}") from None
    _check(cfg)
    return cfg  # type: ignore[return-value]


def _check(cfg: Config) -> None:
    """Value checks the type system cannot express."""
    choices = {
        "model.name": (cfg.model.name, {"lrurec", "linrec", "sasrec"}),
        "state.dtype": (cfg.state.dtype, {"float32", "float16"}),
        "stream.unknown_items": (cfg.stream.unknown_items, {"dlq", "oov"}),
        "train.device": (cfg.train.device, {"auto", "cpu", "cuda"}),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {sorted(allowed)}")
    positive = {
        "topics.partitions": cfg.topics.partitions,
        "stream.batch_size": cfg.stream.batch_size,
        "stream.top_k": cfg.stream.top_k,
        "model.max_len": cfg.model.max_len,
        "model.d_model": cfg.model.d_model,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if not 0 < cfg.broker.port < 65536:
        raise ConfigError(f"broker.port must be a TCP port, got {cfg.broker.port}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def as_dict(cfg: Any) -> dict[str, Any]:
    container = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def resolve_path(path: str) -> Path:
    """Relative paths in the config are relative to the working directory the command runs in."""
    return Path(path).expanduser().resolve()


__all__ = ["Config", "ConfigError", "DictConfig", "as_dict", "load_config", "resolve_path", "to_yaml"]
