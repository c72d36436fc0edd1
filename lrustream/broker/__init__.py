"""The embedded local broker: real Apache Kafka (KRaft) on loopback, one node or a cluster of several.

Why our own launcher: tests and demos must talk to a real Kafka, and many machines (CI runners among them) have
Java and Maven but no Docker engine. The jars come from Maven Central through ``pom.xml`` beside this file and
are cached in ``broker.jars_dir``; storage is formatted once per ``broker.data_dir``; the pid file records the
process we started so that ``stop`` never touches a broker it did not start.

A :class:`LocalBroker` is one node, a combined broker and controller. One node alone is its own KRaft quorum and
every internal topic has one replica. A :class:`LocalCluster` of ``n`` nodes (``broker.nodes``) runs ``n`` such
processes on consecutive port pairs, each with its own data dir (``node-<id>`` under ``broker.data_dir``), all
of them voters of one static quorum: any majority elects the active controller, so a three-node cluster lives
on with one node down. Its internal topics (consumer offsets, transaction state) have ``min(3, n)`` replicas and
need ``min.insync.replicas`` of them in sync (2 on three nodes or more), as a production cluster's do.

Every failure a user can cause (no java, no mvn, port taken, corrupt data dir) raises :class:`BrokerError`
whose message is one line saying what to do.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from lrustream.kernel.config import BrokerConfig
from lrustream.kernel.errors import LrustreamError
from lrustream.kernel.kafka import min_insync_for, replicas_for

POM = Path(__file__).with_name("pom.xml")
MAIN_CLASS = "kafka.Kafka"
LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.out.ref = OUT
logger.kafka.name = kafka
logger.kafka.level = {level}
logger.state.name = state.change.logger
logger.state.level = WARN
"""


class BrokerError(LrustreamError):
    """A broker operation failed for a reason the user can act on (message is one line)."""


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    pid: int | None
    bootstrap: str
    answering: bool = False
    node_id: int = 1

    def line(self) -> str:
        if not self.running:
            return f"broker not running (data dir would serve {self.bootstrap})"
        health = "answering metadata requests" if self.answering else "NOT answering yet"
        return f"broker running pid={self.pid} bootstrap={self.bootstrap} ({health})"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def metadata_answers(bootstrap: str, timeout_s: float = 5.0) -> bool:
    """True when a Kafka client gets broker metadata back: the only meaningful 'is it up' check."""
    from confluent_kafka.admin import AdminClient

    quiet = logging.getLogger("lrustream.broker.probe")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": quiet, "socket.timeout.ms": 2000})
    try:
        return bool(admin.list_topics(timeout=timeout_s).brokers)
    except Exception:
        return False


def new_cluster_id(random_bytes: Callable[[], bytes] = lambda: uuid.uuid4().bytes) -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding.

    Kafka's own ``Uuid.randomUuid`` redraws ids that start with '-', because the storage
    tool's argument parser reads ``-t -abc`` as a missing value followed by an option.
    One draw in 64 starts that way, so without the redraw a fresh broker fails to format.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(random_bytes()).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class LocalBroker:
    """Start, stop and inspect one local Kafka broker rooted at ``data_dir``."""

    def __init__(
        self,
        data_dir: str | Path,
        jars_dir: str | Path,
        host: str = "127.0.0.1",
        port: int = 9092,
        controller_port: int = 0,
        heap: str = "512m",
        start_timeout_s: float = 60.0,
        jvm_options: str = BrokerConfig.jvm_options,
        log_level: str = "WARN",
        sasl_port: int = 0,
        sasl_users: dict[str, str] | None = None,
        node_id: int = 1,
        voters: str = "",
        cluster_id: str = "",
        replicas: int = 1,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.jars_dir = Path(jars_dir).expanduser().resolve()
        self.host = host
        self.port = port
        self.controller_port = controller_port or port + 1
        self.heap = heap
        self.start_timeout_s = start_timeout_s
        self.jvm_options = jvm_options.split()
        self.log_level = log_level
        self.sasl_port = sasl_port  # when set: a SASL_PLAINTEXT listener too (mechanism PLAIN, ``sasl_users``)
        self.sasl_users = sasl_users or {}
        self.node_id = node_id
        self.voters = voters  # a cluster's static quorum, "1@host:port,2@host:port,..."; "" = this node alone
        self.cluster_id = cluster_id  # the id every node of a cluster is formatted with ("" = a new one)
        self.replicas = replicas  # replicas of the internal topics (the cluster's size, at most 3)

    @classmethod
    def from_config(cls, cfg) -> LocalBroker:  # cfg: lrustream.kernel.config.Config
        b = cfg.broker
        return cls(b.data_dir, b.jars_dir, b.host, b.port, b.controller_port, b.heap, b.start_timeout_s,
                   jvm_options=b.jvm_options)

    # ----- paths -------------------------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def properties_file(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log_dirs(self) -> Path:
        return self.data_dir / "kraft-logs"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"

    # ----- jars --------------------------------------------------------------------------------------------
    def _jars_stamp(self) -> Path:
        return self.jars_dir / ".resolved-from"

    def fetch_jars(self) -> Path:
        """Resolve the broker jars once (Maven Central); later calls are offline no-ops."""
        pom_digest = hashlib.sha256(POM.read_bytes()).hexdigest()
        stamp = self._jars_stamp()
        if stamp.is_file() and stamp.read_text().strip() == pom_digest:
            return self.jars_dir
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError("'mvn' (Apache Maven) is not on PATH: install Maven to resolve the Kafka jars once")
        tmp = self.jars_dir.with_name(self.jars_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
               "-DincludeScope=runtime", f"-DoutputDirectory={tmp}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
            raise BrokerError(f"Maven could not resolve the Kafka jars ({tail[0]}); is Maven Central reachable?")
        shutil.rmtree(self.jars_dir, ignore_errors=True)
        tmp.rename(self.jars_dir)
        stamp.write_text(pom_digest + "\n")
        return self.jars_dir

    # ----- lifecycle ---------------------------------------------------------------------------------------
    def _pid(self) -> int | None:
        """The pid in our pid file, if that process is alive and is the broker of THIS data dir."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
            cmdline = psutil.Process(pid).cmdline()
        except (OSError, ValueError, IndexError, psutil.Error):
            return None
        if MAIN_CLASS in cmdline and str(self.properties_file) in cmdline:
            return pid
        return None

    def status(self, probe_timeout_s: float = 5.0) -> BrokerStatus:
        pid = self._pid()
        answering = pid is not None and metadata_answers(self.bootstrap, probe_timeout_s)
        return BrokerStatus(pid is not None, pid, self.bootstrap, answering, self.node_id)

    def start(self) -> BrokerStatus:
        """Start the broker unless ours already runs; return once it answers metadata requests."""
        current = self.status()
        if current.running:
            if not current.answering:
                self.wait_ready(current.pid)
            return self.status()
        self.wait_ready(self.launch())
        return self.status()

    def launch(self) -> int | None:
        """Format storage if needed and start the process without waiting for it to answer (a cluster's nodes
        answer only once a majority of them runs); the pid of ours, whether just started or already running."""
        if (pid := self._pid()) is not None:
            return pid
        java = shutil.which("java")
        if java is None:
            raise BrokerError("'java' is not on PATH: install a Java 17+ runtime to run the local Kafka broker")
        jars = self.fetch_jars()
        for port in (self.port, self.controller_port):
            if port_in_use(self.host, port):
                raise BrokerError(f"port {port} on {self.host} is already in use by another process; "
                                  f"stop it or set broker.port to a free port")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._format_storage(java, jars)
        return self._launch(java, jars)

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the broker we started (SIGTERM, then SIGKILL); False when none of ours was running."""
        pid = self._pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        self.pid_file.unlink(missing_ok=True)
        return True

    def kill(self) -> bool:
        """SIGKILL the broker we started, as a crash would end it (no controlled shutdown, nothing flushed);
        False when none of ours was running."""
        pid = self._pid()
        if pid is None:
            return False
        proc = psutil.Process(pid)
        proc.kill()
        proc.wait(10)
        self.pid_file.unlink(missing_ok=True)
        return True

    # ----- internals ---------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        plain, sasl = f"PLAINTEXT://{self.host}:{self.port}", f"SASL_PLAINTEXT://{self.host}:{self.sasl_port}"
        advertised = f"{plain},{sasl}" if self.sasl_port else plain
        replicas, min_isr = str(self.replicas), str(min_insync_for(self.replicas))
        quorum = ({"controller.quorum.voters": self.voters} if self.voters
                  else {"controller.quorum.bootstrap.servers": f"{self.host}:{self.controller_port}"})
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            **quorum,
            "listeners": f"{advertised},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": advertised,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
            "log.dirs": str(self.log_dirs),
            "num.partitions": "1",
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            "default.replication.factor": replicas,
            "min.insync.replicas": min_isr,
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "log.retention.hours": "168",
            "log.segment.bytes": str(64 * 1024 * 1024),
        }
        if self.sasl_port:
            users = " ".join(f'user_{name}="{password}"' for name, password in self.sasl_users.items())
            props.update({"sasl.enabled.mechanisms": "PLAIN",
                          "listener.name.sasl_plaintext.plain.sasl.jaas.config":
                              f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"})
        self.properties_file.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.data_dir / "log4j2.properties").write_text(LOG4J2.format(level=self.log_level))

    def _check_storage(self) -> bool:
        """True when formatted; raise when the data dir holds something that is not a usable Kafka store."""
        meta = self.log_dirs / "meta.properties"
        if not self.log_dirs.exists():
            return False
        if not meta.is_file():
            if any(self.log_dirs.iterdir()):
                raise BrokerError(f"broker data dir {self.log_dirs} is corrupt (no meta.properties); "
                                  f"remove it or set broker.data_dir elsewhere")
            return False
        try:
            fields = dict(line.split("=", 1) for line in meta.read_text().splitlines()
                          if "=" in line and not line.startswith("#"))
        except (OSError, UnicodeDecodeError) as exc:
            raise BrokerError(f"broker data dir {self.log_dirs} is corrupt ({exc}); remove it") from None
        if fields.get("node.id", "").strip() != str(self.node_id) or not fields.get("cluster.id", "").strip():
            raise BrokerError(f"broker data dir {self.log_dirs} is corrupt (meta.properties lacks "
                              f"node.id={self.node_id} or cluster.id); remove it or set broker.data_dir elsewhere")
        return True

    def _format_storage(self, java: str, jars: Path) -> None:
        if self._check_storage():
            return
        cluster_id = self.cluster_id or new_cluster_id()
        alone = [] if self.voters else ["--standalone"]  # a static quorum's voters are in the properties
        cmd = [java, "-cp", f"{jars}/*", "kafka.tools.StorageTool", "format", *alone,
               "-t", cluster_id, "-c", str(self.properties_file)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
            raise BrokerError(f"formatting KRaft storage failed: {lines[-1] if lines else proc.returncode}")

    def _launch(self, java: str, jars: Path) -> int:
        cmd = [java, f"-Xmx{self.heap}", *self.jvm_options, "-Djava.awt.headless=true",
               f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
               "-cp", f"{jars}/*", MAIN_CLASS, str(self.properties_file)]
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.data_dir)
        self.pid_file.write_text(f"{proc.pid} {self.bootstrap}\n")
        return proc.pid

    def wait_ready(self, pid: int | None) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                raise BrokerError(f"broker exited during start-up: {self._last_error()} (log: {self.log_file})")
            if metadata_answers(self.bootstrap, 2.0):
                return
            time.sleep(0.3)
        raise BrokerError(f"broker did not answer on {self.bootstrap} within {self.start_timeout_s:.0f}s "
                          f"(log: {self.log_file})")

    def _last_error(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [ln for ln in lines if " ERROR " in ln or "Exception" in ln]
        return (errors or lines or ["no log output"])[-1].strip()[:300]


class LocalCluster:
    """Start, stop and inspect a cluster of local Kafka nodes, ``node-<id>`` under ``data_dir`` (module docstring);
    a "cluster" of one node is the single broker, in ``data_dir`` itself.

    Node ``i`` (1-based) listens on ``ports[i-1]`` and ``controller_ports[i-1]``. Starting launches every node
    that is not running, then waits until each answers; stopping or killing one node leaves the others serving.
    """

    def __init__(self, data_dir: str | Path, jars_dir: str | Path, ports: list[int], controller_ports: list[int],
                 host: str = "127.0.0.1", heap: str = "512m", start_timeout_s: float = 60.0,
                 jvm_options: str = BrokerConfig.jvm_options, log_level: str = "WARN") -> None:
        if len(ports) != len(controller_ports) or not ports:
            raise BrokerError("a cluster needs one client port and one controller port per node")
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.host = host
        self.start_timeout_s = start_timeout_s
        if len(ports) == 1:  # one node: the single broker, in data_dir itself
            self.nodes = [LocalBroker(self.data_dir, jars_dir, host, ports[0], controller_ports[0], heap,
                                      start_timeout_s, jvm_options, log_level)]
            return
        voters = ",".join(f"{i}@{host}:{cport}" for i, cport in enumerate(controller_ports, start=1))
        cluster_id = self._cluster_id()
        self.nodes = [
            LocalBroker(self.data_dir / f"node-{i}", jars_dir, host, port, cport, heap, start_timeout_s,
                        jvm_options, log_level, node_id=i, voters=voters, cluster_id=cluster_id,
                        replicas=replicas_for(len(ports)))
            for i, (port, cport) in enumerate(zip(ports, controller_ports, strict=True), start=1)]

    @classmethod
    def from_config(cls, cfg, nodes: int | None = None) -> LocalCluster:  # cfg: lrustream.kernel.config.Config
        """``broker.nodes`` nodes (or ``nodes``): node ``i`` on ``broker.port + 2(i-1)`` and the port after it
        (or ``broker.controller_port + i - 1`` when that is set)."""
        b = cfg.broker
        n = nodes or b.nodes
        ports = [b.port + 2 * i for i in range(n)]
        cports = [b.controller_port + i if b.controller_port else port + 1 for i, port in enumerate(ports)]
        return cls(b.data_dir, b.jars_dir, ports, cports, b.host, b.heap, b.start_timeout_s, b.jvm_options)

    @classmethod
    def on_free_ports(cls, data_dir: str | Path, jars_dir: str | Path, nodes: int = 3, **kwargs) -> LocalCluster:
        """A cluster of ``nodes`` on ports free now (tests)."""
        return cls(data_dir, jars_dir, [free_port() for _ in range(nodes)], [free_port() for _ in range(nodes)],
                   **kwargs)

    def _cluster_id(self) -> str:
        """The id all nodes are formatted with, kept beside them so that a node formatted later joins."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.data_dir / "cluster.id"
        if not path.is_file():
            path.write_text(new_cluster_id() + "\n")
        return path.read_text().strip()

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    def node(self, node_id: int) -> LocalBroker:
        if not 1 <= node_id <= len(self.nodes):
            raise BrokerError(f"no node {node_id}: this cluster has nodes 1 to {len(self.nodes)}")
        return self.nodes[node_id - 1]

    def start(self, node_id: int | None = None) -> list[BrokerStatus]:
        """Start every node not running (or only ``node_id``); return once each started one answers."""
        chosen = [self.node(node_id)] if node_id else self.nodes
        pids = [(node, node.launch()) for node in chosen]
        for node, pid in pids:
            node.wait_ready(pid)
        return self.status()

    def stop(self, node_id: int | None = None, timeout_s: float = 30.0) -> list[bool]:
        """Stop every node (or only ``node_id``), each with SIGTERM first: a controlled shutdown that hands its
        partitions' leadership to the other nodes."""
        chosen = [self.node(node_id)] if node_id else list(reversed(self.nodes))
        return [node.stop(timeout_s) for node in chosen]

    def kill(self, node_id: int) -> bool:
        """SIGKILL one node, as a crash would end it."""
        return self.node(node_id).kill()

    def status(self, probe_timeout_s: float = 5.0) -> list[BrokerStatus]:
        return [node.status(probe_timeout_s) for node in self.nodes]

    def active_controller(self) -> int | None:
        """The node id of the quorum's leader (the active controller), as the running nodes last recorded it in
        their ``quorum-state`` files (the newest epoch wins); None when no running node knows one."""
        best: tuple[int, int] | None = None
        for node in self.nodes:
            if node._pid() is None:
                continue
            try:
                state = json.loads((node.log_dirs / "__cluster_metadata-0" / "quorum-state").read_text())
            except (OSError, ValueError):
                continue
            epoch, leader = int(state.get("leaderEpoch", -1)), int(state.get("leaderId", -1))
            if leader > 0 and (best is None or epoch > best[0]):
                best = (epoch, leader)
        return best[1] if best else None


def _alive(pid: int | None) -> bool:
    try:
        return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def ensure_env_java_home() -> None:
    """Respect JAVA_HOME when set and java is not on PATH (common on CI images)."""
    home = os.environ.get("JAVA_HOME")
    if home and shutil.which("java") is None and (Path(home) / "bin" / "java").exists():
        os.environ["PATH"] = f"{Path(home) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
