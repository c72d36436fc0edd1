"""The embedded local broker: real Apache Kafka (single combined broker+controller, KRaft) on loopback.

Why our own launcher: tests and demos must talk to a real Kafka, and many machines (CI runners among them) have
Java and Maven but no Docker engine. The jars come from Maven Central through ``pom.xml`` beside this file and
are cached in ``broker.jars_dir``; storage is formatted once per ``broker.data_dir``; the pid file records the
process we started so that ``stop`` never touches a broker it did not start.

Every failure a user can cause (no java, no mvn, port taken, corrupt data dir) raises :class:`BrokerError`
whose message is one line saying what to do.
"""

from __future__ import annotations

import base64
import hashlib
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
        return BrokerStatus(pid is not None, pid, self.bootstrap, answering)

    def start(self) -> BrokerStatus:
        """Start the broker unless ours already runs; return once it answers metadata requests."""
        current = self.status()
        if current.running:
            if not current.answering:
                self._wait_ready(current.pid)
            return self.status()
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
        pid = self._launch(java, jars)
        self._wait_ready(pid)
        return self.status()

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

    # ----- internals ---------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        plain, sasl = f"PLAINTEXT://{self.host}:{self.port}", f"SASL_PLAINTEXT://{self.host}:{self.sasl_port}"
        advertised = f"{plain},{sasl}" if self.sasl_port else plain
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"{self.host}:{self.controller_port}",
            "listeners": f"{advertised},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": advertised,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
            "log.dirs": str(self.log_dirs),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
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
        if fields.get("node.id", "").strip() != "1" or not fields.get("cluster.id", "").strip():
            raise BrokerError(f"broker data dir {self.log_dirs} is corrupt (meta.properties lacks node.id=1 "
                              f"or cluster.id); remove it or set broker.data_dir elsewhere")
        return True

    def _format_storage(self, java: str, jars: Path) -> None:
        if self._check_storage():
            return
        cluster_id = new_cluster_id()
        cmd = [java, "-cp", f"{jars}/*", "kafka.tools.StorageTool", "format", "--standalone",
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

    def _wait_ready(self, pid: int | None) -> None:
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
