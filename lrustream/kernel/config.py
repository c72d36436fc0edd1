"""Typed configuration: one schema (dataclasses), one default file, overrides from the command line.

Every command loads the same way: the dataclass schema, then the default file :data:`DEFAULT_CONFIG` (shipped in
the package; ``configs/default.yaml`` is its copy in the source tree) or ``--config FILE``, then ``key=value``
overrides. OmegaConf checks keys and types against the schema and :data:`RULES` the values
(ranges, choices, Kafka security), so a typo, a wrong type or a value out of range is refused before anything
starts; :class:`ConfigError` carries the one-line reason the CLI prints, naming the key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lrustream.kernel.errors import LrustreamError

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")
"""The default config file, shipped inside the package (configs/default.yaml in the source tree is its copy)."""


class ConfigError(LrustreamError, ValueError):
    """A configuration that cannot be used; the message is one line meant for a human (exit 2)."""

    exit_code = 2


@dataclass
class KafkaSecurity:
    """How every Kafka client authenticates and encrypts: the same settings reach librdkafka (confluent-kafka) and
    aiokafka (Faust), mapped to each one's names in lrustream/kernel/kafka.py."""

    protocol: str = "PLAINTEXT"
    """PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL: librdkafka's ``security.protocol``."""
    sasl_mechanism: str | None = None
    """PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512; required, with username and password, when the protocol is SASL_*
    (every client gets the same one: no client default applies, as librdkafka's and aiokafka's differ)."""
    sasl_username: str | None = None
    """The SASL user; required when the protocol is SASL_*."""
    sasl_password: str | None = None
    """The SASL user's password; required when the protocol is SASL_*. Give it by environment variable rather
    than in a file; ``lrustream config show`` masks it."""
    ssl_cafile: str | None = None
    """PEM file of the certificate authorities that sign the brokers' certificates (unset: the system's)."""
    ssl_certfile: str | None = None
    """PEM file of this client's certificate, for brokers that authenticate clients by TLS."""
    ssl_keyfile: str | None = None
    """PEM file of the private key of ``ssl_certfile``."""
    ssl_check_hostname: bool = True
    """With SSL: check that the broker's certificate names the host connected to. Turn off only for test
    certificates that do not name their host."""


@dataclass
class KafkaConfig:
    """Where the Kafka cluster is and how every client of this process reaches it."""

    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated ``host:port`` list of brokers to bootstrap from. The default config file points it at the
    embedded broker (``broker.host:broker.port``)."""
    client_id: str = "lrustream"
    """The ``client.id`` Kafka clients report to the brokers (their logs and quotas). A worker's input consumer
    appends its advertised HTTP address to it, so other workers can redirect requests to it."""
    security: KafkaSecurity = field(default_factory=KafkaSecurity)
    """Authentication and encryption (the ``kafka.security`` section)."""


@dataclass
class TopicsConfig:
    """The names of the Kafka topics lrustream reads and writes, and how ``lrustream topics create`` (run by
    every worker and trainer at start-up) creates the missing ones; a topic that exists is left as it is."""

    interactions: str = "interactions"
    """Input events, keyed by user id: one JSON object per event."""
    recommendations: str = "recommendations"
    """Output: one recommendation record per input event, keyed by user id."""
    dlq: str = "interactions.dlq"
    """Dead letters: a copy of each input record that could not be served, with the reason and its source in
    headers (1 partition)."""
    training_examples: str = "training-examples"
    """What workers send the online trainer: each served user's window, one record per user and micro-batch."""
    model_updates: str = "model-updates"
    """Operators' refresh requests to the trainer (stream/updates.py); 1 partition."""
    model_versions: str = "model-versions"
    """Model versions, chunked, and which one to serve, compacted: how versions reach every host
    (stream/versions.py); 1 partition."""
    state_changelog: str = "lrustream-state-changelog"
    """The user states, compacted: a worker restores the partitions it is given from it."""
    items: str = "items"
    """Catalogue control, compacted: key = item id, value ``{"status": "blocked" | "active"}``
    (stream/catalogue.py); 1 partition."""
    partitions: int = 4
    """Partitions of the interactions, recommendations, training-examples and state changelog topics, which must
    be equal: a user lives on the same partition number in each. The most workers that can share the load."""
    replication_factor: int = 0
    """Replicas of each topic created: 0 = as many as the cluster has brokers, at most 3; -1 = the brokers'
    ``default.replication.factor``; or a number."""
    min_insync_replicas: int = 0
    """``min.insync.replicas`` of each topic created: the replicas that must have a write before it is
    acknowledged (every producer of lrustream uses ``acks=all``). 0 = 2 on topics of 3 replicas or more, else 1."""


@dataclass
class BrokerConfig:
    """The embedded KRaft broker, or cluster of brokers, started by ``lrustream broker start``."""

    nodes: int = 1
    """Nodes (each a broker and a controller): 1, or 3 and more for a cluster that outlives a node (every topic
    then has 3 replicas and ``min.insync.replicas`` 2). Node ``i`` listens on ``port + 2(i-1)`` and the port
    after it, with its own folder ``node-<i>`` under ``data_dir``."""
    data_dir: str = ".lrustream/broker"
    """Its storage, properties, pid file and log (formatted once; relative to the working directory)."""
    jars_dir: str = ".lrustream/kafka-jars"
    """Where ``lrustream broker fetch`` puts the Kafka jars resolved from Maven Central (cached: offline after)."""
    host: str = "127.0.0.1"
    """The address it listens on and advertises."""
    port: int = 9092
    """Its client port."""
    controller_port: int = 0
    """Its KRaft controller port (0 = ``port`` + 1)."""
    heap: str = "512m"
    """The JVM's maximum heap (``-Xmx``)."""
    jvm_options: str = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
    """Extra flags for the broker's JVM, split on spaces. The default suits what this broker is for (tests, demos,
    one small machine): a JVM that has just started spends its first minutes compiling Kafka's hot paths, and the
    optimising (C2) compiler takes CPU from the worker beside it just when the first events are served. C1 alone
    compiles soon and cheaply; the serial collector runs no concurrent GC threads on a small heap. A long-lived
    broker that carries heavy traffic wants "-XX:+UseG1GC" here (full compilation) instead."""
    start_timeout_s: float = 60.0
    """``broker start`` fails when the broker does not answer metadata requests this long after launch."""


@dataclass
class StateConfig:
    """The worker's per-user state store (RocksDB, restored from ``topics.state_changelog``)."""

    dir: str = ".lrustream/state"
    """Where the local state store lives (under a folder named ``stream.app_id``)."""
    dtype: str = "float32"
    """How recurrent states are stored: float32 | float16 (half the size, at float16's precision)."""
    ttl_days: float = 90.0
    """A user state not updated for this long is deleted (locally and in the changelog); the user's next event
    starts from a fresh state. 0 keeps states for ever. Checked every minute, a bounded scan at a time."""


@dataclass
class ModelStoreConfig:
    """This host's model store: its cache of the versions the model-versions topic carries."""

    dir: str = ".lrustream/models"
    """Where versions' weights and vocabularies, and the trainer's round records, are kept."""
    keep_versions: int = 10
    """After each online round that publishes, the weights of older versions are removed (``lrustream models gc``):
    the newest this many stay loadable, plus the serving and the pinned version."""


@dataclass
class ModelConfig:
    """The config file's ``model:`` section: the union of every model's hyper-parameters under stable keys.

    The truth about each model is its config dataclass beside it (``LRURecConfig`` in models/lrurec.py, ...):
    it declares which of these keys that model reads, and what each means (models/registry.py's
    ``model_config`` turns this section into it). A key the chosen model does not declare is ignored."""

    name: str = "lrurec"
    """The model to build: a name in models/registry.py (checked there, before a command that builds or loads a
    model starts; the kernel imports no model)."""
    d_model: int = 64
    """The chosen model's ``d_model``, if its config declares one (so for each field below)."""
    num_layers: int = 2
    """The chosen model's ``num_layers``."""
    num_heads: int = 2
    """The chosen model's ``num_heads``."""
    dropout: float = 0.2
    """The chosen model's ``dropout``."""
    attn_dropout: float = 0.2
    """The chosen model's ``attn_dropout``."""
    max_len: int = 200
    """The chosen model's ``max_len``; also the training windows' length."""
    linrec_causal: bool = True
    """The chosen model's ``causal`` (the key its config's ``file_keys`` maps it to)."""


@dataclass
class TrainConfig:
    """Offline training (``lrustream train``, and the starting model of ``evaluate-stream``). The optimiser's
    settings (weight decay, epsilon, clipping), the device and the seed apply to the online trainer too."""

    lr: float = 1e-3
    """AdamW learning rate of offline training (the online trainer has its own, ``online.lr``)."""
    weight_decay: float = 0.01
    """AdamW weight decay of every weight but biases and LayerNorms."""
    adam_eps: float = 1e-9
    """AdamW's epsilon."""
    grad_clip: float = 5.0
    """Gradients are clipped to this global norm before each step."""
    batch_size: int = 128
    """Training sequences per step (and the online trainer's when ``online.batch_size`` is 0)."""
    eval_batch_size: int = 256
    """Users scored at once in validation and test."""
    max_steps: int = 100_000
    """Training stops after this many steps at most."""
    val_every: int = 500
    """Validation every this many steps; the best validation's weights are the result."""
    patience: int = 10
    """Training stops after this many validations without a better validation Recall@10."""
    seed: int = 42
    """Seed of the weights' initialisation, the batches' order and the online trainer's sampling."""
    device: str = "auto"
    """auto | cpu | cuda: where training runs, offline and online (auto: CUDA when available)."""
    num_threads: int = 0
    """torch CPU threads of offline training (0 = torch's default, every core). Runs sharing a host each want
    their share of the cores."""
    sampled_softmax_above: int = 20_000
    """Catalogues of more items than this are trained, offline and online, with a sampled softmax (the batch's own
    targets and ``negatives`` uniform draws, logQ-corrected: trainer/loss.py) instead of the full one, and the item
    table's AdamW update touches the rows a step used only, so a step's cost no longer grows with the catalogue.
    The sampled loss is an estimate of the full one, so it is used only where it saves about half of a step:
    measured on 2 CPU cores with a default LRURec on 32 x 200 windows of random items
    (lrustream/bench/training.py), the full-softmax step took 0.8 times the sampled one at 5,000 items, about the
    same at 10,000, 1.9 times at 20,000 and 2.4 times at 40,000. Evaluation and the online gate always rank the
    whole catalogue."""
    negatives: int = 2048
    """Items drawn uniformly per batch (with replacement) as the sampled softmax's shared negatives, besides the
    batch's own targets; each group of an online step draws its own."""


@dataclass
class StreamConfig:
    """The streaming worker (``lrustream worker``): its consumer group, micro-batches and recommendations."""

    app_id: str = "lrustream-worker"
    """The workers' consumer group on the input topic (workers with the same one share its partitions) and the
    name of the local state folder."""
    batch_size: int = 512
    """The most events one step of the input loop takes. It takes what has arrived, without waiting for more, so
    a lone event is served at once and a backlog makes batches large by itself."""
    commit_interval_ms: int = 1000
    """States and input offsets are committed this often (stream/pipeline.py). A crash replays at most the
    events since the last commit."""
    top_k: int = 10
    """Items in each recommendation (a request may ask for another ``k``)."""
    exclude_seen: bool = True
    """Leave the items of the user's window (``model.max_len`` most recent) out of their recommendations."""
    unknown_items: str = "dlq"
    """dlq | oov: an event whose item the serving model does not know goes to the dead-letter topic (dlq), or is
    served with the model's unknown-item token (oov) so the user's state still advances."""
    max_value_bytes: int = 65536
    """An input record larger than this is a dead letter."""
    min_step_rows: int = 16
    """Every batched model step is padded to at least this many users: small matrix products take other kernels
    than large ones, and from about a dozen rows on a user's numbers no longer depend on how the stream was cut
    into micro-batches."""
    emit_training_examples: bool = True
    """Send each served user's window to ``topics.training_examples`` for the online trainer."""
    stall_after_s: float = 60.0
    """/health says "degraded" when a micro-batch or the input stalls this long (the trainer's /health when
    examples wait unconsumed this long)."""
    stop_timeout_s: float = 5.0
    """After SIGTERM/SIGINT, the worker exits anyway this long later; what it had not committed is replayed by
    the partitions' next owner."""
    session_timeout_s: float = 60.0
    """A worker silent this long (frozen, cut off) leaves the consumer group, and its partitions move to the
    others. Must lie within the broker's group.min/max.session.timeout.ms."""
    popular_half_life_s: float = 3600.0
    """An event counts half as much in the popular fallback (users without a state) this long after it."""
    answer_cache_users: int = 20_000
    """Users whose last recommendation a worker keeps in memory (the most recently served; about 1.3 KB each, 25 MB
    at this default), so that a request for one of them with the default ``k`` and no exclusions is answered
    without scoring, when nothing has changed since (stream/processor.py, ``recommend``). 0 keeps none."""
    torch_threads: int = 1
    """torch CPU threads of a worker (0 = torch's default, every core). A worker's steps are small (a batch of
    events, one user per request), so a second thread gains little and waits for work on a core that the broker
    and the worker's own Kafka clients need, which adds to the latency of every event."""
    approximate_above_items: int = 100_000
    """Catalogues of more items than this are ranked through an approximate index that a worker builds beside
    serving once it has swapped to a version, ranking it exactly until then (stream/retrieval.py: candidates from
    clustered items, then exact exclusions and exact scores); smaller ones by one product with the whole item
    table. -1: always exact. The build also times both ways and keeps the index
    only for the call sizes it is faster for. The default is about where that starts to happen on a 2-core
    machine for item embeddings as evenly spread as a trained LRURec's (at 100,000 items both cost about 15 ms for
    16 rows at recall 0.99; ``lrustream bench catalogue`` prints both): below it, each version's build would
    take CPU from serving for nothing."""
    approximate_recall: float = 0.99
    """The recall@``top_k`` the index must reach against exact ranking: measured when it is built, on the model's
    outputs for sampled histories; it scans as few item clusters as reach it. Shown as
    ``lrustream_worker_index_recall``."""


@dataclass
class OnlineConfig:
    """The online fine-tuning loop (``lrustream trainer``); the round's contract is in trainer/online.py."""

    group_id: str = "lrustream-trainer"
    """The consumer group under which the trainer commits its position in ``topics.training_examples`` (a
    restarted trainer resumes there)."""
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
    """Share of each batch drawn from users without new events (recent and reservoir). Half of each batch
    replays them, so the model follows the stream without forgetting older users; a starting model that is far
    from converged also keeps learning from old windows."""
    min_steps: int = 10
    """Steps a round takes whatever its time."""
    max_steps: int = 100
    """Steps a round takes at most, however much time it has."""
    max_train_seconds: float = 4.0
    """A round trains for this long, or for as long as the round spends outside training (loading and growing the
    vocabulary, measured; the gate and publishing, predicted from the last few rounds) when that is longer, so
    that training is about half of every round or more (less when the gate or publishing takes longer than
    predicted). Short rounds serve fresher versions on a machine the trainer shares with the worker and the
    broker."""
    num_threads: int = 0
    """torch CPU threads of the trainer (0 = torch's default, every core). Where it shares the cores with a
    worker and a broker, 1 avoids threads waiting on each other."""
    max_items: int = 500_000
    """Items the online vocabulary may hold (up to 10,000,000 and more, memory allowing). Each item costs, at
    d_model=64: 260 bytes of table row (embedding and bias) in every version's weights, on the model-versions
    topic and in every host's model store; in every worker that row and about 130 bytes of vocabulary (ids of up
    to 7 characters), twice while a swap loads the next version; in the trainer the row, its gradient and two
    AdamW moments (about 1 KiB) and the vocabulary. So 1,000,000 items make versions of 270 MB and cost each
    worker about 400 MB; 10,000,000 make versions of 2.7 GB and cost each worker about 4 GB (8 GB during a swap)
    and the trainer about 12 GB (docs/operations.md, "Large catalogues"). Items first seen after the vocabulary is
    full stay unknown to the model (an unknown-item token as input, no training target; the worker serves them
    by ``stream.unknown_items``) and are counted in ``lrustream_trainer_unknown_items``."""
    lr: float = 2e-3
    """AdamW learning rate of the first round, and the highest any round uses; the moments carry over from round
    to round. Each round the gate judges sets the next one's: times 0.5 after a candidate whose mean held-out
    NDCG@10 did not beat the serving model's, times 1.25 (up to ``lr``) after one that did, never below
    ``lr / 100`` (trainer/online.py). A restarted trainer begins again at ``lr``."""
    warmup_steps: int = 30
    """A fresh optimiser (the learner's first round, or after a rollback) raises the learning rate linearly over
    this many steps: Adam's first updates move every weight by about ``lr`` whatever its gradient (0 = none)."""
    dropout: float = 0.0
    """Dropout while fine-tuning (-1 = the model's own). Dropout is about half a CPU step's cost."""
    holdout_fraction: float = 0.1
    """Share of the new events (the most recent ones) held out to judge the candidate until a gate has measured
    how many it needs (``detectable_drop``)."""
    min_holdout: int = 500
    """Fewer held-out (or trainable) events are no evidence: the round publishes nothing and waits for more."""
    max_holdout: int = 20_000
    """The most events a round holds out, however many the gate would need to tell."""
    tolerance: float = 0.05
    """The gate's margin as a share of the serving model's held-out NDCG@10: with enough held-out hits
    (``detectable_drop``), a candidate whose mean NDCG@10 is below serving's by more than this share of it is
    refused, on any stream, dense or sparse. The live watch uses the same share of the parent's hit rate."""
    confidence: float = 0.95
    """Confidence of the gate's paired-bootstrap interval of NDCG@10 (candidate - serving)."""
    detectable_drop: float = 0.3
    """The relative drop in hit rate that the gate (on held-out events) and the live watch (on served events) are
    sized to see with probability ``power``: rounds hold out enough events for the serving model's measured hit
    rate to give about 150 hits (trainer/gate.py), and a version is judged live on as many events against its
    parent (trainer/live.py)."""
    power: float = 0.8
    """The chance that the gate and the live watch see a drop of ``detectable_drop``."""
    rollback: bool = True
    """Roll back automatically a version an online round published that serves worse live than its parent
    (trainer/live.py)."""
    bootstrap_samples: int = 1000
    """Resamples of the gate's paired bootstrap (more: a steadier interval, a slower gate)."""
    http_port: int = 6067
    """The trainer's /health, /metrics and operator page / (on http.host, guarded by http.token like the worker's;
    0 = any free port)."""


@dataclass
class HttpConfig:
    """The worker's HTTP API (/recommendations, /health, /metrics, /model, /refresh); the trainer's /health,
    /metrics and operator page / use the same host and token on ``online.http_port``."""

    host: str = "127.0.0.1"
    """The address the HTTP API listens on (0.0.0.0: every interface, which needs ``token`` or ``allow_open``)."""
    port: int = 6066
    """The worker's HTTP port."""
    token: str | None = None
    """A bearer token (``Authorization: Bearer TOKEN``) required by the worker's POST /refresh and the trainer's
    /metrics; unset or empty guards nothing. Give it by environment variable; ``lrustream config show`` masks
    it."""
    allow_open: bool = False
    """Listening beyond loopback without ``http.token`` is refused unless this is true (an operator's explicit
    opt-in, e.g. in a container whose port is published on the host's loopback only): see
    :func:`lrustream.kernel.http.check_http_exposure`."""
    advertised_url: str | None = None
    """Where clients reach this worker's HTTP API (e.g. ``http://worker-2:6066``): other workers redirect requests
    for the users this one owns there (stream/queries.py). Default: ``http://{host}:{port}``, or the host's name
    when ``host`` binds every interface."""


@dataclass
class Config:
    """The whole configuration: one section per part of the system."""

    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    """The Kafka cluster and how to reach it."""
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    """Topic names and how they are created."""
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    """The embedded local broker."""
    state: StateConfig = field(default_factory=StateConfig)
    """The worker's per-user state store."""
    model_store: ModelStoreConfig = field(default_factory=ModelStoreConfig)
    """This host's model store."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model's hyper-parameters."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Offline training."""
    stream: StreamConfig = field(default_factory=StreamConfig)
    """The streaming worker."""
    online: OnlineConfig = field(default_factory=OnlineConfig)
    """The online trainer."""
    http: HttpConfig = field(default_factory=HttpConfig)
    """The HTTP APIs."""


def _one_line(exc: OmegaConfBaseException) -> str:
    """OmegaConf messages carry a multi-line 'full_key / object_type' trailer; keep the first line and key."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    key = getattr(exc, "full_key", None)
    return f"{first} (key: {key})" if key and str(key) not in first else first


def local_bootstrap(host: str, port: int, nodes: int) -> str:
    """The bootstrap list of the embedded broker or cluster: ``host:port`` of each of its ``nodes`` nodes, which
    listen on every other port from ``port`` on (lrustream/broker). The default config file's
    ``kafka.bootstrap_servers`` is this, as ``${lrustream_bootstrap:${broker.host},${broker.port},${broker.nodes}}``."""
    return ",".join(f"{host}:{port + 2 * i}" for i in range(nodes))


OmegaConf.register_resolver("lrustream_bootstrap", local_bootstrap, replace=True)


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


@dataclass(frozen=True)
class Rule:
    """What a key's value must be: ``ok(value)``, and ``text`` that says so in the error message."""

    ok: Callable[[Any], bool]
    text: str


def _at_least(low: float) -> Rule:
    return Rule(lambda v: v >= low, f"must be >= {low}")


def _above(low: float) -> Rule:
    return Rule(lambda v: v > low, f"must be > {low}")


def _within(low: float, high: float) -> Rule:
    return Rule(lambda v: low <= v <= high, f"must be in [{low}, {high}]")


def _one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, f"must be one of {', '.join(choices)}")


PORT, PORT_OR_0 = _within(1, 65535), _within(0, 65535)
PROBABILITY = Rule(lambda v: 0 <= v < 1, "must be in [0, 1)")
FRACTION = Rule(lambda v: 0 < v < 1, "must be in (0, 1)")
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
"""Username/password mechanisms both librdkafka and aiokafka (Faust's ``SASLCredentials``) speak."""

RULES: dict[str, Rule] = {
    "kafka.security.protocol": _one_of(*SECURITY_PROTOCOLS),
    "kafka.security.sasl_mechanism": _one_of(*SASL_MECHANISMS),
    "topics.partitions": _at_least(1),
    "topics.replication_factor": Rule(lambda v: v >= -1, "must be >= 1 (or 0: min(3, brokers); -1: the brokers' "
                                                         "default)"),
    "topics.min_insync_replicas": _at_least(0),
    "broker.nodes": _at_least(1),
    "broker.port": PORT,
    "broker.controller_port": PORT_OR_0,
    "broker.start_timeout_s": _above(0),
    "state.dtype": _one_of("float32", "float16"),
    "state.ttl_days": _at_least(0),
    "model_store.keep_versions": _at_least(1),
    "model.d_model": _at_least(1),
    "model.num_layers": _at_least(1),
    "model.num_heads": _at_least(1),
    "model.dropout": PROBABILITY,
    "model.attn_dropout": PROBABILITY,
    "model.max_len": _at_least(1),
    "train.lr": _above(0),
    "train.weight_decay": _at_least(0),
    "train.adam_eps": _at_least(0),
    "train.grad_clip": _above(0),
    "train.batch_size": _at_least(1),
    "train.eval_batch_size": _at_least(1),
    "train.max_steps": _at_least(1),
    "train.val_every": _at_least(1),
    "train.patience": _at_least(1),
    "train.device": _one_of("auto", "cpu", "cuda"),
    "train.num_threads": _at_least(0),
    "train.sampled_softmax_above": _at_least(0),
    "train.negatives": _at_least(1),
    "stream.batch_size": _at_least(1),
    "stream.commit_interval_ms": _at_least(1),
    "stream.top_k": _at_least(1),
    "stream.unknown_items": _one_of("dlq", "oov"),
    "stream.max_value_bytes": _at_least(1),
    "stream.min_step_rows": _at_least(1),
    "stream.torch_threads": _at_least(0),
    "stream.stall_after_s": _above(0),
    "stream.stop_timeout_s": _at_least(0),
    "stream.session_timeout_s": _within(6, 1800),  # the broker's default group.{min,max}.session.timeout.ms
    "stream.popular_half_life_s": _above(0),
    "stream.answer_cache_users": _at_least(0),
    "stream.approximate_above_items": _at_least(-1),
    "stream.approximate_recall": _within(0.5, 1.0),
    "online.every_events": _at_least(1),
    "online.max_items": _at_least(1),
    "online.every_seconds": _at_least(0),
    "online.recent_buffer": _at_least(1),
    "online.reservoir_buffer": _at_least(0),
    "online.train_len": _at_least(0),
    "online.batch_size": _at_least(0),
    "online.length_groups": _at_least(1),
    "online.replay_share": _within(0, 1),
    "online.min_steps": _at_least(0),
    "online.max_steps": _at_least(1),
    "online.max_train_seconds": _above(0),
    "online.num_threads": _at_least(0),
    "online.lr": _above(0),
    "online.warmup_steps": _at_least(0),
    "online.dropout": Rule(lambda v: v == -1 or 0 <= v < 1, "must be in [0, 1) (or -1: the model's own)"),
    "online.holdout_fraction": FRACTION,
    "online.min_holdout": _at_least(1),
    "online.max_holdout": _at_least(1),
    "online.tolerance": _at_least(0),
    "online.power": FRACTION,
    "online.detectable_drop": FRACTION,
    "online.confidence": FRACTION,
    "online.bootstrap_samples": _at_least(1),
    "online.http_port": PORT_OR_0,  # 0 = any free port
    "http.port": PORT,
}
"""Value checks the type system cannot express, by dotted key; a key left at None (optional) is not checked."""

ORDERED = [("online.min_steps", "online.max_steps"), ("online.min_holdout", "online.max_holdout")]
"""Pairs of keys whose first must not exceed the second."""


def _get(cfg: Config, key: str) -> Any:
    return reduce(getattr, key.split("."), cfg)


def _enforce(cfg: Config, key: str) -> None:
    value, rule = _get(cfg, key), RULES[key]
    if value is not None and not rule.ok(value):
        raise ConfigError(f"{key} {rule.text} (got {value!r})")


def _check(cfg: Config) -> None:
    for key in RULES:
        _enforce(cfg, key)
    for low, high in ORDERED:
        if _get(cfg, low) > _get(cfg, high):
            raise ConfigError(f"{low} must be <= {high} (got {_get(cfg, low)!r} > {_get(cfg, high)!r})")
    sasl_mechanism(cfg)


def sasl_mechanism(cfg: Config) -> str | None:
    """The SASL mechanism every Kafka client gets (librdkafka and Faust alike; lrustream/kernel/kafka.py): None unless
    ``kafka.security.protocol`` is SASL_*, then ``kafka.security.sasl_mechanism``, which is required, as are the
    username and password it authenticates with (no client default applies: librdkafka's is GSSAPI, aiokafka's
    PLAIN). Raises :class:`ConfigError` naming the key; runs at load time and again for every client mapping."""
    _enforce(cfg, "kafka.security.protocol")
    _enforce(cfg, "kafka.security.sasl_mechanism")
    sec = cfg.kafka.security
    if not sec.protocol.startswith("SASL_"):
        return None
    if not sec.sasl_mechanism:
        raise ConfigError(f"kafka.security.sasl_mechanism is required with kafka.security.protocol={sec.protocol} "
                          f"(one of {', '.join(SASL_MECHANISMS)})")
    for key, value in (("sasl_username", sec.sasl_username), ("sasl_password", sec.sasl_password)):
        if not value:
            raise ConfigError(f"kafka.security.{key} is required with kafka.security.sasl_mechanism="
                              f"{sec.sasl_mechanism}" + (" (LRUSTREAM_KAFKA_SASL_PASSWORD sets it)"
                                                          if key == "sasl_password" else ""))
    return sec.sasl_mechanism


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def as_dict(cfg: Any) -> dict[str, Any]:
    container = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def resolve_path(path: str) -> Path:
    """Relative paths in the config are relative to the working directory the command runs in."""
    return Path(path).expanduser().resolve()


__all__ = ["Config", "ConfigError", "DictConfig", "as_dict", "load_config", "resolve_path", "sasl_mechanism",
           "to_yaml"]
